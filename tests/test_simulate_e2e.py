"""`clinfed simulate` end to end: Flower's simulation engine (Ray), as `tox -e simulate` runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import RAY_RUN_TIMEOUT_S

pytestmark = pytest.mark.e2e


def _ray_processes() -> list[str]:
    done = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if "raylet" in line or "gcs_server" in line]


def test_simulate_prints_a_per_site_table_and_leaves_nothing_running(
    repo_root: Path, tmp_path: Path
) -> None:
    before = _ray_processes()

    done = subprocess.run(
        [sys.executable, "-m", "clinfed.cli", "simulate", "rounds=2", f"output_dir={tmp_path}"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=RAY_RUN_TIMEOUT_S,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    for site in ("paris", "nantes", "berlin"):
        lines = [line for line in table.splitlines() if line.startswith(site)]
        assert lines, f"no row for {site} in stdout:\n{table}\nstderr:\n{done.stderr[-3000:]}"
        line = lines[0]
        accuracy, auc, _loss, epsilon = (float(v) for v in line.split()[2:6])
        assert 0 < accuracy <= 1 and 0 < auc <= 1 and 0 < epsilon <= 1.0
    assert "round 1/2" in done.stderr and "round 2/2" in done.stderr  # progress while it runs
    folders = [f for f in tmp_path.iterdir() if f.name != "site-state"]
    assert len(folders) == 1
    ledgers = list((tmp_path / "site-state").glob("*/*/ledger.jsonl"))
    assert sorted(p.parent.name for p in ledgers) == ["berlin", "nantes", "paris"]
    document = json.loads((folders[0] / "metrics.json").read_text())
    assert sorted(document["final"]) == ["berlin", "nantes", "paris"]
    for name in ("metrics.csv", "model.pt", "config.yaml", "summary.txt"):
        assert (folders[0] / name).is_file()
    assert _ray_processes() == before
