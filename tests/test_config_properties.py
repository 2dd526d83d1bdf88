"""Property-based tests of the config loader: any document, any override, any bytes either load
into a valid frozen config or raise a one-line ConfigError — never another exception."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinfed.config import (
    RunConfig,
    load_run_config,
    load_simulation_config,
    load_site_config,
    to_yaml,
)
from clinfed.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SIMULATE = ROOT / "conf" / "simulate.yaml"
PARIS = ROOT / "conf" / "sites" / "paris.yaml"

RUN_KEYS: dict[str, list[str]] = {
    "": [
        "name",
        "rounds",
        "seed",
        "min_sites",
        "expected_sites",
        "round_timeout_s",
        "scaling",
        "on_site_refusal",
    ],
    "model": ["name", "hidden", "dropout"],
    "strategy": ["name", "proximal_mu", "server_lr", "beta_1", "beta_2", "tau"],
    "train": ["local_epochs", "batch_size", "lr", "momentum", "max_grad_norm", "dp"],
    "secure_aggregation": ["enabled", "mode", "bits", "clip_range", "threshold", "on_abort"],
    "checkpoint": ["dir", "run_id"],
    "validation": ["max_update_norm"],
    "robust_aggregation": ["method", "trim_fraction"],
}
SITE_KEYS: dict[str, list[str]] = {
    "": ["name", "noise_seed", "torch_threads", "approved_apps"],
    "data": ["path", "schema", "test_fraction", "split_seed"],
    "privacy": ["epsilon", "delta", "accountant", "required"],
    "connection": ["superlink", "runtime_port", "reconnect_max_retries", "reconnect_max_wait_s"],
}
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**12), max_value=10**12)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
    | st.sampled_from(
        ["fedavg", "fedadam", "median", "trimmed-mean", "pairwise", "rdp", "${x}", "1e-5", "a/b"]
    )
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def documents(draw: st.DrawFn, keys: dict[str, list[str]]) -> dict[str, Any]:
    """A mapping of known keys (and sometimes unknown ones) to arbitrary values."""
    document: dict[str, Any] = {}
    for _ in range(draw(st.integers(1, 5))):
        section = draw(st.sampled_from(sorted(keys)))
        key = draw(st.sampled_from([*keys[section], "unknown_key"]))
        value = draw(values)
        if section:
            target = document.setdefault(section, {})
            if isinstance(target, dict):
                target[key] = value
        else:
            document[key] = value
    return document


def _dump(path: Path, document: object) -> Path:
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    return path


def _one_line(error: ConfigError) -> None:
    text = str(error)
    assert text and "\n" not in text and "\r" not in text


def _check_run(config: RunConfig) -> None:
    assert config.rounds >= 1 and config.min_sites >= 1
    assert 0 < config.round_timeout_s < math.inf
    assert config.robust_aggregation.method == "none" or not config.secure_aggregation.enabled
    assert load_run_config(None, []) is not None
    assert to_yaml(config)  # a loaded config always serialises (results folder, checkpoint)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=documents(RUN_KEYS))
def test_any_run_config_document_loads_or_raises_one_line_config_error(
    tmp_path: Path, document: dict[str, Any]
) -> None:
    try:
        config = load_run_config(_dump(tmp_path / "run.yaml", document))
    except ConfigError as error:
        _one_line(error)
    else:
        _check_run(config)


@settings(max_examples=200, deadline=None)
@given(
    overrides=st.lists(
        st.tuples(
            st.sampled_from(
                [f"{s}.{k}" if s else k for s, ks in RUN_KEYS.items() for k in ks] + ["x.y", ""]
            ),
            st.text(max_size=8) | st.sampled_from(["[1,2]", "{a: 1}", "-1", "nan", "inf", "1e9"]),
        ),
        max_size=4,
    ),
    raw=st.lists(st.text(max_size=12), max_size=2),
)
def test_any_command_line_override_loads_or_raises_one_line_config_error(
    overrides: list[tuple[str, str]], raw: list[str]
) -> None:
    try:
        config = load_run_config(None, [f"{k}={v}" for k, v in overrides] + raw)
    except ConfigError as error:
        _one_line(error)
    else:
        _check_run(config)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=documents(SITE_KEYS))
def test_any_site_config_document_loads_or_raises_one_line_config_error(
    tmp_path: Path, document: dict[str, Any]
) -> None:
    try:
        site = load_site_config(_dump(tmp_path / "site.yaml", document))
    except ConfigError as error:
        _one_line(error)
    else:
        assert site.privacy.epsilon > 0 and 0 < site.privacy.delta < 1
        assert Path(site.data.path).is_absolute()


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(SIMULATE.read_bytes())),
            st.integers(min_value=0, max_value=12),
            st.binary(max_size=6)
            | st.sampled_from([b":", b"\n", b"  ", b"[", b"${", b"\t", b"\xff"]),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_any_corrupted_simulation_config_bytes_load_or_raise_one_line_config_error(
    tmp_path: Path, edits: list[tuple[int, int, bytes]]
) -> None:
    data = SIMULATE.read_bytes()
    for position, cut, chunk in edits:
        at = min(position, len(data))
        data = data[:at] + chunk + data[at + cut :]
    # keep the site list pointing at the real demo sites
    path = SIMULATE.parent / f".prop-{abs(hash(data)) % 10**8}.yaml"
    path.write_bytes(data)
    try:
        config = load_simulation_config(path, [f"output_dir={tmp_path}"])
    except ConfigError as error:
        _one_line(error)
    else:
        _check_run(config.run)
        assert config.sites
    finally:
        path.unlink()
