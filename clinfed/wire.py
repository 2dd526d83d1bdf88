"""Every key that crosses the network between the server and the sites, defined once.

Imported by both sides (as Flower does with ``differential_privacy_constants``). A new meaning
gets a new key; the meaning of an existing key never changes, so that a site running an older
clinfed never misreads a newer server.

What a site may send is closed: the record names and metric keys listed here are the only ones
the site's egress guard lets out (see :mod:`clinfed.client.mods`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np
from flwr.app import Array, ArrayRecord

from clinfed.errors import ProtocolError

__all__ = [
    "ARRAYS",
    "CONFIG",
    "EVALUATE_METRIC_KEYS",
    "METRICS",
    "PACKED",
    "QUERY_SECAGG_UNMASK",
    "QUERY_SITE_CONFORMAL",
    "QUERY_SITE_INFO",
    "QUERY_SITE_REPORT",
    "REPORT",
    "REPORT_LIST_KEYS",
    "REPORT_METRIC_KEYS",
    "SECAGG",
    "SECAGG_SETTINGS",
    "SITE",
    "STATS",
    "TRAIN_METRIC_KEYS",
    "Keys",
    "is_packed",
    "pack_arrays",
    "read_bool",
    "read_float",
    "read_floats",
    "read_int",
    "read_ints",
    "read_str",
    "unpack_arrays",
]

# ------------------------------------------------------------------ record names in a RecordDict
ARRAYS: Final = "arrays"  # ArrayRecord: model parameters (Flower's default key)
CONFIG: Final = "config"  # ConfigRecord: server -> site instructions
METRICS: Final = "metrics"  # MetricRecord: site -> server scalar metrics
SITE: Final = "site"  # ConfigRecord: site -> server identity and schema fingerprint
STATS: Final = "stats"  # MetricRecord: site -> server feature aggregates for scaling
SECAGG: Final = "secagg"  # ConfigRecord: a secure-aggregation protocol message (either way)
SECAGG_SETTINGS: Final = "secagg-settings"  # ConfigRecord: server -> site, the run's settings
REPORT: Final = "report"  # MetricRecord: site -> server, end-of-run report aggregates

# ------------------------------------------------------------------ packed model arrays
PACKED: Final = "packed"
"""The single array of a *packed* model ArrayRecord: every model array flattened and
concatenated in the model's ``state_dict`` order, all of one dtype. Flower wraps each array in
its own objects (~450 B of envelope per array, 10 % of a 10k-parameter model); packed, a
model pays that once. Both ends know the layout (the server built the model, the site builds the
same model from the run config), so nothing but the values travels."""


def is_packed(record: ArrayRecord) -> bool:
    """Whether ``record`` is a packed model (:data:`PACKED`)."""
    return list(record.keys()) == [PACKED]


def pack_arrays(record: ArrayRecord) -> ArrayRecord:
    """``record``'s arrays as one flat array; ``ValueError`` if they are not all of one dtype."""
    arrays = [a.numpy() for a in record.values()]
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) != 1:
        raise ValueError(
            f"only arrays of one dtype can be packed; found {sorted(map(str, dtypes))}."
        )
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    return ArrayRecord({PACKED: Array(flat)})


def unpack_arrays(record: ArrayRecord, layout: ArrayRecord, *, sender: str) -> ArrayRecord:
    """The packed ``record`` as arrays named, shaped and typed like ``layout``'s.

    Raises :class:`ProtocolError` naming ``sender`` when the packed values do not fit.
    """
    if not is_packed(record):
        raise ProtocolError(
            f"{sender} sent model arrays {sorted(record)} where one packed array was expected."
        )
    flat = record[PACKED].numpy()
    shapes = {k: a.numpy() for k, a in layout.items()}
    expected = sum(a.size for a in shapes.values())
    dtype = next(iter(shapes.values())).dtype if shapes else flat.dtype
    if flat.ndim != 1 or flat.size != expected or flat.dtype != dtype:
        raise ProtocolError(
            f"{sender} sent a packed model of {flat.size} {flat.dtype} values (shape "
            f"{flat.shape}); the model has {expected} {dtype} values."
        )
    out: dict[str, Array] = {}
    offset = 0
    for key, template in shapes.items():
        out[key] = Array(flat[offset : offset + template.size].reshape(template.shape).copy())
        offset += template.size
    return ArrayRecord(out)


