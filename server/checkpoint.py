"""Checkpoint and resume: after every round the server's whole state is on disk, atomically.

A checkpoint holds what the next round needs and what the run has produced so far: the global
model, the strategy's own state (e.g. FedAdam's moments ``m_t``/``v_t``), the last round handled
(completed or aborted), every site's metrics and every event so far, each site's reported privacy
spend, and a fingerprint of the run config. It is one file, ``DIR/RUN_ID/checkpoint.pt``, written
to a temporary file, fsync'd and renamed over the previous one (``os.replace``): a crash at any
point leaves either the previous round's checkpoint or this round's, never a torn one.

Restarting with the same ``checkpoint.run_id`` resumes at the next round. Resuming needs the same
run config (a different one is refused with the keys that differ): the sites' noise was calibrated
for the run's plan, and the strategy's state belongs to its hyper-parameters. A resumed run ends
with the same final model as an uninterrupted one when the sites' randomness is a function of
(seed, site, round) — simulations with ``noise_seed`` — see the README's *Reliability* section.

The file is read with ``torch.load(weights_only=True)``: tensors and plain Python values only, no
code runs when a checkpoint is loaded.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from clinfed.config import RunConfig, to_yaml
from clinfed.errors import ConfigError
from clinfed.server.results import (
    FederationResult,
    RoundEvent,
    RoundRecord,
    SiteRoundMetrics,
    _atomic_write,
)

__all__ = [
    "Checkpoint",
    "checkpoint_path",
    "load_checkpoint",
    "restore_strategy_state",
    "save_checkpoint",
    "strategy_state",
]

logger = logging.getLogger(__name__)

_FORMAT: Final = "clinfed-checkpoint/1"
_FILE: Final = "checkpoint.pt"
_SKIP_ATTRIBUTES: Final = frozenset({"current_arrays"})
"""Rebuilt by the strategy's ``configure_train`` every round from the global model."""
_MAY_CHANGE: Final = frozenset({"output_dir", "round_timeout_s"})
"""Run settings a resumed run may change: they affect neither the model nor the sites' plan."""


@dataclass
class Checkpoint:
    """What the server needs to go on after round ``last_round`` (see the module docstring)."""

    run_id: str
    config_yaml: str
    last_round: int
    arrays: dict[str, torch.Tensor]
    strategy: dict[str, dict[str, torch.Tensor]]
    sites: list[str]
    layout: str
    metrics: list[SiteRoundMetrics] = field(default_factory=list)
    events: list[RoundEvent] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    setup_seconds: float = 0.0
    privacy: dict[str, float] = field(default_factory=dict)
    stopped: str = ""

    @property
    def global_arrays(self) -> ArrayRecord:
        return ArrayRecord(self.arrays)


def checkpoint_path(config: RunConfig) -> Path:
    """``checkpoint.dir/checkpoint.run_id/checkpoint.pt``."""
    c = config.checkpoint
    return Path(c.dir) / c.run_id / _FILE


