"""Configuration: typed, validated once, and every mistake is one clear line."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from clinfed.config import SimulationConfig, load_run_config, load_site_config
from clinfed.errors import ConfigError

Demo = Callable[..., SimulationConfig]


def test_demo_config_parses_into_typed_values(demo_config: Demo) -> None:
    config = demo_config("rounds=3", "strategy.name=fedadam", "train.lr=0.2")

    assert config.run.rounds == 3
    assert config.run.strategy.name == "fedadam"
    assert config.run.train.lr == pytest.approx(0.2)
    assert [s.name for s in config.sites] == ["paris", "nantes", "berlin"]
    assert all(Path(s.data.path).is_file() for s in config.sites)


def test_federation_epsilon_overrides_every_simulated_site(demo_config: Demo) -> None:
    config = demo_config("federation.epsilon=0.3")

    assert {s.privacy.epsilon for s in config.sites} == {0.3}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("rounds=0", "rounds must be >= 1"),
        ("bogus=1", "unknown key 'bogus'"),
        ("train.bogus=1", "unknown key 'train.bogus'"),
        ("rounds=abc", "invalid value for 'rounds'"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("train.max_grad_norm=0", "train.max_grad_norm must be > 0"),
        ("strategy.name=fedsgd", "strategy.name must be one of"),
        ("federation.epsilon=0", "federation.epsilon must be > 0"),
        ("scaling=zscore", "scaling must be one of"),
        ("rounds", "must look like key=value"),
    ],
)
def test_bad_run_config_names_the_key(demo_config: Demo, override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as error:
        demo_config(override)

    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("  epsilon: 0", "privacy.epsilon must be > 0"),
        ("  epsilon: -2", "privacy.epsilon must be > 0"),
        ("  delta: 1.0", "privacy.delta must be in \\(0, 1\\)"),
        ("  delta: 0", "privacy.delta must be in \\(0, 1\\)"),
        ("  accountant: gdp", "privacy.accountant must be one of"),
    ],
)
def test_bad_site_privacy_target_is_refused(tmp_path: Path, line: str, expected: str) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(f"name: paris\ndata:\n  path: d.csv\n  schema: s.yaml\nprivacy:\n{line}\n")

    with pytest.raises(ConfigError, match=expected):
        load_site_config(site)


def test_site_config_without_data_path_names_the_key(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("name: paris\n")

    with pytest.raises(ConfigError, match=r"required key 'data\.path'"):
        load_site_config(site)


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "run.yaml"
    bad.write_text("rounds: [1, 2\n")

    with pytest.raises(ConfigError, match="not valid YAML") as error:
        load_run_config(bad)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "args",
    [
        ["simulate", "rounds=0"],
        ["simulate", "privacy.epsilon=0"],
        ["simulate", "--config", "missing.yaml"],
        ["check-site", "conf/sites/missing.yaml"],
    ],
)
def test_cli_prints_one_line_and_no_traceback(repo_root: Path, args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "clinfed.cli", *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("clinfed: error: ")
    assert "Traceback" not in done.stderr


BAD_CSVS = {
    "missing column": lambda text: "\n".join(
        ",".join(c for i, c in enumerate(line.split(",")) if i != 1) for line in text.splitlines()
    ),
    "wrong type": lambda text: text.replace("\n1,63,", "\n1,sixty-three,", 1),
    "nan label": lambda text: "\n".join(
        line if i != 1 else line.rsplit(",", 1)[0] + "," for i, line in enumerate(text.splitlines())
    ),
    "unknown category": lambda text: text.replace("typical angina", "typical-angina", 1),
    "empty file": lambda text: "",
}


@pytest.mark.parametrize("problem", list(BAD_CSVS))
def test_bad_site_data_is_one_line_from_the_cli(
    repo_root: Path, tmp_path: Path, problem: str
) -> None:
    original = (repo_root / "data/heart-disease/sites/cleveland.csv").read_text()
    (tmp_path / "site.csv").write_text(BAD_CSVS[problem](original))
    schema = repo_root / "data/heart-disease/schema-binary.yaml"
    (tmp_path / "site.yaml").write_text(
        f"name: paris\ndata:\n  path: site.csv\n  schema: {schema}\n"
    )

    done = subprocess.run(
        [sys.executable, "-m", "clinfed.cli", "check-site", str(tmp_path / "site.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 2, done.stdout
    lines = [line for line in done.stderr.splitlines() if line.startswith("clinfed: error: ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "site.csv" in lines[0]