# ------------------------------------------------------------------ query message kinds
QUERY_SITE_INFO: Final = "site-info"
QUERY_SECAGG_UNMASK: Final = "secagg-unmask"
QUERY_SITE_REPORT: Final = "site-report"  # final model -> intervals, calibration, score counts
QUERY_SITE_CONFORMAL: Final = "site-conformal"  # final model + threshold -> coverage, abstention


class Keys:
    """Keys inside the records above."""

    # server -> site (ConfigRecord CONFIG)
    QUERY: Final = "query"
    RUN_NAME: Final = "run-name"
    SERVER_ROUND: Final = "server-round"  # injected by Flower's strategies
    NUM_ROUNDS: Final = "num-rounds"
    LOCAL_EPOCHS: Final = "local-epochs"
    LOCAL_STEPS: Final = "local-steps"
    BATCH_SIZE: Final = "batch-size"
    LR: Final = "lr"
    MOMENTUM: Final = "momentum"
    MAX_GRAD_NORM: Final = "max-grad-norm"
    DP: Final = "dp"
    PROXIMAL_MU: Final = "proximal-mu"  # injected by Flower's FedProx
    MODEL_NAME: Final = "model-name"
    MODEL_HIDDEN: Final = "model-hidden"
    MODEL_DROPOUT: Final = "model-dropout"
    SCALING: Final = "scaling"
    SECURE_AGGREGATION: Final = "secure-aggregation"
    SECAGG_TOTAL_EXAMPLES: Final = "secagg-total-examples"  # Σ n over the round's participants
    MAX_UPDATE_NORM: Final = "max-update-norm"  # L2 bound a site checks its own update against
    RUN_ID: Final = "run-id"  # the lab's resumable run id (stable across server restarts)

    # server -> site (ConfigRecord CONFIG of a report query)
    REPORT_BOOTSTRAP: Final = "report-bootstrap"  # bootstrap resamples
    REPORT_RELIABILITY_BINS: Final = "report-reliability-bins"
    CONFORMAL_BINS: Final = "conformal-bins"  # bins of the public conformity-score grid
    CONFORMAL_THRESHOLD_BIN: Final = "conformal-threshold-bin"  # the federation's quantile bin

    # server -> site (ConfigRecord SECAGG_SETTINGS)
    SECAGG_MODE: Final = "mode"
    SECAGG_BITS: Final = "bits"
    SECAGG_CLIP_RANGE: Final = "clip-range"
    SECAGG_MAX_SITES: Final = "max-sites"
    SECAGG_THRESHOLD: Final = "threshold"  # 0: a majority of the round's participants
    SECAGG_ON_OUT_OF_RANGE: Final = "on-out-of-range"

    # site -> server (ConfigRecord SITE)
    SITE_NAME: Final = "name"
    SCHEMA_FINGERPRINT: Final = "schema-fingerprint"
    NUM_FEATURES: Final = "num-features"
    NUM_CLASSES: Final = "num-classes"

    # site -> server (MetricRecord STATS): per encoded feature, over the training split
    STATS_COUNT: Final = "count"
    STATS_SUM: Final = "sum"
    STATS_SUM_SQ: Final = "sum-sq"

    # site -> server (MetricRecord METRICS)
    NUM_EXAMPLES: Final = "num-examples"  # FedAvg's weighting key
    TRAIN_LOSS: Final = "train-loss"
    EPSILON: Final = "epsilon"
    DELTA: Final = "delta"
    NOISE_MULTIPLIER: Final = "noise-multiplier"
    LOSS: Final = "loss"
    ACCURACY: Final = "accuracy"
    ROC_AUC: Final = "roc-auc"

    # site -> server (MetricRecord REPORT), besides NUM_EXAMPLES, ACCURACY, ROC_AUC (test split)
    ACCURACY_CI_LOW: Final = "accuracy-ci-low"  # bootstrap 95 % interval, computed at the site
    ACCURACY_CI_HIGH: Final = "accuracy-ci-high"
    ROC_AUC_CI_LOW: Final = "roc-auc-ci-low"
    ROC_AUC_CI_HIGH: Final = "roc-auc-ci-high"
    ECE: Final = "ece"  # expected calibration error
    RELIABILITY_COUNTS: Final = "reliability-counts"  # per bin: records
    RELIABILITY_PREDICTED: Final = "reliability-predicted"  # per bin: mean prediction (nan < 5)
    RELIABILITY_OBSERVED: Final = "reliability-observed"  # per bin: observed rate (nan < 5)
    CALIBRATION_EXAMPLES: Final = "calibration-examples"  # size of the conformal calibration split
    CONFORMAL_SCORE_COUNTS: Final = "conformal-score-counts"  # calibration scores per grid bin
    CONFORMAL_COVERAGE: Final = "conformal-coverage"  # on the test split
    CONFORMAL_ABSTENTION: Final = "conformal-abstention"
    CONFORMAL_ANSWERED_ACCURACY: Final = "conformal-answered-accuracy"


