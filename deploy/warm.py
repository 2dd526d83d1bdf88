"""A warm task launcher: a site's ClientApp tasks start in milliseconds instead of seconds.

Flower's SuperExec starts a fresh process for every message a site receives, and each one
imports torch, Opacus and Flower (2–6 s on a small hospital VM) before it trains for a fraction
of a second. ``clinfed site start`` therefore also runs a *zygote*: one process that imports all
of that once and then forks a child per task. The child runs exactly the cold path —
:func:`clinfed.deploy.launch.run_clientapp_with_approval`, i.e. the check that the hospital
approved the app bundle's hash, then Flower's ``flwr-clientapp`` — in its own process, with its
own random state, and exits when the task is done; nothing of one task survives into the next.

``clinfed-clientapp``, the command SuperExec launches per task, is a shim that imports nothing
heavy: it hands its arguments and its stdin/stdout/stderr to the zygote over a Unix socket in a
directory only the site's user can open, relays signals to the child and exits with the child's
status. Without a zygote (``CLINFED_WARM_SOCKET`` unset or nobody listening) the shim runs the
cold path itself and says so on stderr: slower, never less checked.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

__all__ = ["PROFILE_ENV", "SOCKET_ENV", "main", "serve"]

SOCKET_ENV = "CLINFED_WARM_SOCKET"
"""Environment variable naming the zygote's Unix socket (set by ``clinfed site start``)."""

PROFILE_ENV = "CLINFED_TASK_PROFILE_DIR"
"""If set (in the site's environment), each task writes its cProfile statistics there
(``task-<time>-<pid>.prof``): where a deployed round's time goes, for
``benchmarks/deployed_round.py``. Timings only; no data."""

_PRELOAD = (
    "clinfed.client.app",
    "clinfed.deploy.launch",
    "flwr.supernode.cli.flwr_clientapp",
    "flwr.supernode.runtime.run_clientapp",
    "torch._dynamo",
    "torch.onnx",
    "httpx",
    "httpcore",
    "h11",
)
"""Modules the zygote imports once (measured: what a task otherwise imports on its own)."""

_MAX_REQUEST = 64 * 1024
_MAX_ARGS = 64


# ------------------------------------------------------------------------------------ the shim


def main() -> None:
    """Entry point ``clinfed-clientapp``: run one ClientApp task through the warm zygote."""
    path = os.environ.get(SOCKET_ENV, "")
    connection = _connect(path) if path else None
    if connection is None:
        if path:
            print(
                f"clinfed-clientapp: the warm launcher at {path} does not answer; starting this "
                "task cold (several seconds slower).",
                file=sys.stderr,
                flush=True,
            )
        from clinfed.deploy.launch import run_clientapp_with_approval  # noqa: PLC0415

        run_clientapp_with_approval()
        return
    sys.exit(_delegate(connection, sys.argv[1:]))


def _connect(path: str) -> socket.socket | None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
    except OSError:
        client.close()
        return None
    return client


def _delegate(connection: socket.socket, argv: list[str]) -> int:
    """Send ``argv`` and this process's stdio to the zygote; wait for the child's exit status."""
    request = json.dumps({"argv": argv}).encode()
    socket.send_fds(connection, [request], [0, 1, 2])
    stream = connection.makefile("r", encoding="utf-8")
    first = stream.readline()
    if not first.startswith("pid "):
        print(
            f"clinfed-clientapp: the warm launcher refused the task: {first.strip()}",
            file=sys.stderr,
        )
        return 1
    child = int(first.split()[1])

    def relay(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, relay)
    last = stream.readline()
    if last.startswith("exit "):
        return int(last.split()[1])
    return 1  # the child died without reporting (killed): a failed task


# ----------------------------------------------------------------------------------- the zygote


def serve(socket_path: Path, *, parent_pid: int | None = None) -> None:
    """Import the ClientApp runtime once, then fork a child per task request (blocks).

    Exits when ``parent_pid`` (the site launcher) is gone.
    """
    # Everything a task needs, imported before the first fork — including what torch and Flower
    # import lazily on first use (torch._dynamo by the first optimizer: ~3 s; httpcore by the
    # first HTTP client). No torch operation runs here: thread pools start lazily, so children
    # fork from a single-threaded process.
    for module in _PRELOAD:
        importlib.import_module(module)

    socket_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        server.bind(str(socket_path))
    finally:
        os.umask(old_umask)
    server.listen(16)
    server.settimeout(1.0)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished children
    print(f"clinfed warm launcher ready on {socket_path}", file=sys.stderr, flush=True)
    while parent_pid is None or _alive(parent_pid):
        try:
            connection, _ = server.accept()
        except TimeoutError:
            continue
        try:
            _fork_task(server, connection)
        except Exception as error:  # noqa: BLE001 - one bad request must not stop the site
            print(f"clinfed warm launcher: task request refused: {error}", file=sys.stderr)
            connection.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fork_task(server: socket.socket, connection: socket.socket) -> None:
    connection.settimeout(10.0)
    data, fds, _, _ = socket.recv_fds(connection, _MAX_REQUEST, 3)
    try:
        argv = _parse_request(data, fds)
    except ValueError as error:
        for fd in fds:
            os.close(fd)
        connection.sendall(f"refused {error}\n".encode())
        connection.close()
        return
    pid = os.fork()
    if pid == 0:  # the child: never returns
        server.close()
        code = _run_child(connection, argv, fds)
        os._exit(code)
    for fd in fds:
        os.close(fd)
    connection.close()


def _parse_request(data: bytes, fds: list[int]) -> list[str]:
    if len(fds) != 3:
        raise ValueError(f"expected stdin, stdout and stderr; got {len(fds)} descriptors")
    try:
        request = json.loads(data)
    except ValueError as error:
        raise ValueError("the request is not JSON") from error
    argv = request.get("argv") if isinstance(request, dict) else None
    if (
        not isinstance(argv, list)
        or len(argv) > _MAX_ARGS
        or not all(isinstance(a, str) for a in argv)
    ):
        raise ValueError("the request must be {'argv': [string, ...]}")
    return argv


def _run_child(connection: socket.socket, argv: list[str], fds: list[int]) -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = os.fdopen(0, "r", closefd=False)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    _reseed()
    connection.settimeout(None)
    connection.sendall(f"pid {os.getpid()}\n".encode())
    code = 1
    profile_dir = os.environ.get(PROFILE_ENV, "")
    profiler = None
    if profile_dir:
        import cProfile  # noqa: PLC0415

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        from clinfed.deploy.launch import run_clientapp_with_approval  # noqa: PLC0415

        sys.argv = ["clinfed-clientapp", *argv]
        run_clientapp_with_approval()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception in a fresh process
        import traceback  # noqa: PLC0415

        traceback.print_exc()
    finally:
        if profiler is not None:
            profiler.disable()
            name = f"task-{time.time_ns()}-{os.getpid()}.prof"
            with contextlib.suppress(OSError):
                profiler.dump_stats(str(Path(profile_dir) / name))
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        with contextlib.suppress(OSError):
            connection.sendall(f"exit {code}\n".encode())
    return code


def _reseed() -> None:
    """Forked children would share the zygote's random state: give each its own."""
    import random  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    random.seed(os.urandom(32))
    np.random.seed(int.from_bytes(os.urandom(4), "big"))
    torch.manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)


def _zygote_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="clinfed's warm ClientApp task launcher")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    serve(args.socket, parent_pid=args.parent_pid)


if __name__ == "__main__":
    _zygote_main()