def strategy_state(strategy: Strategy) -> dict[str, dict[str, torch.Tensor]]:
    """The strategy's learned state: every attribute holding a dict of arrays.

    Flower's current-API strategies keep their hyper-parameters as scalars (rebuilt from the run
    config) and their state across rounds as ``{name: ndarray}`` dicts (FedAdam/FedYogi/FedAdagrad:
    ``m_t``, ``v_t``); ``current_arrays`` is skipped, ``configure_train`` sets it each round.
    """
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in vars(strategy).items():
        if name in _SKIP_ATTRIBUTES or not isinstance(value, dict) or not value:
            continue
        if all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items()):
            state[name] = {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
    return state


def restore_strategy_state(
    strategy: Strategy, state: Mapping[str, Mapping[str, torch.Tensor]]
) -> None:
    """Put ``state`` (from :func:`strategy_state`) back on a freshly built strategy."""
    for name, arrays in state.items():
        if not hasattr(strategy, name):
            raise ConfigError(
                f"the checkpoint holds strategy state {name!r} that a "
                f"{type(strategy).__name__} does not have; resume with the strategy it was "
                "written with."
            )
        setattr(strategy, name, {k: t.numpy().copy() for k, t in arrays.items()})


def _digest(config_yaml: str) -> str:
    return hashlib.sha256(config_yaml.encode()).hexdigest()


def save_checkpoint(
    config: RunConfig,
    *,
    last_round: int,
    arrays: ArrayRecord,
    strategy: Strategy,
    result: FederationResult,
    layout: str,
    stopped: str = "",
) -> Path:
    """Write the run's state after ``last_round``, atomically (temp file, fsync, rename)."""
    path = checkpoint_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    privacy: dict[str, float] = {}
    for m in result.metrics:  # the last ε each site reported (cumulative over the run)
        if m.phase == "train" and not m.error and not math.isnan(m.epsilon):
            privacy[m.site] = m.epsilon
    document: dict[str, Any] = {
        "format": _FORMAT,
        "run_id": config.checkpoint.run_id,
        "config_yaml": result.config_yaml,
        "config_digest": _digest(result.config_yaml),
        "last_round": last_round,
        "arrays": {k: t.clone() for k, t in arrays.to_torch_state_dict().items()},
        "strategy": strategy_state(strategy),
        "sites": list(result.sites),
        "layout": layout,
        "metrics": [asdict(m) for m in result.metrics],
        "events": [asdict(e) for e in result.events],
        "rounds": [asdict(r) for r in result.rounds],
        "round_seconds": list(result.round_seconds),
        "setup_seconds": result.setup_seconds,
        "privacy": privacy,
        "stopped": stopped,
    }
    buffer = io.BytesIO()
    torch.save(document, buffer)
    _atomic_write(path, buffer.getvalue())
    logger.debug("checkpoint after round %d written to %s", last_round, path)
    return path


def _differing_keys(old_yaml: str, new_yaml: str) -> list[str]:
    from omegaconf import OmegaConf  # noqa: PLC0415 - only needed on a mismatch

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        if isinstance(node, dict):
            for k, v in node.items():
                out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix.rstrip(".")] = node
        return out

    old = flat(OmegaConf.to_container(OmegaConf.create(old_yaml)))
    new = flat(OmegaConf.to_container(OmegaConf.create(new_yaml)))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def load_checkpoint(config: RunConfig) -> Checkpoint | None:
    """The run's checkpoint, or ``None`` when the run has none yet (a new run).

    Raises :class:`~clinfed.errors.ConfigError` (one line) for a damaged or foreign checkpoint,
    or one written with a different run config.
    """
    path = checkpoint_path(config)
    if not path.exists():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a damaged checkpoint
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"checkpoint {path} is unreadable ({first}). Restore it from a backup, or start the "
            "run under a new checkpoint.run_id."
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
        raise ConfigError(
            f"checkpoint {path} is not a {_FORMAT} file. Restore it from a backup, or use a new "
            "checkpoint.run_id."
        )
    try:
        if raw["config_digest"] != _digest(raw["config_yaml"]):
            raise KeyError("config_digest")
        checkpoint = Checkpoint(
            run_id=str(raw["run_id"]),
            config_yaml=str(raw["config_yaml"]),
            last_round=int(raw["last_round"]),
            arrays=dict(raw["arrays"]),
            strategy={k: dict(v) for k, v in raw["strategy"].items()},
            sites=[str(s) for s in raw["sites"]],
            layout=str(raw["layout"]),
            metrics=[SiteRoundMetrics(**m) for m in raw["metrics"]],
            events=[RoundEvent(**e) for e in raw["events"]],
            rounds=[RoundRecord(**r) for r in raw["rounds"]],
            round_seconds=[float(s) for s in raw["round_seconds"]],
            setup_seconds=float(raw["setup_seconds"]),
            privacy={str(k): float(v) for k, v in raw["privacy"].items()},
            stopped=str(raw["stopped"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ConfigError(
            f"checkpoint {path} is damaged (field {error}). Restore it from a backup, or use a "
            "new checkpoint.run_id."
        ) from None
    if checkpoint.run_id != config.checkpoint.run_id:
        raise ConfigError(
            f"checkpoint {path} belongs to run {checkpoint.run_id!r}, not "
            f"{config.checkpoint.run_id!r}; it was moved or copied. Use its own run id."
        )
    current = to_yaml(config)
    keys = (
        [k for k in _differing_keys(checkpoint.config_yaml, current) if k not in _MAY_CHANGE]
        if current != checkpoint.config_yaml
        else []
    )
    if keys:
        raise ConfigError(
            f"checkpoint {path} was written with a different run config (differs in: "
            f"{', '.join(keys)}). Resume with the same settings, or start a new "
            "run with another checkpoint.run_id."
        )
    return checkpoint
