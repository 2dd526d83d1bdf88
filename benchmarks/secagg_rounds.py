"""Secure aggregation's cost per round: secure vs plain federations, interleaved in one run.

For 3, 10 and 30 simulated sites (``benchmarks._sites``: the four Fed-Heart-Disease cohorts'
complete records dealt into N sites) and MLPs on the 16 encoded heart features of about 10k, 100k
and 1M parameters, with DP-SGD on as in production (1 local epoch, expected batch 8):

* **round time** — secure and plain federations alternate (ABBA order over ``--repeats``) on the
  in-process transport (:func:`clinfed.simulation.local_grid`: the real ClientApp, server loop,
  strategy and secure-aggregation code, no Ray, no network, sites served one after another); the
  median of the per-round times (round 1 excluded) of each variant. The secure steps of the real
  code paths are timed as they run (site: flatten + quantize + mask + state, server: open + close
  round), so the extra time can be split into site work (summed over the sites here; in a
  deployment sites work in parallel) and server work;
* **bytes per site per round**, each direction, from Flower's own serialisation: every message is
  deflated into the object tree flwr 1.41 pushes and pulls (``get_all_nested_objects`` +
  ``deflate``; Message, RecordDict, records, arrays, array chunks), and compared with the float32
  model size; the deflate + inflate time of each message is kept too;
* **message exchanges per round** (one push of requests and their replies), without and with one site dropping;
* one data point on Flower's Ray simulation engine (:func:`clinfed.simulation.run_simulated_federation`),
  3 sites x 10k parameters, secure vs plain;
* a cProfile of secure and plain federations at 30 sites x 1M parameters, attributed to the steps
  of the protocol.

    python -m benchmarks.secagg_rounds            # ~9 min; writes its RESULTS.md section
    python -m benchmarks.secagg_rounds --quick    # ~30 s smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import json
import os
import pstats
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from benchmarks._sites import make_sites
from benchmarks.common import (
    ROOT,
    configure_logging,
    environment,
    format_environment,
    markdown_table,
    median,
    write_section,
)
from clinfed import wire
from clinfed.client import secure as client_secure
from clinfed.config import SimulationConfig, load_simulation_config
from clinfed.models import create_model
from clinfed.server.federation import run_federation
from clinfed.server.results import FederationResult
from clinfed.server.secure import SecureAggregator
from clinfed.simulation import LocalGrid, check_sites, local_grid, run_simulated_federation

CONFIG = ROOT / "conf" / "simulate.yaml"
OUT = ROOT / "benchmarks" / "out"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
HEADING = "## Secure aggregation"

NUM_FEATURES, NUM_CLASSES = 16, 2
MODELS = {"10k": 91, "100k": 307, "1M": 991}
"""Model label -> hidden width h of the MLP 16-h-h-1 (h^2 + 19h + 33 parameters and buffers)."""
BATCH_SIZE = 8

# Targets (issue 3) and Flower's SecAgg+ references (shared/notes/flower.md, benchmarks.md).
TARGET_RATIO_3_SITES = 1.3
TARGET_EXTRA_30_1M_S = 1.0
TARGET_BYTES_RATIO = 1.1
FLOWER_EXTRA_30_1M = "2.5-2.7 s"
FLOWER_BYTES_RATIO = "2.0x"

Case = tuple[int, str]
"""(number of sites, model label)."""


def num_params(model: str) -> int:
    """Float32 values in the model's state dict (parameters + standardization buffers)."""
    h = MODELS[model]
    net = create_model(
        "mlp", num_features=NUM_FEATURES, num_classes=NUM_CLASSES, hidden=[h, h], dropout=0.0
    )
    return sum(t.numel() for t in net.state_dict().values())


def case_config(
    case: Case,
    site_paths: Sequence[Path],
    *,
    secure: bool,
    rounds: int,
    output_dir: str,
    extra: Sequence[str] = (),
) -> SimulationConfig:
    """The demo config with the case's sites and model, DP on, secure aggregation on or off."""
    _, model = case
    h = MODELS[model]
    overrides = [
        "model.name=mlp",
        f"model.hidden=[{h},{h}]",
        f"rounds={rounds}",
        "train.dp=true",
        "train.local_epochs=1",
        f"train.batch_size={BATCH_SIZE}",
        f"secure_aggregation.enabled={'true' if secure else 'false'}",
        f"output_dir={output_dir}",
        "federation.sites=[" + ",".join(str(p) for p in site_paths) + "]",
        *extra,
    ]
    return load_simulation_config(CONFIG, overrides)


def _check_clean(result: FederationResult, what: str) -> None:
    """A timed federation must have run every round normally (no refusal, no abort)."""
    bad = [e for e in result.events if e.kind != "secagg-out-of-range"]
    errors = [m for m in result.metrics if m.error]
    if bad or errors:
        detail = "; ".join([f"{e.kind}: {e.detail}" for e in bad] + [m.error for m in errors])
        raise RuntimeError(f"{what}: the federation did not run cleanly: {detail[:2000]}")