TRAIN_METRIC_KEYS: Final = frozenset(
    {Keys.NUM_EXAMPLES, Keys.TRAIN_LOSS, Keys.EPSILON, Keys.DELTA, Keys.NOISE_MULTIPLIER}
)
EVALUATE_METRIC_KEYS: Final = frozenset(
    {Keys.NUM_EXAMPLES, Keys.LOSS, Keys.ACCURACY, Keys.ROC_AUC, Keys.EPSILON}
)

REPORT_METRIC_KEYS: Final = frozenset(
    {
        Keys.NUM_EXAMPLES,
        Keys.ACCURACY,
        Keys.ROC_AUC,
        Keys.ACCURACY_CI_LOW,
        Keys.ACCURACY_CI_HIGH,
        Keys.ROC_AUC_CI_LOW,
        Keys.ROC_AUC_CI_HIGH,
        Keys.ECE,
        Keys.RELIABILITY_COUNTS,
        Keys.RELIABILITY_PREDICTED,
        Keys.RELIABILITY_OBSERVED,
        Keys.CALIBRATION_EXAMPLES,
        Keys.CONFORMAL_SCORE_COUNTS,
        Keys.CONFORMAL_COVERAGE,
        Keys.CONFORMAL_ABSTENTION,
        Keys.CONFORMAL_ANSWERED_ACCURACY,
    }
)
REPORT_LIST_KEYS: Final = frozenset(
    {
        Keys.RELIABILITY_COUNTS,
        Keys.RELIABILITY_PREDICTED,
        Keys.RELIABILITY_OBSERVED,
        Keys.CONFORMAL_SCORE_COUNTS,
    }
)
"""The report keys whose value is a list (one number per bin of a public grid, never per record)."""


# ------------------------------------------------------------------ typed, checked reads
# Flower records hold unions of scalars and lists; every read of a value that crossed the network
# goes through one of these, which check the type and name the sender on failure.

RecordLike = Mapping[str, object]


def _fetch(record: RecordLike, key: str, sender: str) -> object:
    if key not in record:
        raise ProtocolError(f"{sender} sent a message without {key!r}.")
    return record[key]


def read_int(record: RecordLike, key: str, *, sender: str) -> int:
    """``record[key]`` as an int (bools refused)."""
    value = _fetch(record, key, sender)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(
            f"{sender} sent {key!r} as {type(value).__name__}; expected an integer."
        )
    return value


def read_float(record: RecordLike, key: str, *, sender: str, default: float | None = None) -> float:
    """``record[key]`` as a float (ints accepted; bools refused)."""
    if default is not None and key not in record:
        return default
    value = _fetch(record, key, sender)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{sender} sent {key!r} as {type(value).__name__}; expected a number.")
    return float(value)


def read_str(record: RecordLike, key: str, *, sender: str, default: str | None = None) -> str:
    """``record[key]`` as a str."""
    if default is not None and key not in record:
        return default
    value = _fetch(record, key, sender)
    if not isinstance(value, str):
        raise ProtocolError(f"{sender} sent {key!r} as {type(value).__name__}; expected text.")
    return value


def read_bool(record: RecordLike, key: str, *, sender: str) -> bool:
    """``record[key]`` as a bool."""
    value = _fetch(record, key, sender)
    if not isinstance(value, bool):
        raise ProtocolError(
            f"{sender} sent {key!r} as {type(value).__name__}; expected true/false."
        )
    return value


def read_floats(record: RecordLike, key: str, *, sender: str) -> list[float]:
    """``record[key]`` as a list of finite-or-not floats (ints accepted)."""
    value = _fetch(record, key, sender)
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise ProtocolError(
            f"{sender} sent {key!r} as {type(value).__name__}; expected a list of numbers."
        )
    return [float(v) for v in value]


def read_ints(
    record: RecordLike, key: str, *, sender: str, default: list[int] | None = None
) -> list[int]:
    """``record[key]`` as a list of ints."""
    if default is not None and key not in record:
        return list(default)
    value = _fetch(record, key, sender)
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ProtocolError(
            f"{sender} sent {key!r} as {type(value).__name__}; expected a list of integers."
        )
    return list(value)
