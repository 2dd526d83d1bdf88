"""DP-SGD throughput against plain SGD, in the project's own training loop.

Both variants are :func:`clinfed.client.training.train` on the same model, data and Poisson
sampling (batch 64, one torch thread): ``noise_multiplier=None`` (plain PyTorch SGD) against a
noise multiplier calibrated for ε = 3, δ = 1e-5. The ratio DP / plain of steps per second is taken
within each repeat, with the variants in shuffled order, and its median over repeats is reported.

If git can show it, the loop of an earlier commit — Opacus ``GradSampleModule`` + ``DPOptimizer``
(hooks mode), ``--reference-commit`` — is loaded from git and timed too, and before any timing
the current loop is checked to produce the **same parameters** as that Opacus loop from the same
generator seed (same Poisson batches, same per-record clipping, same noise draws).

    python -m benchmarks.dp_throughput            # ~3 min
    python -m benchmarks.dp_throughput --quick    # ~30 s
    python -m benchmarks.dp_throughput --profile  # + cProfile of the DP path
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import importlib.util
import io
import json
import pstats
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from benchmarks.common import (
    RESULTS,
    ROOT,
    SITES_DIR,
    environment,
    format_environment,
    markdown_table,
    median,
    write_section,
)
from clinfed.client.site import load_site_data
from clinfed.client.training import TrainSettings, train
from clinfed.config import load_site_config
from clinfed.models import create_model
from clinfed.models.scaling import FeatureStats, set_standardization
from clinfed.privacy.accountant import calibrate_noise, planned_steps

REFERENCE_COMMIT = "7c740a8"
"""The last commit whose ``train()`` used Opacus' GradSampleModule + DPOptimizer directly."""

TARGET = 0.5

TrainFn = Callable[..., object]


@dataclass(frozen=True)
class Workload:
    name: str
    model: nn.Module
    features: torch.Tensor
    labels: torch.Tensor
    settings: TrainSettings
    calls: int = 1  # train() calls per measurement (for short, realistic rounds)

    @property
    def steps_per_call(self) -> int:
        _, steps = planned_steps(
            num_records=len(self.labels),
            batch_size=self.settings.batch_size,
            epochs_per_round=self.settings.epochs,
            rounds=1,
        )
        return steps


