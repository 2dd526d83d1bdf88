"""Site policy: a bad file fails at start-up naming the key; a request that breaks it is refused."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinfed.client.policy import (
    PolicyRequest,
    PolicyViolation,
    SitePolicy,
    check_metrics,
    check_request,
    load_site_policy,
)
from clinfed.client.site import load_site_data
from clinfed.config import SimulationConfig
from clinfed.errors import ConfigError, PrivacyError
from clinfed.privacy.accountant import calibrate_noise, planned_steps
from tests.conftest import ROOT

DEMO = ROOT / "conf" / "policies" / "demo-policy.yaml"
GOOD: dict[str, Any] = yaml.safe_load(DEMO.read_text())


def _write(tmp_path: Path, document: object, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document))
    return path


def _with(**changes: Any) -> dict[str, Any]:
    """The demo policy with ``section__key=value`` changes (``None`` deletes the key)."""
    document = {k: dict(v) for k, v in GOOD.items()}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        if value is None:
            del document[section][key]
        else:
            document[section][key] = value
    return document


def _request(**changes: Any) -> PolicyRequest:
    base = PolicyRequest(
        model="logreg",
        rounds=10,
        local_epochs=1,
        batch_size=16,
        max_grad_norm=1.0,
        dp=True,
        secure_aggregation=False,
        run_epsilon=1.0,
        delta=1e-5,
        noise_multiplier=0.9,
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def policy() -> SitePolicy:
    return load_site_policy(DEMO)


def test_every_package_name_resolves() -> None:
    import clinfed.client.policy as module

    assert all(hasattr(module, name) for name in module.__all__)


# ------------------------------------------------------------------------------ loading


def test_the_demo_policy_loads(policy: SitePolicy) -> None:
    assert policy.budget.epsilon == 10.0 and policy.budget.delta == 1e-5
    assert policy.budget.accountant == "rdp"
    assert policy.run.max_epsilon == 1.0 and policy.run.max_rounds == 20
    assert policy.run.allowed_models == ("logreg", "mlp")
    assert policy.run.require_dp is True
    assert "num-examples" in policy.egress.allowed_metrics
    assert policy.source == str(DEMO)


def test_the_demo_policy_admits_the_demo_federation(policy: SitePolicy, demo_config: Any) -> None:
    config: SimulationConfig = demo_config()
    run = config.run
    for site in config.sites:
        q, steps = planned_steps(
            num_records=len(load_site_data(site).y_train),
            batch_size=run.train.batch_size,
            epochs_per_round=run.train.local_epochs,
            rounds=run.rounds,
        )
        sigma = calibrate_noise(
            target_epsilon=site.privacy.epsilon,
            target_delta=site.privacy.delta,
            sample_rate=q,
            steps=steps,
            accountant=site.privacy.accountant,
        )
        request = PolicyRequest(
            model=run.model.name,
            rounds=run.rounds,
            local_epochs=run.train.local_epochs,
            batch_size=run.train.batch_size,
            max_grad_norm=run.train.max_grad_norm,
            dp=run.train.dp,
            secure_aggregation=False,
            run_epsilon=site.privacy.epsilon,
            delta=site.privacy.delta,
            noise_multiplier=sigma,
        )

        check_request(policy, request)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"budget__delta": 1.0}, ["budget.delta", "(0, 1)"]),
        ({"budget__delta": 0.0}, ["budget.delta"]),
        ({"budget__epsilon": 0.0}, ["budget.epsilon", "> 0"]),
        ({"budget__epsilon": -2.0}, ["budget.epsilon"]),
        ({"budget__epsilon": math.inf}, ["budget.epsilon", "finite"]),
        ({"budget__epsilon": math.nan}, ["budget.epsilon", "finite"]),
        ({"budget__accountant": "gdp"}, ["budget.accountant", "gdp"]),
        ({"run__max_epsilon": 20.0}, ["run.max_epsilon 20 > budget.epsilon 10"]),
        ({"run__max_epsilon": 0.0}, ["run.max_epsilon"]),
        ({"run__max_rounds": 0}, ["run.max_rounds", ">= 1"]),
        ({"run__max_rounds": 2.5}, ["run.max_rounds"]),
        ({"run__min_noise_multiplier": -0.1}, ["run.min_noise_multiplier"]),
        ({"run__max_grad_norm": 0}, ["run.max_grad_norm"]),
        ({"run__require_dp": "maybe"}, ["run.require_dp"]),
        (
            {"run__allowed_models": ["logreg", "transformer"]},
            ["run.allowed_models", "'transformer'", "known: cnn, logreg, mlp"],
        ),
        ({"run__allowed_models": []}, ["run.allowed_models", "at least one"]),
        ({"run__allowed_models": "logreg"}, ["run.allowed_models"]),
        (
            {"egress__allowed_metrics": ["loss", "patient-ids"]},
            ["egress.allowed_metrics", "'patient-ids'"],
        ),
        ({"run__max_rounds": None}, ["required key 'run.max_rounds'"]),
        ({"run__require_secure_aggregation": None}, ["run.require_secure_aggregation"]),
        ({"budget__epsilon": None}, ["required key 'budget.epsilon'"]),
        ({"run__max_round": 5}, ["unknown key 'run.max_round'"]),
    ],
)
def test_a_bad_policy_fails_at_start_up_naming_the_key(
    tmp_path: Path, changes: dict[str, Any], words: list[str]
) -> None:
    path = _write(tmp_path, _with(**changes))

    with pytest.raises(ConfigError) as error:
        load_site_policy(path)

    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("text", ["", "[1, 2]", "budget: {epsilon: 1", "a: 1\na: 2\n"])
def test_a_policy_that_is_not_a_yaml_mapping_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)

    with pytest.raises(ConfigError, match=str(path)):
        load_site_policy(path)


def test_a_missing_policy_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_site_policy(tmp_path / "nowhere.yaml")


# ------------------------------------------------------------------------------ requests


def test_a_request_within_the_policy_passes(policy: SitePolicy) -> None:
    check_request(policy, _request())


@pytest.mark.parametrize(
    ("changes", "rule", "text"),
    [
        ({"rounds": 50}, "run.max_rounds", "rounds 50 > run.max_rounds 20"),
        (
            {"model": "cnn"},
            "run.allowed_models",
            "model 'cnn' is not in run.allowed_models [logreg, mlp]",
        ),
        ({"max_grad_norm": 5.0}, "run.max_grad_norm", "max_grad_norm 5 > run.max_grad_norm 1"),
        (
            {"noise_multiplier": 0.3},
            "run.min_noise_multiplier",
            "noise multiplier 0.3 < run.min_noise_multiplier 0.5",
        ),
        ({"run_epsilon": 3.0}, "run.max_epsilon", "run epsilon 3 > run.max_epsilon 1"),
        ({"delta": 1e-3}, "budget.delta", "run delta 0.001 > budget.delta 1e-05"),
        (
            {"dp": False, "run_epsilon": None, "delta": None, "noise_multiplier": None},
            "run.require_dp",
            "training without DP, but run.require_dp is true",
        ),
    ],
)
def test_a_request_that_breaks_a_rule_is_refused_saying_which_asked_and_allowed(
    policy: SitePolicy, changes: dict[str, Any], rule: str, text: str
) -> None:
    with pytest.raises(PolicyViolation) as error:
        check_request(policy, _request(**changes))

    assert error.value.rules == (rule,)
    assert str(error.value) == f"policy refuses: {text} (policy file {DEMO})"
    assert isinstance(error.value, PrivacyError)


def test_every_broken_rule_is_named_in_one_line(policy: SitePolicy) -> None:
    with pytest.raises(PolicyViolation) as error:
        check_request(policy, _request(rounds=50, model="cnn", run_epsilon=2.0))

    assert error.value.rules == ("run.allowed_models", "run.max_rounds", "run.max_epsilon")
    assert "\n" not in str(error.value)


def test_secure_aggregation_can_be_required(tmp_path: Path) -> None:
    strict = load_site_policy(_write(tmp_path, _with(run__require_secure_aggregation=True)))

    with pytest.raises(PolicyViolation, match=r"run\.require_secure_aggregation is true"):
        check_request(strict, _request(secure_aggregation=False))
    check_request(strict, _request(secure_aggregation=True))


def test_a_policy_may_allow_training_without_dp(tmp_path: Path) -> None:
    relaxed = load_site_policy(_write(tmp_path, _with(run__require_dp=False)))

    check_request(relaxed, _request(dp=False, run_epsilon=None, delta=None, noise_multiplier=None))


@pytest.mark.parametrize(
    "changes",
    [
        {"noise_multiplier": None},
        {"run_epsilon": None},
        {"dp": False},
    ],
)
def test_a_request_must_be_consistent_about_dp(changes: dict[str, Any]) -> None:
    with pytest.raises(PrivacyError):
        _request(**changes)


def test_metrics_on_the_policy_may_leave(policy: SitePolicy) -> None:
    check_metrics(policy, ["num-examples", "loss", "accuracy"])


def test_a_metric_off_the_policy_refuses_the_reply_instead_of_trimming_it(
    tmp_path: Path,
) -> None:
    narrow = load_site_policy(
        _write(tmp_path, _with(egress__allowed_metrics=["num-examples", "train-loss", "loss"]))
    )

    with pytest.raises(PolicyViolation) as error:
        check_metrics(narrow, ["num-examples", "roc-auc", "epsilon"])

    assert error.value.rules == ("egress.allowed_metrics",)
    assert "metric(s) epsilon, roc-auc may not leave the site" in str(error.value)


# ------------------------------------------------------------------------------ property tests

KEYS = {
    "budget": ["epsilon", "delta", "accountant", "typo"],
    "run": [
        "max_epsilon",
        "max_rounds",
        "min_noise_multiplier",
        "max_grad_norm",
        "require_dp",
        "require_secure_aggregation",
        "allowed_models",
    ],
    "egress": ["allowed_metrics"],
}
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(
        ["logreg", "mlp", "cnn", "loss", "rdp", "prv", "${oc.env:HOME}", "${x}", "1e-5"]
    )
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def policy_documents(draw: st.DrawFn) -> object:
    """The demo policy with a few keys changed, removed or added, or whole sections replaced."""
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    document: dict[str, Any] = {k: dict(v) for k, v in GOOD.items()}
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from([*KEYS, "extra"]))
        target = document.get(section)
        if section not in KEYS or not isinstance(target, dict) or draw(st.integers(0, 7)) == 0:
            document[section] = draw(values)
            continue
        key = draw(st.sampled_from(KEYS[section]))
        if draw(st.integers(0, 5)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(values)
    return document


def _load_or_config_error(path: Path) -> None:
    try:
        policy = load_site_policy(path)
    except ConfigError as error:
        assert "\n" not in str(error) and "\r" not in str(error)
    else:
        assert 0 < policy.budget.delta < 1 and math.isfinite(policy.budget.epsilon)
        assert 0 < policy.run.max_epsilon <= policy.budget.epsilon


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=policy_documents())
def test_any_policy_document_loads_or_raises_config_error(tmp_path: Path, document: object) -> None:
    _load_or_config_error(_write(tmp_path, document))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(DEMO.read_bytes())),
            st.integers(min_value=0, max_value=12),
            st.binary(max_size=6)
            | st.sampled_from([b":", b"\n", b"  ", b"[", b"-", b"${", b"\t", b"\xff"]),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_any_corrupted_policy_bytes_load_or_raise_config_error(
    tmp_path: Path, edits: list[tuple[int, int, bytes]]
) -> None:
    data = DEMO.read_bytes()
    for position, cut, chunk in edits:
        at = min(position, len(data))
        data = data[:at] + chunk + data[at + cut :]
    path = tmp_path / "policy.yaml"
    path.write_bytes(data)

    _load_or_config_error(path)
