"""`clinfed simulate` on Flower's Ray engine, killed with SIGKILL between rounds and restarted
with the same run id: it resumes, and its final model is identical to an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import RAY_RUN_TIMEOUT_S

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _simulate(repo_root: Path, tmp_path: Path, run_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clinfed.cli",
            "simulate",
            "rounds=6",
            f"output_dir={tmp_path / 'results'}",
            f"checkpoint.dir={tmp_path / 'ckpt'}",
            f"checkpoint.run_id={run_id}",
        ],
        cwd=repo_root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill takes Ray's workers too
    )


def _last_round(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["last_round"])
    except Exception:  # noqa: BLE001 - not written yet, or being replaced
        return 0


def _model(stdout: str) -> dict[str, torch.Tensor]:
    folder = next(line for line in stdout.splitlines() if line.startswith("results: "))
    return torch.load(Path(folder.removeprefix("results: ")) / "model.pt", weights_only=True)


def test_simulate_killed_after_round_2_resumes_to_the_uninterrupted_model(
    repo_root: Path, tmp_path: Path
) -> None:
    # Arrange: an uninterrupted run, and one killed once its checkpoint reaches round 2
    straight = _simulate(repo_root, tmp_path, "straight")
    out, err = straight.communicate(timeout=RAY_RUN_TIMEOUT_S)
    assert straight.returncode == 0, err[-3000:]
    killed = _simulate(repo_root, tmp_path, "killed")
    checkpoint = tmp_path / "ckpt" / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + RAY_RUN_TIMEOUT_S
    while _last_round(checkpoint) < 2 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    stopped_at = _last_round(checkpoint)

    # Act
    resumed = _simulate(repo_root, tmp_path, "killed")
    out2, err2 = resumed.communicate(timeout=RAY_RUN_TIMEOUT_S)

    # Assert
    assert resumed.returncode == 0, err2[-3000:]
    assert 2 <= stopped_at < 6, "the run was not killed between rounds"
    assert f"(resumed after round {stopped_at})" in out2
    expected, got = _model(out), _model(out2)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