def _heart(sites: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    data = [load_site_data(load_site_config(SITES_DIR / f"{s}.yaml")) for s in sites]
    return torch.cat([d.x_train for d in data]), torch.cat([d.y_train for d in data])


def workloads(quick: bool) -> list[Workload]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 30, generator=g)
    y = (x @ torch.randn(30, generator=g) > 0).long()
    torch.manual_seed(0)
    mlp = create_model("mlp", num_features=30, num_classes=2, hidden=[64, 64])
    hx, hy = _heart(("paris", "nantes", "berlin", "zurich"))
    torch.manual_seed(0)
    logreg = create_model("logreg", num_features=hx.shape[1], num_classes=2)
    set_standardization(logreg, *FeatureStats.of(hx).standardization())
    cx, cy = _heart(("paris",))
    torch.manual_seed(0)
    site_logreg = create_model("logreg", num_features=cx.shape[1], num_classes=2)
    set_standardization(site_logreg, *FeatureStats.of(cx).standardization())
    scale = 4 if quick else 1
    return [
        Workload(
            "MLP 30-64-64-1 (6,209 params), 2,048 synthetic rows",
            mlp,
            x,
            y,
            TrainSettings(epochs=4 // scale or 1, batch_size=64, lr=0.05, max_grad_norm=1.0),
        ),
        Workload(
            "logistic regression (17 params), heart: 4 centres' 486 training rows",
            logreg,
            hx,
            hy,
            TrainSettings(epochs=16 // scale, batch_size=64, lr=0.1, max_grad_norm=1.0),
        ),
        Workload(
            "one round at one site: logistic regression, Cleveland's 199 rows, 1 epoch",
            site_logreg,
            cx,
            cy,
            TrainSettings(epochs=1, batch_size=64, lr=0.1, max_grad_norm=1.0),
            calls=40 // scale,
        ),
    ]


def noise_for(w: Workload) -> float:
    q, steps = planned_steps(
        num_records=len(w.labels),
        batch_size=w.settings.batch_size,
        epochs_per_round=w.settings.epochs,
        rounds=1,
    )
    return calibrate_noise(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=q, steps=steps, accountant="rdp"
    )


def load_reference(commit: str) -> ModuleType | None:
    """``client/training.py`` as of ``commit`` (from git), as a module; ``None`` if unavailable."""
    try:
        source = subprocess.run(
            ["git", "show", f"{commit}:client/training.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    folder = Path(tempfile.mkdtemp(prefix="clinfed-reference-"))
    path = folder / f"training_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"clinfed_training_{commit}", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def check_equivalence(reference: ModuleType) -> list[list[str]]:
    """Same seed, same data: the current DP loop must end where Opacus' DPOptimizer loop ends."""
    g = torch.Generator().manual_seed(1)
    cases: list[tuple[str, str, int, int, list[int], int, TrainSettings]] = [
        ("MLP, 2 epochs", "mlp", 30, 2, [64, 64], 500, TrainSettings(2, 64, 0.5, 0.1)),
        (
            "MLP, 5 classes, momentum + FedProx term",
            "mlp",
            30,
            5,
            [16],
            300,
            TrainSettings(3, 32, 0.3, 0.5, 0.9, 0.1),
        ),
        (
            "logistic regression, n < batch (q = 1)",
            "logreg",
            16,
            2,
            [],
            30,
            TrainSettings(4, 64, 0.5, 1.0),
        ),
        (
            "logistic regression, mostly empty batches",
            "logreg",
            16,
            2,
            [],
            200,
            TrainSettings(1, 1, 0.5, 1.0),
        ),
        (
            "CNN (Conv2d + GroupNorm + Linear)",
            "cnn",
            64,
            3,
            [8],
            100,
            TrainSettings(1, 16, 0.1, 1.0),
        ),
    ]
    rows = []
    for label, name, nf, nc, hidden, n, settings in cases:
        x = torch.randn(n, nf, generator=g)
        y = torch.randint(0, nc, (n,), generator=g)
        torch.manual_seed(0)
        start = create_model(name, num_features=nf, num_classes=nc, hidden=hidden)
        ours, theirs = copy.deepcopy(start), copy.deepcopy(start)
        train(
            ours,
            x,
            y,
            settings=settings,
            noise_multiplier=0.7,
            generator=torch.Generator().manual_seed(3),
        )
        reference.train(
            theirs,
            x,
            y,
            settings=settings,
            noise_multiplier=0.7,
            generator=torch.Generator().manual_seed(3),
        )
        moved = float((_params(theirs) - _params(start)).abs().max())
        diff = float((_params(theirs) - _params(ours)).abs().max())
        if not diff <= 1e-5 * max(1.0, moved):
            raise SystemExit(
                f"DP loop differs from Opacus' DPOptimizer loop on {label}: {diff:.3g}"
            )
        rows.append([label, f"{moved:.3g}", f"{diff:.1e}"])
    return rows


def _time(fn: TrainFn, w: Workload, noise: float | None, seed: int) -> float:
    """Steps per second of ``w.calls`` train() calls (model copies made outside the clock)."""
    models = [copy.deepcopy(w.model) for _ in range(w.calls)]
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for model in models:
        fn(
            model,
            w.features,
            w.labels,
            settings=w.settings,
            noise_multiplier=noise,
            generator=generator,
        )
    return w.calls * w.steps_per_call / (time.perf_counter() - started)


def measure(w: Workload, reference: ModuleType | None, repeats: int) -> dict[str, object]:
    sigma = noise_for(w)
    variants: dict[str, tuple[TrainFn, float | None]] = {
        "plain": (train, None),
        "dp": (train, sigma),
    }
    if reference is not None:
        variants["dp-opacus"] = (reference.train, sigma)
    for fn, noise in variants.values():  # warm-up
        _time(fn, w, noise, 0)
    shuffle = random.Random(0)
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        order = list(variants)
        shuffle.shuffle(order)
        for name in order:
            fn, noise = variants[name]
            runs[name].append(_time(fn, w, noise, r + 1))
    ratios = {
        k: [a / b for a, b in zip(v, runs["plain"], strict=True)]
        for k, v in runs.items()
        if k != "plain"
    }
    return {
        "workload": w.name,
        "steps_per_call": w.steps_per_call,
        "calls": w.calls,
        "noise_multiplier": sigma,
        "steps_per_second": {k: median(v) for k, v in runs.items()},
        "ratio": {k: median(v) for k, v in ratios.items()},
        "ratio_range": {k: (min(v), max(v)) for k, v in ratios.items()},
        "raw": runs,
    }


def profile_dp(w: Workload) -> str:
    sigma = noise_for(w)
    model = copy.deepcopy(w.model)
    profiler = cProfile.Profile()
    profiler.enable()
    train(
        model,
        w.features,
        w.labels,
        settings=w.settings,
        noise_multiplier=sigma,
        generator=torch.Generator(),
    )
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()


def render(
    env: dict[str, str], results: list[dict[str, object]], equivalence: list[list[str]] | None
) -> str:
    has_ref = any("dp-opacus" in r["ratio"] for r in results)  # type: ignore[operator]
    header = ["workload", "steps/call", "plain steps/s", "DP steps/s", "DP / plain (median, range)"]
    if has_ref:
        header += [f"Opacus DPOptimizer loop ({REFERENCE_COMMIT}) / plain"]
    rows = []
    for r in results:
        sps, ratio, rng = r["steps_per_second"], r["ratio"], r["ratio_range"]
        row = [
            str(r["workload"]),
            f"{r['steps_per_call']} × {r['calls']}"
            if r["calls"] != 1
            else str(r["steps_per_call"]),
            f"{sps['plain']:.0f}",  # type: ignore[index]
            f"{sps['dp']:.0f}",  # type: ignore[index]
            f"**{ratio['dp']:.2f}** ({rng['dp'][0]:.2f}-{rng['dp'][1]:.2f})",  # type: ignore[index]
        ]
        if has_ref:
            row.append(
                f"{ratio['dp-opacus']:.2f} ({rng['dp-opacus'][0]:.2f}-{rng['dp-opacus'][1]:.2f})"
            )  # type: ignore[index]
        rows.append(row)
    parts = [
        "## DP-SGD throughput vs plain SGD",
        format_environment(env),
        markdown_table(header, rows),
    ]
    verdict = [
        f"- {r['workload']}: DP/plain {r['ratio']['dp']:.2f} → {'MET' if r['ratio']['dp'] >= TARGET else 'MISSED'}"  # type: ignore[index]
        for r in results[:2]
    ]
    parts.append(f"Target DP / plain ≥ {TARGET}:\n" + "\n".join(verdict))
    parts.append("Reproduce: `python -m benchmarks.dp_throughput` (`--quick`, `--profile`).")
    if equivalence:
        parts.append(
            f"Same parameters as the Opacus GradSampleModule + DPOptimizer loop of {REFERENCE_COMMIT} "
            "(same generator seed, σ = 0.7):\n\n"
            + markdown_table(
                ["case", "max abs change of θ from init", "max abs difference ours vs Opacus"],
                equivalence,
            )
        )
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: fewer steps and repeats")
    parser.add_argument(
        "--repeats", type=int, default=None, help="interleaved repeats (default 15, quick 3)"
    )
    parser.add_argument("--reference-commit", default=REFERENCE_COMMIT)
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the Opacus DPOptimizer loop"
    )
    parser.add_argument(
        "--profile", action="store_true", help="print a cProfile of the DP path (MLP)"
    )
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    env = environment()
    repeats = args.repeats or (3 if args.quick else 15)
    reference = None if args.no_reference else load_reference(args.reference_commit)
    if reference is None and not args.no_reference:
        print(
            f"note: could not load client/training.py at {args.reference_commit}; no reference timing"
        )
    equivalence = check_equivalence(reference) if reference is not None else None
    loads = workloads(args.quick)
    results = [measure(w, reference, repeats) for w in loads]
    text = render(env, results, equivalence)
    if args.profile:
        text += "\n```\n" + profile_dp(loads[0]) + "```\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (out / f"dp_throughput{suffix}.md").write_text(text)
    (out / f"dp_throughput{suffix}.json").write_text(
        json.dumps({"environment": env, "results": results}, indent=1)
    )
    print(text)
    if not (args.quick or args.no_write):
        write_section(text)
        print(f"section written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
