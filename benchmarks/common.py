"""What every benchmark shares: paths, the environment record, logging, statistics and tables.

Speed is measured as ratios inside one run, with the variants interleaved (these machines are
shared and noisy); no benchmark asserts a time.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITES_DIR = ROOT / "conf" / "sites"
DATA_DIR = ROOT / "data" / "heart-disease"

CENTRES = {
    "paris": "Cleveland",
    "nantes": "Hungary",
    "berlin": "VA Long Beach",
    "zurich": "Switzerland",
}
"""Demo site name -> the UCI centre whose data it holds."""


def configure_logging(*, verbose: bool) -> None:
    """Keep a benchmark's output readable: clinfed errors only, Flower warnings only.

    A benchmark runs hundreds of federations; Flower logs several INFO lines per round and a
    non-DP site warns on every round that it trains without privacy (as it should in production).
    """
    if verbose:
        logging.getLogger("clinfed").setLevel(logging.INFO)
        return
    logging.getLogger("clinfed").setLevel(logging.ERROR)
    logging.getLogger("flwr").setLevel(logging.WARNING)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def environment() -> dict[str, str]:
    """Date, machine and versions, for the header of every result."""
    import flwr
    import numpy
    import opacus
    import torch

    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_model()}, {os.cpu_count()} CPUs ({platform.system()} {platform.machine()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "flwr": flwr.__version__,
        "numpy": numpy.__version__,
        "commit": _git("rev-parse", "--short", "HEAD")
        + (" + uncommitted changes" if dirty else ""),
        "command": " ".join(["python -m", _module_name(), *sys.argv[1:]]),
    }


def _module_name() -> str:
    path = Path(sys.argv[0]).resolve()
    try:
        rel = path.relative_to(ROOT).with_suffix("")
    except ValueError:
        return path.stem
    return ".".join(rel.parts)


def format_environment(env: dict[str, str]) -> str:
    return "\n".join(f"- {key}: {value}" for key, value in env.items())


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def write_section(text: str) -> None:
    """Replace the section of RESULTS.md whose ``## `` heading opens ``text``, or append it.

    Every other section is left as it is; the file is re-read right before writing, since other
    benchmarks edit their own sections of it.
    """
    heading = text.splitlines()[0]
    if not heading.startswith("## "):
        raise ValueError(f"a RESULTS.md section must open with a '## ' heading; found {heading!r}")
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    start = old.find(f"\n{heading}\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + 1)
        new = old[: start + 1] + text + ("" if end < 0 else "\n" + old[end + 1 :])
    RESULTS.write_text(new, encoding="utf-8")
