"""The warm task launcher: one pre-imported zygote forks a process per ClientApp task."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clinfed.deploy.warm import SOCKET_ENV

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("warm")
    path = folder / "tasks.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "clinfed.deploy.warm", "--socket", str(path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not path.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the zygote did not start: {process.stderr.read()}")  # type: ignore[union-attr]
            time.sleep(0.1)
        yield path
    finally:
        process.terminate()
        process.wait(timeout=20)


def _shim(args: list[str], socket_path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "clinfed-clientapp"), *args],
        env={**os.environ, SOCKET_ENV: socket_path},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_socket_is_private_to_the_sites_user(zygote: Path) -> None:
    assert zygote.stat().st_mode & 0o077 == 0


def test_a_task_runs_in_a_forked_child_with_the_shims_stdio_and_exit_code(zygote: Path) -> None:
    started = time.monotonic()
    done = _shim(["--help"], str(zygote))
    took = time.monotonic() - started

    # flwr-clientapp's own help, printed by the child on the shim's stdout; argparse exits 0
    assert done.returncode == 0, done.stderr
    assert "--runtime-api-address" in done.stdout
    assert "starting this task cold" not in done.stderr
    assert took < 30  # no fresh import of torch and Flower (that alone is several seconds)


def test_a_failing_task_reports_its_exit_code(zygote: Path) -> None:
    done = _shim(["--no-such-flag"], str(zygote))

    assert done.returncode == 2  # argparse's usage error, relayed from the child
    assert "flwr-clientapp: error:" in done.stderr


def test_a_malformed_request_is_refused_and_the_zygote_keeps_serving(zygote: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(zygote))
        socket.send_fds(client, [json.dumps({"argv": "not a list"}).encode()], [0, 1, 2])
        answer = client.makefile("r").readline()
    assert answer.startswith("refused ")

    assert _shim(["--help"], str(zygote)).returncode == 0


def test_without_a_zygote_the_task_runs_cold_and_says_so(tmp_path: Path) -> None:
    done = _shim(["--help"], str(tmp_path / "nobody.sock"))

    assert done.returncode == 0
    assert "--runtime-api-address" in done.stdout
    assert "starting this task cold" in done.stderr