def _out_of_range(result: FederationResult) -> int:
    return sum(1 for e in result.events if e.kind == "secagg-out-of-range")


# ----------------------------------------------------------------------------- timing


class _SecureClock:
    """Times the secure-aggregation steps of the real code paths, per round (LocalGrid only).

    Site side: ``clinfed.client.secure.flatten_update`` + ``mask_update`` (state load, quantize,
    mask, state save, record) per site; server side: ``SecureAggregator.open_round`` +
    ``close_round`` (collect, unmask if needed, dequantize, rebuild the arrays). The originals are
    restored on exit.
    """

    def __init__(self) -> None:
        self.site: dict[int, float] = defaultdict(float)
        self.server = 0.0
        self.rounds: list[tuple[dict[int, float], float]] = []
        self._pending_flatten = 0.0

    @contextlib.contextmanager
    def installed(self) -> Iterator[_SecureClock]:
        saved = (
            client_secure.mask_update,
            client_secure.flatten_update,
            SecureAggregator.open_round,
            SecureAggregator.close_round,
        )
        mask_update, flatten_update, open_round, close_round = saved

        def timed_flatten(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = flatten_update(*args, **kwargs)
            self._pending_flatten += time.perf_counter() - t
            return out

        def timed_mask(context: Any, *args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = mask_update(context, *args, **kwargs)
            took = time.perf_counter() - t + self._pending_flatten
            self._pending_flatten = 0.0
            self.site[context.node_id] += took
            return out

        def timed_server(method: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                t = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    self.server += time.perf_counter() - t

            return wrapper

        client_secure.mask_update = timed_mask  # type: ignore[assignment]
        client_secure.flatten_update = timed_flatten  # type: ignore[assignment]
        SecureAggregator.open_round = timed_server(open_round)  # type: ignore[method-assign]
        SecureAggregator.close_round = timed_server(close_round)  # type: ignore[method-assign]
        try:
            yield self
        finally:
            client_secure.mask_update = mask_update  # type: ignore[assignment]
            client_secure.flatten_update = flatten_update  # type: ignore[assignment]
            SecureAggregator.open_round = open_round  # type: ignore[method-assign]
            SecureAggregator.close_round = close_round  # type: ignore[method-assign]

    def round_end(self, _: FederationResult) -> None:
        self.rounds.append((dict(self.site), self.server))
        self.site.clear()
        self.server = 0.0


@dataclasses.dataclass
class Timing:
    """Per-round samples of one case (round 1 of every federation excluded)."""

    plain: list[float] = dataclasses.field(default_factory=list)
    secure: list[float] = dataclasses.field(default_factory=list)
    site_sum: list[float] = dataclasses.field(default_factory=list)  # secure site work, all sites
    site_mean: list[float] = dataclasses.field(default_factory=list)
    site_max: list[float] = dataclasses.field(default_factory=list)
    server: list[float] = dataclasses.field(default_factory=list)
    out_of_range_rounds: int = 0
    federations: int = 0


def time_case(
    case: Case, site_paths: Sequence[Path], *, rounds: int, repeats: int, tmp: str
) -> Timing:
    """Alternate secure and plain federations (ABBA) and keep their rounds 2..R."""
    timing = Timing()
    for rep in range(repeats):
        for secure in (True, False) if rep % 2 == 0 else (False, True):
            config = case_config(case, site_paths, secure=secure, rounds=rounds, output_dir=tmp)
            clock = _SecureClock()
            with clock.installed():
                result = run_federation(
                    local_grid(config), config.run, on_round_end=clock.round_end
                )
            _check_clean(result, f"{case} secure={secure}")
            timing.federations += 1
            if secure:
                timing.secure += result.round_seconds[1:]
                timing.out_of_range_rounds += _out_of_range(result)
                for sites, server in clock.rounds[1:]:
                    values = list(sites.values())
                    timing.site_sum.append(sum(values))
                    timing.site_mean.append(statistics.fmean(values))
                    timing.site_max.append(max(values))
                    timing.server.append(server)
            else:
                timing.plain += result.round_seconds[1:]
    return timing


# ----------------------------------------------------------------------------- bytes


def serialise(message: Message) -> tuple[int, float]:
    """Wire bytes of a message as flwr 1.41 ships it, and the seconds to serialise + inflate it.

    flwr 1.41 sends a message as an object tree (Message, RecordDict, each record, each Array and
    its ArrayChunks), each object deflated to bytes and pushed/pulled separately; the sum of the
    deflated objects is the payload (HTTP framing and per-request metadata come on top, the same
    for both variants). The time follows Flower's own push path
    (``flwr.supernode.runtime.run_clientapp.push_message``): the message id first, then the object
    tree and every object's bytes with object ids cached; plus the receiver's inflation.
    """
    t = time.perf_counter()
    message.__dict__.pop("_object_id", None)
    _ = message.object_id
    with no_object_id_recompute():
        get_object_tree(message)
        objects = get_all_nested_objects(message)
        contents = {oid: obj.deflate() for oid, obj in objects.items()}
    root = next(reversed(contents))  # post-order: the message itself comes last
    inflate_object_from_contents(root, dict(contents))
    took = time.perf_counter() - t
    return sum(len(c) for c in contents.values()), took


@dataclasses.dataclass
class _Traffic:
    """Every (request, reply) of a federation, by phase; installed as ``LocalGrid.reply_filter``."""

    drop: tuple[int, int] | None = None  # (round, node): lose that node's train reply
    round: int = 1
    # phase -> list of (round, down bytes, up bytes, down seconds, up seconds)
    messages: dict[str, list[tuple[int, int, int, float, float]]] = dataclasses.field(
        default_factory=lambda: defaultdict(list)
    )
    exchanges: dict[int, list[str]] = dataclasses.field(default_factory=lambda: defaultdict(list))

    def __call__(self, request: Message, reply: Message) -> Message | None:
        phase = request.metadata.message_type
        if phase == "query":
            config = request.content.config_records.get(wire.CONFIG)
            kind = config.get(wire.Keys.QUERY) if config is not None else None
            phase = "unmask" if kind == wire.QUERY_SECAGG_UNMASK else "discovery"
        down, down_s = serialise(request)
        up, up_s = serialise(reply)
        lost = phase == "train" and self.drop == (self.round, request.metadata.dst_node_id)
        if not lost:
            self.messages[phase].append((self.round, down, up, down_s, up_s))
        return None if lost else reply

    def watch(self, grid: LocalGrid) -> None:
        """Count exchanges (one push of requests, then their replies) per round, by type."""
        push_messages = grid.push_messages

        def counted(messages: Any) -> Any:
            messages = list(messages)
            kinds = sorted({m.metadata.message_type for m in messages})
            self.exchanges[self.round].append("+".join(kinds))
            return push_messages(messages)

        grid.push_messages = counted  # type: ignore[method-assign]

    def round_end(self, _: FederationResult) -> None:
        self.round += 1


def measure_traffic(
    case: Case,
    site_paths: Sequence[Path],
    *,
    secure: bool,
    tmp: str,
    rounds: int = 2,
    drop_node_in_round: int | None = None,
) -> _Traffic:
    """One untimed federation whose every message is serialised and counted."""
    extra = ["round_timeout_s=3"] if drop_node_in_round else []
    config = case_config(
        case, site_paths, secure=secure, rounds=rounds, output_dir=tmp, extra=extra
    )
    grid = local_grid(config)
    traffic = _Traffic()
    if drop_node_in_round is not None:
        traffic.drop = (drop_node_in_round, sorted(grid.get_node_ids())[0])
    grid.reply_filter = traffic
    traffic.watch(grid)
    result = run_federation(grid, config.run, on_round_end=traffic.round_end)
    if drop_node_in_round is None:
        _check_clean(result, f"{case} secure={secure} (traffic)")
    return traffic


def traffic_summary(traffic: _Traffic) -> dict[str, dict[str, float]]:
    """Per phase: mean bytes and serialisation ms per site message, each direction."""
    out: dict[str, dict[str, float]] = {}
    for phase, rows in traffic.messages.items():
        out[phase] = {
            "down_bytes": statistics.fmean(r[1] for r in rows),
            "up_bytes": statistics.fmean(r[2] for r in rows),
            "down_ms": 1000 * median(r[3] for r in rows),
            "up_ms": 1000 * median(r[4] for r in rows),
            "messages": len(rows),
        }
    return out


# ----------------------------------------------------------------------------- profile

_AES = "<method 'update_into' of 'cryptography.hazmat.bindings._rust.openssl.ciphers.CipherContext' objects>"
_PROFILE_ITEMS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    # (label, side, ((file suffix or "~" for builtins, function name), ...)); cumulative times
    ("quantize (weighted update -> Z_2^32), total", "site", (("secagg/quantize.py", "quantize"),)),
    (
        "mask expansion + add, total (one AES-256-CTR mask per peer)",
        "site",
        (("secagg/masking.py", "add_mask"),),
    ),
    (
        "  of which AES-CTR keystream",
        "site",
        (("~", _AES),),
    ),
    (
        "key agreement per pair per round (X25519 + HKDF)",
        "site",
        (("secagg/site.py", "_agree"), ("secagg/keys.py", "pair_mask_seed")),
    ),
    ("pack masked vector to bytes", "site", (("secagg/masking.py", "pack_vector"),)),
    (
        "site state load + save (context.state)",
        "site",
        (("client/secure.py", "_load"), ("client/secure.py", "_save")),
    ),
    ("flatten update", "site", (("client/secure.py", "flatten_update"),)),
    (
        "site secure work, total (flatten + mask_update)",
        "site",
        (("client/secure.py", "flatten_update"), ("client/secure.py", "mask_update")),
    ),
    ("server: open round", "server", (("server/secure.py", "open_round"),)),
    ("server: close round, total", "server", (("server/secure.py", "close_round"),)),
    (
        "  of which parse + unpack masked inputs",
        "server",
        (("secagg/server.py", "add_masked_input"),),
    ),
    ("  of which sum + dequantize", "server", (("secagg/server.py", "result"),)),
    ("  of which rebuild float32 arrays", "server", (("server/secure.py", "_add"),)),
    (
        "server: strategy aggregate_train (FedAvg)",
        "both",
        (("strategy/fedavg.py", "aggregate_train"),),
    ),
)


def _cumtime(stats: pstats.Stats, file_suffix: str, name: str) -> float:
    total = 0.0
    for (file, _, func), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        if func == name and (file == file_suffix or file.endswith(file_suffix)):
            total += cumulative
    return total


def _site_arrayrecord_time(stats: pstats.Stats) -> float:
    """Plain variant: the site's ``ArrayRecord(model.state_dict())`` reply, called from train."""
    total = 0.0
    for (file, _, func), value in stats.stats.items():  # type: ignore[attr-defined]
        if func == "__init__" and file.endswith("flwr/app/message/arrayrecord.py"):
            for (cfile, _, cfunc), (_, _, _, cumulative) in value[4].items():
                if cfunc in ("train", "_train") and cfile.endswith("client/app.py"):
                    total += cumulative
    return total


def result_params(config: SimulationConfig) -> int:
    h = config.run.model.hidden
    net = create_model(
        "mlp", num_features=NUM_FEATURES, num_classes=NUM_CLASSES, hidden=list(h), dropout=0.0
    )
    return sum(t.numel() for t in net.state_dict().values())


def _randomness_seconds(size: int) -> float:
    """Median time of the stochastic-rounding draw ``quantize`` makes for ``size`` values."""
    times = []
    for _ in range(5):
        t = time.perf_counter()
        np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "big"))).random(size)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile_case(
    case: Case, site_paths: Sequence[Path], *, rounds: int, tmp: str
) -> dict[str, dict[str, float]]:
    """cProfile one secure and one plain federation; seconds per round of each protocol step.

    Round 1 is included (it costs the same steps; DP calibration is not attributed to any row).
    """
    out: dict[str, dict[str, float]] = {}
    for secure in (True, False):
        config = case_config(case, site_paths, secure=secure, rounds=rounds, output_dir=tmp)
        grid = local_grid(config)
        profiler = cProfile.Profile()
        profiler.enable()
        result = run_federation(grid, config.run)
        profiler.disable()
        _check_clean(result, f"{case} secure={secure} (profile)")
        stats = pstats.Stats(profiler)
        rows = {
            label: sum(_cumtime(stats, f, n) for f, n in keys) / rounds
            for label, _, keys in _PROFILE_ITEMS
        }
        rows["site: ArrayRecord(model.state_dict()) reply"] = _site_arrayrecord_time(stats) / rounds
        # numpy's Generator methods are invisible to cProfile: time the quantizer's own draw
        # (outside the profiler) and list it under quantize.
        draw = len(site_paths) * _randomness_seconds(result_params(config)) if secure else 0.0
        label = "  of which stochastic-rounding randomness (PCG64 doubles, timed directly)"
        items = list(rows.items())
        rows = dict([items[0], (label, draw), *items[1:]])
        rows["profiled round (mean of rounds 2..R)"] = statistics.fmean(result.round_seconds[1:])
        out["secure" if secure else "plain"] = rows
    return out


