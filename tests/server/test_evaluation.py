"""The server's reading of the sites' report records: checked, never trusted."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinfed import wire
from clinfed.errors import ProtocolError
from clinfed.server.evaluation import conformal_threshold_bin, parse_site_report

K = wire.Keys
_VALUES = st.one_of(
    st.integers(min_value=-5, max_value=1000),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=5),
    st.lists(st.one_of(st.integers(0, 50), st.floats(allow_nan=True)), max_size=12),
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(wire.REPORT_METRIC_KEYS)), _VALUES))
def test_any_report_record_parses_or_is_refused_with_a_protocol_error(
    record: dict[str, object],
) -> None:
    try:
        evaluation = parse_site_report(record, site="paris")
    except ProtocolError as error:
        assert "paris" in str(error)
    else:
        assert evaluation.site == "paris"
        lengths = {
            len(evaluation.reliability_counts),
            len(evaluation.reliability_predicted),
            len(evaluation.reliability_observed),
        }
        assert len(lengths) == 1


def test_a_well_formed_report_parses() -> None:
    record = {
        K.NUM_EXAMPLES: 45,
        K.ACCURACY: 0.8,
        K.ACCURACY_CI_LOW: 0.7,
        K.ACCURACY_CI_HIGH: 0.9,
        K.ROC_AUC: 0.75,
        K.ROC_AUC_CI_LOW: math.nan,
        K.ROC_AUC_CI_HIGH: math.nan,
        K.ECE: 0.1,
        K.RELIABILITY_COUNTS: [3, 5],
        K.RELIABILITY_PREDICTED: [math.nan, 0.6],
        K.RELIABILITY_OBSERVED: [math.nan, 0.4],
        K.CALIBRATION_EXAMPLES: 17,
    }

    evaluation = parse_site_report(record, site="berlin")

    assert evaluation.num_examples == 45 and evaluation.reliability_counts == (3, 5)
    assert evaluation.notes == ["too few records of one class for a ROC AUC interval"]


@settings(max_examples=100, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=0, max_value=30), min_size=2, max_size=100),
    alpha=st.floats(min_value=0.01, max_value=0.5),
)
def test_the_threshold_bin_is_the_first_reaching_the_conformal_rank(
    counts: list[int], alpha: float
) -> None:
    chosen = conformal_threshold_bin(counts, alpha=alpha)

    n = sum(counts)
    rank = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    if n == 0 or rank > n:
        assert chosen is None
    else:
        assert chosen is not None
        assert sum(counts[: chosen + 1]) >= rank > sum(counts[:chosen])


def test_negative_counts_are_refused() -> None:
    with pytest.raises(ProtocolError, match="must be >= 0"):
        conformal_threshold_bin([5, -1, 20], alpha=0.1)
