"""50 randomly corrupted CSVs, configs and site policies through the command line (seeded).

Each must end in exactly one clear line on stderr (``clinfed: error: ...``), exit status 2, no
traceback, and nothing written: the folder holding every input, output and state is byte-for-byte
unchanged afterwards (no results folder, no site-state folder, no ledger).
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from clinfed import cli
from clinfed import simulation as simulation_module

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "heart-disease"
SCHEMA = DATA / "schema-binary.yaml"
POLICY = ROOT / "conf" / "policies" / "demo-policy.yaml"
SEED = 6
NUMERIC = ("age", "trestbps", "chol", "thalch", "oldpeak")
CATEGORICAL = ("sex", "cp", "restecg")
BOOLEAN = ("fbs", "exang")
USED = (*NUMERIC, *CATEGORICAL, *BOOLEAN, "num")


@dataclass(frozen=True)
class Case:
    kind: str  # csv | config | policy
    what: str
    build: Callable[[Path], list[str]]  # writes the inputs under a folder, returns the CLI args


def _rows() -> tuple[list[str], list[list[str]]]:
    with (DATA / "sites" / "cleveland.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, [r for r in reader if all(r[header.index(c)] for c in USED)]


def _csv_text(header: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([header, *rows])
    return out.getvalue()


def _site_yaml(
    folder: Path,
    *,
    data: str = "site.csv",
    extra: dict[str, Any] | None = None,
    policy: bool = False,
) -> Path:
    site: dict[str, Any] = {
        "name": "paris",
        "data": {"path": data, "schema": str(SCHEMA)},
        "privacy": {"epsilon": 1.0, "delta": 1.0e-5},
        "noise_seed": 1,
    }
    if policy:
        site["governance"] = {
            "policy": "policy.yaml",
            "ledger": "state/ledger.jsonl",
            "audit_log": "state/audit.jsonl",
        }
    for key, value in (extra or {}).items():  # one level deep is all the breaks need
        if isinstance(value, dict) and isinstance(site.get(key), dict):
            site[key] = {**site[key], **value}
        else:
            site[key] = value
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(site), encoding="utf-8")
    return path


def _simulate_yaml(folder: Path, body: str) -> Path:
    path = folder / "simulate.yaml"
    path.write_text(
        f"name: bad\nrounds: 2\noutput_dir: {folder / 'results'}\n{body}\n"
        "federation: {sites: [site.yaml]}\n",
        encoding="utf-8",
    )
    return path


# ----------------------------------------------------------------------------- corrupted CSVs


def _csv_case(rng: random.Random) -> Case:
    header, rows = _rows()
    rows = [list(r) for r in rng.sample(rows, 60)]
    row = rng.randrange(len(rows))
    col = header.index
    junk = "".join(rng.choice("abcxyz#%&") for _ in range(rng.randint(1, 6)))
    family = rng.choice(
        [
            "wrong type",
            "out of range",
            "unknown level",
            "unknown boolean",
            "unknown label",
            "column absent",
            "duplicate column",
            "ragged row",
            "infinite",
            "empty",
            "header only",
            "binary garbage",
        ]
    )
    text: str | bytes
    if family == "wrong type":
        rows[row][col(rng.choice(NUMERIC))] = "x" + junk
    elif family == "out of range":
        rows[row][col(rng.choice(NUMERIC))] = rng.choice(["1e6", "-1e6", "99999"])
    elif family == "unknown level":
        rows[row][col(rng.choice(CATEGORICAL))] = "Q" + junk
    elif family == "unknown boolean":
        rows[row][col(rng.choice(BOOLEAN))] = "maybe" + junk
    elif family == "unknown label":
        rows[row][col("num")] = str(rng.randint(5, 99))
    elif family == "column absent":
        drop = col(rng.choice(USED))
        header = [h for i, h in enumerate(header) if i != drop]
        rows = [[v for i, v in enumerate(r) if i != drop] for r in rows]
    elif family == "duplicate column":
        dup = col(rng.choice(USED))
        header = [*header, header[dup]]
        rows = [[*r, r[dup]] for r in rows]
    elif family == "ragged row":
        rows[row] = [*rows[row], junk]
    elif family == "infinite":
        rows[row][col(rng.choice(NUMERIC))] = rng.choice(["1e999", "-1e999", "inf"])
    if family == "empty":
        text = ""
    elif family == "header only":
        text = ",".join(header) + "\n"
    elif family == "binary garbage":
        cell = col(rng.choice(CATEGORICAL))
        rows[row][cell] = "@@CELL@@"
        text = (
            _csv_text(header, rows)
            .encode()
            .replace(b"@@CELL@@", bytes(rng.randrange(128, 256) for _ in range(4)))
        )
    else:
        text = _csv_text(header, rows)
    via_simulate = rng.random() < 0.3

    def build(folder: Path) -> list[str]:
        path = folder / "site.csv"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        site = _site_yaml(folder, policy=via_simulate)
        if via_simulate:
            (folder / "policy.yaml").write_bytes(POLICY.read_bytes())
            return ["simulate", "--config", str(_simulate_yaml(folder, ""))]
        return ["check-site", str(site)]

    return Case("csv", f"{family} via {'simulate' if via_simulate else 'check-site'}", build)


# ----------------------------------------------------------------------------- corrupted configs

_SITE_CONFIG_BREAKS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "negative epsilon": lambda r: {"privacy": {"epsilon": -round(r.uniform(0.01, 5), 3)}},
    "delta >= 1": lambda r: {"privacy": {"delta": round(r.uniform(1, 9), 3)}},
    "test fraction": lambda r: {"data": {"test_fraction": r.choice([0, 1, 1.5, -0.2])}},
    "unknown key": lambda r: {r.choice(["nmae", "privcy", "datta"]): 1},
    "threads": lambda r: {"torch_threads": r.randint(-5, 0)},
    "accountant": lambda r: {"privacy": {"accountant": r.choice(["gdp", "moments", "RDP"])}},
    "bad name": lambda r: {"name": r.choice(["pa ris", "x/y", "../etc"])},
    "reconnect": lambda r: {"connection": {"reconnect_max_retries": r.randint(-9, -1)}},
    "noise seed type": lambda r: {"noise_seed": [1, 2]},
    "data file absent": lambda r: {"data": {"path": f"absent-{r.randint(1, 99)}.csv"}},
    "schema absent": lambda r: {"data": {"schema": "no-schema.yaml"}},
}
_RUN_CONFIG_BREAKS: dict[str, Callable[[random.Random], str]] = {
    "rounds": lambda r: f"rounds: {r.randint(-3, 0)}",
    "min_sites": lambda r: f"min_sites: {r.randint(-3, 0)}",
    "expected_sites": lambda r: f"expected_sites: {r.choice([-1, 1, 9])}",
    "timeout": lambda r: f"round_timeout_s: {r.choice(['0', '-1', '.inf', '.nan'])}",
    "strategy": lambda r: f"strategy: {{name: {r.choice(['fedsgd', 'krum2', 'FedAvg'])}}}",
    "bits": lambda r: f"secure_aggregation: {{bits: {r.choice([4, 7, 65, 128])}}}",
    "run id": lambda r: f"checkpoint: {{dir: ckpt, run_id: '{r.choice(['a/b', '..', '.x', ''])}'}}",
    "run id without dir": lambda r: "checkpoint: {run_id: study}",
    "robust with secagg": lambda r: (
        f"robust_aggregation: {{method: {r.choice(['median', 'trimmed-mean'])}}}"
    ),
    "trim fraction": lambda r: (
        f"robust_aggregation: {{trim_fraction: {r.choice([0.5, 0.9, -0.1])}}}"
    ),
    "max update norm": lambda r: f"validation: {{max_update_norm: {r.choice([0, -1, '.inf'])}}}",
    "dropout": lambda r: f"model: {{dropout: {r.choice([1.0, 1.5, -0.5])}}}",
    "lr": lambda r: f"train: {{lr: {r.choice([0, -0.1])}}}",
    "unknown key": lambda r: f"{r.choice(['roundz', 'strategie', 'seeds'])}: 3",
    "wrong shape": lambda r: "model: [1, 2]",
    "yaml syntax": lambda r: r.choice(["rounds: [1, 2", "train: {lr: 0.1", "\tname: tab"]),
    "missing site": lambda r: "",  # federation.sites names a file that does not exist
}


def _config_case(rng: random.Random) -> Case:
    if rng.random() < 0.4:
        family = rng.choice(sorted(_SITE_CONFIG_BREAKS))
        extra = _SITE_CONFIG_BREAKS[family](rng)

        def build_site(folder: Path) -> list[str]:
            header, rows = _rows()
            (folder / "site.csv").write_text(_csv_text(header, rows[:60]), encoding="utf-8")
            return ["check-site", str(_site_yaml(folder, extra=extra))]

        return Case("config", f"site config: {family}", build_site)
    family = rng.choice(sorted(_RUN_CONFIG_BREAKS))
    body = _RUN_CONFIG_BREAKS[family](rng)

    def build_run(folder: Path) -> list[str]:
        header, rows = _rows()
        (folder / "site.csv").write_text(_csv_text(header, rows[:60]), encoding="utf-8")
        if family != "missing site":
            _site_yaml(folder)
        return ["simulate", "--config", str(_simulate_yaml(folder, body))]

    return Case("config", f"run config: {family}", build_run)


# ----------------------------------------------------------------------------- corrupted policies


_REQUIRED_POLICY_KEYS = frozenset(
    {
        "epsilon",
        "delta",
        "max_epsilon",
        "max_rounds",
        "min_noise_multiplier",
        "max_grad_norm",
        "require_secure_aggregation",
        "allowed_models",
        "allowed_metrics",
    }
)


def _policy_case(rng: random.Random) -> Case:
    lines = POLICY.read_text(encoding="utf-8").splitlines()
    keyed = [i for i, line in enumerate(lines) if ":" in line and not line.lstrip().startswith("#")]
    family = rng.choice(
        ["drop key", "negative", "wrong type", "yaml syntax", "unknown key", "list"]
    )
    i = rng.choice([k for k in keyed if lines[k].startswith("  ")])  # a leaf setting
    key = lines[i].split(":")[0]
    if family == "drop key":  # of a setting the policy must write out (not one with a default)
        i = rng.choice(
            [k for k in keyed if lines[k].split(":")[0].strip() in _REQUIRED_POLICY_KEYS]
        )
        key = lines[i].split(":")[0]
        del lines[i]
    elif family == "negative":
        numeric = [
            k
            for k in keyed
            if lines[k].startswith("  ")
            and any(c.isdigit() for c in lines[k].split(":")[1].split("#")[0])
        ]
        i = rng.choice(numeric)
        key = lines[i].split(":")[0]
        lines[i] = f"{key}: -{rng.randint(1, 50)}"
    elif family == "wrong type":
        lines[i] = f"{key}: {rng.choice(['[1, 2]', '{a: 1}', 'lots'])}"
    elif family == "yaml syntax":
        lines.insert(
            rng.randrange(len(lines)), rng.choice(["budget: {epsilon: 1", "  - ]", "\t: x"])
        )
    elif family == "unknown key":
        lines.insert(i, f"{key}_typo: 1")
    else:
        lines = ["- budget", "- run"]
    text = "\n".join(lines) + "\n"

    def build(folder: Path) -> list[str]:
        header, rows = _rows()
        (folder / "site.csv").write_text(_csv_text(header, rows[:60]), encoding="utf-8")
        (folder / "policy.yaml").write_text(text, encoding="utf-8")
        return ["ledger", "show", str(_site_yaml(folder, policy=True))]

    return Case("policy", f"policy: {family} ({key.strip()})", build)


def _cases() -> list[Case]:
    rng = random.Random(SEED)
    makers = [_csv_case] * 20 + [_config_case] * 18 + [_policy_case] * 12
    return [make(rng) for make in makers]


CASES = _cases()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
        for p in sorted(folder.rglob("*"))
    }


def test_there_are_fifty_cases_of_each_kind() -> None:
    kinds = [c.kind for c in CASES]
    assert (len(CASES), kinds.count("csv"), kinds.count("config"), kinds.count("policy")) == (
        50,
        20,
        18,
        12,
    )


@pytest.mark.parametrize("case", CASES, ids=[f"{i:02d}-{c.what}" for i, c in enumerate(CASES)])
def test_a_corrupted_input_ends_in_one_clear_line_and_writes_nothing(
    tmp_path: Path,
    case: Case,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: a federation must never start from a bad input
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{case.what}: the federation started from a bad input")

    monkeypatch.setattr(simulation_module, "run_simulated_federation", must_not_run)
    monkeypatch.chdir(tmp_path)
    args = case.build(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()

    # Act
    status = cli.main(args)

    # Assert
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("clinfed: error: ")]
    assert status == 2, f"{case.what}: exit {status}, stderr {err!r}"
    assert len(errors) == 1, f"{case.what}: {err!r}"
    assert "Traceback" not in err
    message = errors[0].removeprefix("clinfed: error: ")
    assert len(message) > 20
    if case.kind == "policy":
        assert "policy" in message, message
    assert _snapshot(tmp_path) == before, f"{case.what}: something was written"
    assert not (tmp_path / "results").exists() and not (tmp_path / "state").exists()