# ----------------------------------------------------------------------------- Ray


def ray_point(
    case: Case, site_paths: Sequence[Path], *, rounds: int, repeats: int, tmp: str
) -> dict[str, list[float]]:
    """Flower's simulation engine (Ray), secure vs plain alternated; rounds 2..R of each run."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    samples: dict[str, list[float]] = {
        "plain": [],
        "secure": [],
        "wall": [],
        "plain_runs": [],
        "secure_runs": [],
    }
    for rep in range(repeats):
        for secure in (True, False) if rep % 2 == 0 else (False, True):
            config = case_config(case, site_paths, secure=secure, rounds=rounds, output_dir=tmp)
            check_sites(config)  # as `clinfed simulate` does: site data and state folders
            started = time.perf_counter()
            outcome = run_simulated_federation(config)
            samples["wall"].append(time.perf_counter() - started)
            _check_clean(outcome.result, f"Ray {case} secure={secure}")
            variant = "secure" if secure else "plain"
            samples[variant] += outcome.result.round_seconds[1:]
            samples[f"{variant}_runs"].append(median(outcome.result.round_seconds[1:]))
    return samples


# ----------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f}" if seconds >= 0.0995 else f"{1000 * seconds:.1f}"


def _steps(values: Sequence[float]) -> str:
    """The distinct values of a sample at 0.1 s resolution, e.g. ``0.2 / 0.3 / 0.4``."""
    return " / ".join(f"{v:.1f}" for v in sorted({round(x, 1) for x in values}))


def _kb(n: float) -> str:
    return f"{n / 1000:,.1f}"


def render(data: dict[str, Any], *, quick: bool) -> str:
    env = data["environment"]
    params: dict[str, int] = data["params"]
    timing: dict[str, Timing] = data["timing"]
    traffic: dict[str, dict[str, dict[str, dict[str, float]]]] = data["traffic"]
    parts = [HEADING + (" (quick smoke run)" if quick else ""), ""]
    parts.append(
        "Secure aggregation (`pairwise` mode, 32-bit ring, the default) against the same federation "
        "with `secure_aggregation.enabled=false`, in one run, interleaved. Sites: the four "
        "Fed-Heart-Disease cohorts' 740 complete records dealt into N disjoint sites "
        "(`benchmarks/_sites.py`; ~247 records per site at 3 sites, ~25 at 30). Model: MLP "
        "16-h-h-1, "
        + ", ".join(f"{m} = h {MODELS[m]} ({params[m]:,} float32 values)" for m in params)
        + f". DP-SGD on (`train.dp=true`, ε = 1 per site), 1 local epoch, expected batch "
        f"{BATCH_SIZE}, FedAvg; evaluation on every site every round (same in both variants). "
        + (
            "Site governance on (demo policy, privacy ledger and audit log written per request)."
            if data["governance"]
            else "Site governance (policy, ledger, audit log) off: its per-request file I/O is "
            "the same in both variants and would only dilute the ratio and add noise "
            "(`--governance` keeps it)."
        )
    )
    parts.append("")
    parts.append(
        "**Transport: in-process** (`clinfed.simulation.local_grid`: the real ClientApp, server "
        "loop, strategy and secure-aggregation code; no network, no Ray, messages passed as "
        "objects, the sites served one after another on one core). Round time = training "
        "exchange + evaluation exchange. In a deployment the sites work in parallel and what a "
        "protocol costs is mostly its number of message exchanges (a fresh ClientApp process "
        "and ~3 s polling per message): clinfed's secure aggregation adds **no exchange** — "
        "training is 1 exchange per round with or without it (2 if a site drops mid-round), "
        "against 4 for Flower's SecAgg+."
    )
    parts.append("")
    parts.append(
        f"### Round time (median seconds per round, rounds 2..{data['rounds']} of "
        f"{data['repeats']} federations per variant, ABBA order)"
    )
    parts.append("")
    rows = []
    for key, t in timing.items():
        sites, model = key.split("x")
        plain, secure = median(t.plain), median(t.secure)
        rows.append(
            [
                sites,
                f"{model} ({params[model]:,})",
                f"{plain:.3f}",
                f"{secure:.3f}",
                f"{secure / plain:.2f}",
                f"{secure - plain:+.3f}",
                f"{_ms(median(t.site_sum))} ({_ms(median(t.site_mean))} / {_ms(median(t.site_max))})",
                _ms(median(t.server)),
                _ms(median(t.site_max) + median(t.server)),
                f"{len(t.plain)} / {len(t.secure)}",
            ]
        )
    parts.append(
        markdown_table(
            [
                "sites",
                "model (values)",
                "plain s",
                "secure s",
                "secure / plain",
                "extra s",
                "secure site work ms: all sites (mean / max per site)",
                "secure server work ms",
                "critical path ms (max site + server)",
                "rounds plain / secure",
            ],
            rows,
        )
    )
    parts.append("")
    parts.append(
        '"Secure site work" is measured inside the real code path (flatten the update, load '
        "the site's secure-aggregation state, quantize, derive the pair seeds, expand and add "
        'the masks, pack, save the state); "server work" is opening the round and closing it '
        "(parse, sum, dequantize, rebuild the float32 arrays). In-process the site work of all "
        "sites adds up; with sites in parallel only the slowest site's counts (\"critical "
        'path"). The plain variant instead serialises an ArrayRecord at each site and FedAvg '
        'sums N arrays at the server, so "extra" is a net difference.'
    )
    parts.append("")
    parts.append(
        "### Bytes per site per round (Flower's serialisation: the deflated object tree of each "
        "message)"
    )
    parts.append("")
    rows = []
    for key, variants in traffic.items():
        sites, model = key.split("x")
        model_bytes = 4 * params[model]
        p, s = variants["plain"]["train"], variants["secure"]["train"]
        e = variants["secure"].get("evaluate", {})
        rows.append(
            [
                sites,
                model,
                _kb(model_bytes),
                f"{_kb(p['down_bytes'])} / {_kb(s['down_bytes'])}",
                f"{p['down_bytes'] / model_bytes:.3f} / **{s['down_bytes'] / model_bytes:.3f}**",
                f"{_kb(p['up_bytes'])} / {_kb(s['up_bytes'])}",
                f"{p['up_bytes'] / model_bytes:.3f} / **{s['up_bytes'] / model_bytes:.3f}**",
                f"{s['down_bytes'] - p['down_bytes']:+,.0f} / {s['up_bytes'] - p['up_bytes']:+,.0f}",
                f"{_kb(e.get('down_bytes', 0))} / {_kb(e.get('up_bytes', 0))}",
            ]
        )
    parts.append(
        markdown_table(
            [
                "sites",
                "model",
                "float32 model kB",
                "train down kB plain / secure",
                "down ÷ model",
                "train up kB plain / secure",
                "up ÷ model",
                "secure − plain B, down / up",
                "evaluate down / up kB (both)",
            ],
            rows,
        )
    )
    parts.append("")
    parts.append(
        "Train down = the training request (global model, packed into one float32 array "
        "(`clinfed.wire.PACKED`), + run settings; secure adds the round request: participants' "
        "ids and two 32-byte X25519 public keys each). Train up = the site's reply (plain: its "
        "float32 model, packed; secure: the masked vector, 4 bytes per value + 4, as bytes in a "
        "ConfigRecord) plus metrics in clear. The "
        "evaluation exchange carries the float32 model down in both variants (identical). "
        "Flower's SecAgg+ sends int64 up and float64 down: 2.0x the float32 model each way."
    )
    ser = data.get("serialisation")
    if ser:
        parts.append("")
        parts.append(
            f"Serialisation (Flower's push path: message id, object tree and object bytes with "
            f"ids cached, then the receiver's inflation; what a SuperNode/SuperLink hop costs, "
            f"absent from the in-process path) at {ser['case']}, median per message: training request "
            f"{ser['plain']['down_ms']:.1f} ms plain / {ser['secure']['down_ms']:.1f} ms secure; "
            f"training reply {ser['plain']['up_ms']:.1f} ms plain (ArrayRecord) / "
            f"{ser['secure']['up_ms']:.1f} ms secure (bytes in a ConfigRecord)."
        )
    exch = data["exchanges"]
    parts.append("")
    parts.append("### Message exchanges per round")
    parts.append("")
    parts.append(
        markdown_table(
            ["situation", "exchanges in a round (message types)", "training exchanges"],
            [[row["situation"], row["sequence"], row["training"]] for row in exch],
        )
    )
    parts.append("")
    parts.append(
        "Flower's SecAgg+ (legacy API): 4 exchanges for the training step alone (setup, share "
        "keys, collect masked vectors, unmask) in every round, dropout or not."
    )
    drop = data.get("dropout")
    if drop:
        parts.append("")
        parts.append(
            f"With a dropout the unmask exchange costs {drop['down_bytes']:.0f} B down and "
            f"{drop['up_bytes']:.0f} B up per survivor ({drop['case']})."
        )
    if data.get("ray_error"):
        parts.append("")
        parts.append(f"Flower's simulation engine (Ray): the run failed — {data['ray_error']}")
    ray = data.get("ray")
    if ray:
        plain, secure = median(ray["plain"]), median(ray["secure"])
        parts.append("")
        parts.append(f"### Flower's simulation engine (Ray), {ray['case']}")
        parts.append("")
        parts.append(
            f"`run_simulated_federation`, {ray['runs']} runs alternated, rounds 2..{ray['rounds']}: "
            f"plain {plain:.3f} s, secure {secure:.3f} s per round (median; ratio "
            f"{secure / plain:.2f}, extra {secure - plain:+.3f} s; per-run medians plain "
            f"{min(ray['plain_runs']):.3f}-{max(ray['plain_runs']):.3f} s, secure "
            f"{min(ray['secure_runs']):.3f}-{max(ray['secure_runs']):.3f} s); whole run "
            f"{median(ray['wall']):.1f} s (Ray start-up and shut-down included); means "
            f"{statistics.fmean(ray['plain']):.3f} s plain, {statistics.fmean(ray['secure']):.3f} s "
            "secure. Round times on this engine come in steps of about 0.1 s (the in-memory "
            f"Grid polls for replies every 0.1 s; observed values {_steps(ray['plain'] + ray['secure'])} s), so a "
            "difference below one step cannot be resolved; here the secure median is "
            + ("within one step of" if abs(secure - plain) < 0.1 else "more than one step above")
            + " the plain one. "
            "Flower's SecAgg+ on this engine: 0.53 s vs 0.20 s plain per round (3.05x, 3 sites, "
            "6.3k parameters)."
        )
    prof = data.get("profile")
    if prof:
        parts.append("")
        parts.append(
            f"### Where the time goes — cProfile, {prof['case']}, seconds per round summed over "
            "the sites"
        )
        parts.append("")
        secure_rows = prof["result"]["secure"]
        plain_rows = prof["result"]["plain"]
        rows = [
            [label, f"{secure_rows[label]:.3f}", f"{plain_rows[label]:.3f}"]
            for label in secure_rows
        ]
        parts.append(markdown_table(["step", "secure s/round", "plain s/round"], rows))
        parts.append("")
        parts.append(
            "cProfile inflates Python-heavy steps; the numpy/AES steps are close to their "
            "unprofiled cost. Per site, divide by the number of sites."
        )
    parts.append("")
    parts.append("### Targets")
    parts.append("")
    parts.extend(f"- {line}" for line in data["verdicts"])
    parts.append("")
    parts.append(
        f"Reproduce: `python -m benchmarks.secagg_rounds{' --quick' if quick else ''}` "
        f"({data['minutes']:.1f} min). Raw samples: `benchmarks/out/secagg_rounds"
        f"{'-quick' if quick else ''}.json`."
    )
    parts.append("")
    parts.append(format_environment(env))
    return "\n".join(parts) + "\n"


def verdicts(data: dict[str, Any]) -> list[str]:
    timing: dict[str, Timing] = data["timing"]
    params: dict[str, int] = data["params"]
    out = []
    ratios = {
        k: median(t.secure) / median(t.plain) for k, t in timing.items() if k.startswith("3x")
    }
    if ratios:
        worst = max(ratios, key=lambda k: ratios[k])
        met = ratios[worst] <= TARGET_RATIO_3_SITES
        out.append(
            f"secure / plain round time ≤ {TARGET_RATIO_3_SITES} at 3 sites: "
            f"**{'met' if met else 'missed'}** (worst {ratios[worst]:.2f}, {worst})."
        )
    if "30x1M" in timing:
        t = timing["30x1M"]
        extra = median(t.secure) - median(t.plain)
        critical = median(t.site_max) + median(t.server)
        met = extra <= TARGET_EXTRA_30_1M_S
        out.append(
            f"secure extra per round ≤ {TARGET_EXTRA_30_1M_S:.1f} s at 30 sites x 1M: "
            f"**{'met' if met else 'missed'} on the in-process transport** (extra {extra:.2f} s, "
            f"ratio {median(t.secure) / median(t.plain):.2f}; the 30 sites' secure work runs "
            f"one after another here: {median(t.site_sum):.2f} s summed); with sites in parallel "
            f"the secure work on the critical path is {critical:.2f} s (slowest site "
            f"{median(t.site_max):.3f} s + server {median(t.server):.3f} s). Flower's SecAgg+: "
            f"{FLOWER_EXTRA_30_1M} extra on its Ray simulation."
        )
    per_model: dict[str, tuple[float, str, float]] = {}  # model -> (worst secure, where, plain)
    for key, variants in data["traffic"].items():
        model = key.split("x")[1]
        model_bytes = 4 * params[model]
        for direction in ("down", "up"):
            secure = variants["secure"]["train"][f"{direction}_bytes"] / model_bytes
            plain = variants["plain"]["train"][f"{direction}_bytes"] / model_bytes
            if secure > per_model.get(model, (0.0, "", 0.0))[0]:
                per_model[model] = (secure, f"{key} {direction}", plain)
    if per_model:
        good = [m for m, (r, _, _) in per_model.items() if r <= TARGET_BYTES_RATIO]
        missed = [m for m, (r, _, _) in per_model.items() if r > TARGET_BYTES_RATIO]
        detail = "; ".join(
            f"{m}: worst {r:.3f}x ({where}; plain {plain:.3f}x)"
            for m, (r, where, plain) in per_model.items()
        )
        verdict = "met" if not missed else f"met for {', '.join(good) or 'no model'}"
        if missed:
            verdict += f", missed for {', '.join(missed)}"
        out.append(
            f"bytes per site per round ≤ {TARGET_BYTES_RATIO}x the float32 model each way "
            f"(training exchange): **{verdict}** ({detail}; Flower's SecAgg+ "
            f"{FLOWER_BYTES_RATIO})."
            + (
                " Where missed, the fixed per-message envelope (message metadata, run settings, "
                "array headers, object ids, metrics) that the plain variant pays too is what "
                "exceeds 10 % of a small model; the masked vector itself is 4 bytes per value."
                if missed
                else ""
            )
        )
    return out


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    out["timing"] = {k: dataclasses.asdict(v) for k, v in data["timing"].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test (~1 min)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per federation (5)")
    parser.add_argument("--repeats", type=int, default=None, help="federations per variant (4)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray data point")
    parser.add_argument("--ray", action="store_true", help="run the Ray data point with --quick")
    parser.add_argument(
        "--governance",
        action="store_true",
        help="sites keep the demo policy, ledger and audit log (per-request file I/O)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(verbose=args.verbose)
    torch.set_num_threads(1)
    started = time.monotonic()

    site_counts: tuple[int, ...]
    models: tuple[str, ...]
    if args.quick:
        site_counts, models = (3, 30), ("10k",)
        rounds, repeats = args.rounds or 3, args.repeats or 2
        profile_case_: Case = (30, "10k")
    else:
        site_counts, models = (3, 10, 30), tuple(MODELS)
        rounds, repeats = args.rounds or 5, args.repeats or 4
        profile_case_ = (30, "1M")
    ray_enabled = (not args.no_ray and not args.quick) or args.ray
    name = "secagg_rounds-quick" if args.quick else "secagg_rounds"
    cases: list[Case] = [(n, m) for n in site_counts for m in models]
    data: dict[str, Any] = {
        "governance": args.governance,
        "rounds": rounds,
        "repeats": repeats,
        "params": {m: num_params(m) for m in models},
        "timing": {},
        "traffic": {},
        "exchanges": [],
    }

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {text}", flush=True)
        # Keep what is measured so far: a late failure must not lose a 10-minute run.
        OUT.mkdir(exist_ok=True)
        (OUT / f"{name}.partial.json").write_text(
            json.dumps(_jsonable(data), indent=1), encoding="utf-8"
        )

    with tempfile.TemporaryDirectory(prefix="clinfed-secagg-") as tmp:
        paths = {
            n: make_sites(n, Path(tmp) / f"sites-{n}", governance=args.governance)
            for n in site_counts
        }
        out_dir = str(Path(tmp) / "results")
        # Warm-up (not measured): imports, Opacus, and the DP noise calibration of the timed
        # runs' plan (cached per sampling rate and step count; it would land in round 1 anyway).
        for n in site_counts:
            config = case_config(
                (n, models[0]), paths[n], secure=True, rounds=rounds, output_dir=out_dir
            )
            run_federation(local_grid(config), config.run)
        log("warm-up done")

        # 1. Bytes, serialisation time and exchanges (untimed federations).
        for case in cases:
            key = f"{case[0]}x{case[1]}"
            data["traffic"][key] = {}
            for secure in (False, True):
                traffic = measure_traffic(case, paths[case[0]], secure=secure, tmp=out_dir)
                data["traffic"][key]["secure" if secure else "plain"] = traffic_summary(traffic)
                if case == cases[-1]:
                    data["exchanges"].append(
                        {
                            "situation": f"{'secure' if secure else 'plain'}, no dropout",
                            "sequence": ", ".join(traffic.exchanges[2]),
                            "training": str(
                                sum(1 for x in traffic.exchanges[2] if x != "evaluate")
                            ),
                        }
                    )
            log(f"bytes {key} done")
        biggest = f"{cases[-1][0]}x{cases[-1][1]}"
        data["serialisation"] = {
            "case": f"{cases[-1][0]} sites x {cases[-1][1]}",
            "plain": data["traffic"][biggest]["plain"]["train"],
            "secure": data["traffic"][biggest]["secure"]["train"],
        }
        drop_case: Case = (site_counts[-1] if args.quick else 10, "10k")
        traffic = measure_traffic(
            drop_case, paths[drop_case[0]], secure=True, tmp=out_dir, drop_node_in_round=2
        )
        data["exchanges"].append(
            {
                "situation": "secure, one site's masked update lost in the round",
                "sequence": ", ".join(traffic.exchanges[2]),
                "training": str(sum(1 for x in traffic.exchanges[2] if x != "evaluate")),
            }
        )
        unmask = traffic_summary(traffic).get("unmask")
        if unmask:
            data["dropout"] = {
                "case": f"{drop_case[0]} sites x {drop_case[1]}, one dropped",
                "down_bytes": unmask["down_bytes"],
                "up_bytes": unmask["up_bytes"],
            }
        log("exchanges done")

        # 2. Round time, interleaved.
        for case in cases:
            key = f"{case[0]}x{case[1]}"
            data["timing"][key] = time_case(
                case, paths[case[0]], rounds=rounds, repeats=repeats, tmp=out_dir
            )
            t = data["timing"][key]
            log(
                f"timing {key}: plain {median(t.plain):.3f} s, secure {median(t.secure):.3f} s "
                f"({median(t.secure) / median(t.plain):.2f}x)"
            )

        # 3. Profile of the largest case.
        data["profile"] = {
            "case": f"{profile_case_[0]} sites x {profile_case_[1]}",
            # Same rounds as the timed runs: the DP calibration of that plan is cached.
            "result": profile_case(
                profile_case_, paths[profile_case_[0]], rounds=rounds, tmp=out_dir
            ),
        }
        log("profile done")

        # 4. Ray.
        if ray_enabled:
            ray_case: Case = (3, "10k")
            ray_rounds, ray_repeats = 8, 3
            try:
                samples = ray_point(
                    ray_case, paths[3], rounds=ray_rounds, repeats=ray_repeats, tmp=out_dir
                )
            except Exception as error:  # noqa: BLE001 - reported; the other results stand
                data["ray_error"] = f"{type(error).__name__}: {str(error)[:300]}"
                log(f"Ray FAILED: {data['ray_error']}")
            else:
                data["ray"] = {
                    "case": "3 sites x 10k",
                    "rounds": ray_rounds,
                    "runs": 2 * ray_repeats,
                    **samples,
                }
                log("Ray done")

    data["minutes"] = (time.monotonic() - started) / 60
    data["environment"] = environment()
    data["verdicts"] = verdicts(data)
    text = render(data, quick=args.quick)
    print()
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.partial.json").unlink(missing_ok=True)
    (OUT / f"{name}.md").write_text(text, encoding="utf-8")
    (OUT / f"{name}.json").write_text(json.dumps(_jsonable(data), indent=1), encoding="utf-8")
    if not args.quick and not args.no_write:
        write_section(text)
        print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
