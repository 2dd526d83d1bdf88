"""The server loop: discover the sites, agree on scaling, then train and evaluate round by round.

It drives any Flower current-API strategy through its four methods (``configure_train``,
``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``) and keeps what
``Strategy.start`` does not: every site's own metrics per round, bounded waits, and the events a
lab needs to see (a site refusing, a round without results).

Reliability (README, *Reliability*): every wait is bounded by ``round_timeout_s`` (waiting for
sites to connect, discovery, training, the unmask exchange, evaluation — so a round lasts at most
four timeouts); a round with fewer than ``min_sites`` usable updates is aborted and the previous
model kept; updates are validated before aggregation (:mod:`clinfed.server.validation`); and
with ``checkpoint.dir`` the run's state is written after every round and a restart resumes at the
next one (:mod:`clinfed.server.checkpoint`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from clinfed import wire
from clinfed.config import RunConfig, to_yaml
from clinfed.errors import ConfigError, PrivacyError, ProtocolError
from clinfed.models import create_model
from clinfed.models.scaling import FeatureStats, set_standardization
from clinfed.privacy.secagg import SecAggAbortedError
from clinfed.server.checkpoint import (
    Checkpoint,
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
)
from clinfed.server.results import FederationResult, RoundEvent, RoundRecord, SiteRoundMetrics
from clinfed.server.secure import SecureAggregator, check_secure_model
from clinfed.server.strategies import create_strategy
from clinfed.server.transport import DelegatingGrid, PackingGrid
from clinfed.server.validation import robust_reply, validate_replies

__all__ = ["SiteInfo", "discover_sites", "run_federation"]

logger = logging.getLogger(__name__)
K = wire.Keys


@dataclass(frozen=True)
class SiteInfo:
    """What a site told the server about itself in the discovery query."""

    node_id: int
    name: str
    fingerprint: str
    num_features: int
    num_classes: int
    stats: FeatureStats


def _parse_site_info(reply: Message) -> SiteInfo:
    who = f"node {reply.metadata.src_node_id}"
    site = reply.content.config_records.get(wire.SITE)
    stats = reply.content.metric_records.get(wire.STATS)
    if site is None or stats is None:
        raise ProtocolError(f"{who} answered the discovery query without a site description.")
    info = SiteInfo(
        node_id=reply.metadata.src_node_id,
        name=wire.read_str(site, K.SITE_NAME, sender=who),
        fingerprint=wire.read_str(site, K.SCHEMA_FINGERPRINT, sender=who),
        num_features=wire.read_int(site, K.NUM_FEATURES, sender=who),
        num_classes=wire.read_int(site, K.NUM_CLASSES, sender=who),
        stats=FeatureStats(
            count=wire.read_int(stats, K.STATS_COUNT, sender=who),
            total=tuple(wire.read_floats(stats, K.STATS_SUM, sender=who)),
            total_sq=tuple(wire.read_floats(stats, K.STATS_SUM_SQ, sender=who)),
        ),
    )
    if len(info.stats.total) != info.num_features or len(info.stats.total_sq) != info.num_features:
        raise ProtocolError(f"site {info.name} ({who}) sent aggregates of the wrong length.")
    return info


def discover_sites(
    grid: Grid,
    *,
    min_sites: int,
    timeout_s: float,
    expected_sites: int = 0,
    secure: SecureAggregator | None = None,
    problems: list[tuple[str, str]] | None = None,
    queried: set[int] | None = None,
) -> list[SiteInfo]:
    """Ask every connected site who it is; the sites that answer make up the run.

    Waits (at most ``timeout_s``) until ``expected_sites`` nodes are connected — or ``min_sites``
    when ``expected_sites`` is 0 —, then queries them all (again at most ``timeout_s``). Sites
    still missing when the wait ends do not take part; with at least ``min_sites`` connected the
    run goes on without them, and says so. With ``secure``, the same query carries the
    secure-aggregation key setup (no extra exchange). A node that refuses, sends an answer that
    does not parse, or does not answer in time is logged and appended to ``problems`` as an
    event (kind, detail). The nodes queried are added to ``queried``.
    """
    wanted = max(min_sites, expected_sites)
    deadline = time.monotonic() + timeout_s
    node_ids = list(grid.get_node_ids())
    next_note = time.monotonic()
    while len(node_ids) < wanted:
        if time.monotonic() >= next_note:  # at once, then every 30 s: the wait is visible
            logger.info(
                "discovery: %d of %d expected sites connected; waiting at most %.0f s more",
                len(node_ids),
                wanted,
                max(0.0, deadline - time.monotonic()),
            )
            next_note += 30.0
        if time.monotonic() > deadline:
            if len(node_ids) < min_sites:
                raise ConfigError(
                    f"only {len(node_ids)} site(s) connected within {timeout_s:g} s, but "
                    f"min_sites is {min_sites}. Check that the sites are running, or lower "
                    "min_sites."
                )
            detail = (
                f"only {len(node_ids)} of the {wanted} expected sites connected within "
                f"{timeout_s:g} s; the run goes on without the others (min_sites is {min_sites})"
            )
            logger.warning("%s", detail)
            if problems is not None:
                problems.append(("discovery-incomplete", detail))
            break
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    messages = [
        Message(
            RecordDict(
                {
                    wire.CONFIG: ConfigRecord({K.QUERY: wire.QUERY_SITE_INFO}),
                    **(secure.setup_records(node) if secure else {}),
                }
            ),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in node_ids
    ]
    if queried is not None:
        queried.update(node_ids)
    sites: list[SiteInfo] = []
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    for node in sorted(set(node_ids) - {r.metadata.src_node_id for r in replies}):
        reason = f"no answer to the discovery query within {timeout_s:g} s"
        logger.error("node %s did not join: %s", node, reason)
        if problems is not None:
            problems.append(("discovery-no-answer", f"node {node}: {reason}"))
    for reply in replies:
        if reply.has_error():
            reason = _reason(reply.error.reason)
            logger.error("node %s did not join: %s", reply.metadata.src_node_id, reason)
            if problems is not None:
                problems.append(
                    ("discovery-refused", f"node {reply.metadata.src_node_id}: {reason}")
                )
            continue
        try:
            info = _parse_site_info(reply)
            if secure is not None:
                secure.register(reply, name=info.name, num_examples=info.stats.count)
        except ProtocolError as error:
            # One malformed answer must not stop the federation: that node does not join.
            logger.error("node %s did not join: %s", reply.metadata.src_node_id, error)
            if problems is not None:
                problems.append(
                    ("discovery-refused", f"node {reply.metadata.src_node_id}: {error}")
                )
            continue
        sites.append(info)
    sites.sort(key=lambda s: s.name)
    if len(sites) < min_sites:
        raise ConfigError(
            f"only {len(sites)} site(s) answered the discovery query ({', '.join(s.name for s in sites) or 'none'}); "
            f"min_sites is {min_sites}. See the sites' logs."
        )
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"two connected sites share a name: {names}. Each site needs its own name."
        )
    layouts = {(s.fingerprint, s.num_features, s.num_classes) for s in sites}
    if len(layouts) != 1:
        detail = ", ".join(
            f"{s.name}: {s.num_features} features/{s.num_classes} classes ({s.fingerprint})"
            for s in sites
        )
        raise ConfigError(
            f"the sites' data schemas disagree ({detail}). Every site must use the same schema file."
        )
    return sites


def _initial_model(config: RunConfig, sites: list[SiteInfo]) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    model = create_model(
        config.model.name,
        num_features=sites[0].num_features,
        num_classes=sites[0].num_classes,
        hidden=list(config.model.hidden),
        dropout=config.model.dropout,
    )
    if config.scaling == "federated":
        pooled = sites[0].stats
        for s in sites[1:]:
            pooled = pooled + s.stats
        set_standardization(model, *pooled.standardization())
    return model


def _train_config(config: RunConfig) -> ConfigRecord:
    t, m = config.train, config.model
    return ConfigRecord(
        {
            K.RUN_NAME: config.name,
            K.NUM_ROUNDS: config.rounds,
            K.LOCAL_EPOCHS: t.local_epochs,
            K.LOCAL_STEPS: t.local_steps,
            K.BATCH_SIZE: t.batch_size,
            K.LR: float(t.lr),
            K.MOMENTUM: float(t.momentum),
            K.MAX_GRAD_NORM: float(t.max_grad_norm),
            K.DP: t.dp,
            K.MODEL_NAME: m.name,
            K.MODEL_HIDDEN: [int(h) for h in m.hidden],
            K.MODEL_DROPOUT: float(m.dropout),
            K.SCALING: config.scaling,
            K.MAX_UPDATE_NORM: float(config.validation.max_update_norm),
            **({K.RUN_ID: config.checkpoint.run_id} if config.checkpoint.run_id else {}),
        }
    )


def _reason(raw: str | None) -> str:
    """The site's own one-line reason out of the wrapping a Flower engine puts around it.

    Flower reports a ClientApp exception as ``<class 'T'>:<'text'>``, where ``text`` may itself
    wrap the site's message after ``Message: ``.
    """
    text = (raw or "").strip()
    wrapped = re.fullmatch(r"<class '[^']*'>:<'(.*)'>", text, flags=re.DOTALL)
    if wrapped:
        text = wrapped.group(1)
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"


def _record(
    replies: Iterable[Message],
    server_round: int,
    phase: str,
    names: dict[int, str],
    result: FederationResult,
    *,
    malformed: set[int] | None = None,
) -> list[Message]:
    kept = list(replies)
    for reply in kept:
        site = names.get(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}")
        if reply.has_error():
            detail = _reason(reply.error.reason)
            result.metrics.append(
                SiteRoundMetrics(server_round, site, phase, 0, math.nan, error=detail)
            )
            result.events.append(RoundEvent(server_round, f"{phase}-refused", f"{site}: {detail}"))
            logger.warning(
                "round %d %s: site %s replied with an error: %s", server_round, phase, site, detail
            )
            continue
        m = reply.content.metric_records.get(wire.METRICS, MetricRecord())
        who = f"site {site}"
        try:
            row = SiteRoundMetrics(
                round=server_round,
                site=site,
                phase=phase,
                num_examples=wire.read_int(m, K.NUM_EXAMPLES, sender=who),
                loss=wire.read_float(
                    m, K.TRAIN_LOSS if phase == "train" else K.LOSS, sender=who, default=math.nan
                ),
                accuracy=wire.read_float(m, K.ACCURACY, sender=who, default=math.nan),
                roc_auc=wire.read_float(m, K.ROC_AUC, sender=who, default=math.nan),
                epsilon=wire.read_float(m, K.EPSILON, sender=who, default=math.nan),
            )
        except ProtocolError as error:
            # A malformed reply is named and set aside; the round goes on with the others.
            if malformed is not None:
                malformed.add(reply.metadata.src_node_id)
            result.metrics.append(
                SiteRoundMetrics(server_round, site, phase, 0, math.nan, error=str(error))
            )
            result.events.append(RoundEvent(server_round, f"{phase}-malformed", f"{site}: {error}"))
            logger.error(
                "round %d %s: malformed reply from site %s: %s", server_round, phase, site, error
            )
            continue
        result.metrics.append(row)
    return kept


def _log_round(
    result: FederationResult, server_round: int, num_rounds: int, seconds: float
) -> None:
    parts = []
    eps = {
        m.site: m.epsilon
        for m in result.metrics
        if m.round == server_round and m.phase == "train" and not m.error
    }
    for m in result.metrics:
        if m.round == server_round and m.phase == "evaluate" and not m.error:
            parts.append(
                f"{m.site} acc {m.accuracy:.3f} auc {m.roc_auc:.3f} eps {eps.get(m.site, math.nan):.3g}"
            )
    logger.info(
        "round %d/%d (%.1f s) | %s",
        server_round,
        num_rounds,
        seconds,
        " | ".join(parts) or "no results",
    )


def _cast_like(new: ArrayRecord, old: ArrayRecord) -> ArrayRecord:
    """``new`` in ``old``'s dtypes: the global model keeps its dtype whatever the strategy computes.

    Flower's FedAdam returns float64 arrays (NumPy promotion); sent on, they would double the
    downlink and no longer match the model a site trains, whose egress guard then refuses.
    """
    if all(new[k].dtype == old[k].dtype for k in old):
        return new
    return ArrayRecord({k: torch.from_numpy(new[k].numpy().astype(old[k].dtype)) for k in old})


def _connected(grid: Grid, names: dict[int, str]) -> list[int]:
    """The discovered sites' nodes that are connected now."""
    return [n for n in grid.get_node_ids() if n in names]


def _wait_for_sites(
    grid: Grid, min_sites: int, timeout_s: float, names: dict[int, str]
) -> list[int] | None:
    """Wait (bounded) until ``min_sites`` of the discovered sites are connected; their nodes.

    Flower's strategies sample nodes with no time limit; they are handed a fixed snapshot of the
    nodes found here (:class:`_FixedNodes`), so that no later wait can be unbounded.
    """
    deadline = time.monotonic() + timeout_s
    while len(nodes := _connected(grid, names)) < min_sites:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)
    return nodes


def _report_latecomers(
    grid: Grid, known: set[int], server_round: int, result: FederationResult
) -> None:
    """Name each node that connected after discovery, once: it takes no part in this run."""
    for node in grid.get_node_ids():
        if node in known:
            continue
        known.add(node)
        detail = (
            f"node {node} connected after discovery and takes no part in this run; start every "
            "site before launching the run (or set expected_sites so that discovery waits for it)"
        )
        result.events.append(RoundEvent(server_round, "late-node-ignored", detail))
        logger.warning("round %d: %s", server_round, detail)


class _FixedNodes(DelegatingGrid):
    """``grid`` with a fixed list of connected nodes, for a strategy's ``configure_*`` calls.

    Flower's ``sample_nodes`` waits *without a time limit* until enough nodes are connected; with
    the list fixed (and long enough, checked before), it returns at once. Everything else is
    delegated to the real grid.
    """

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        super().__init__(grid)
        self._nodes = list(nodes)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def get_nodes(self) -> Iterable[NodeInfo]:
        fixed = set(self._nodes)
        return [n for n in self._grid.get_nodes() if n.node_id in fixed]


_Outcome = tuple[ArrayRecord | None, str]
"""A training phase's new global model (``None``: aborted, model kept) and its detail line."""


def _secure_train_round(
    *,
    grid: Grid,
    strategy: Strategy,
    secure: SecureAggregator,
    server_round: int,
    messages: list[Message],
    arrays: ArrayRecord,
    config: RunConfig,
    names: dict[int, str],
    result: FederationResult,
) -> _Outcome:
    """One training round with secure aggregation."""
    timeout = config.round_timeout_s
    try:
        messages, secure_round = secure.open_round(
            server_round, messages, arrays=arrays, timeout_s=timeout
        )
    except SecAggAbortedError as error:
        missing = ", ".join(secure.names(error.missing)) or "none"
        detail = f"too few sites at round start; absent: {missing}"
        result.events.append(RoundEvent(server_round, "secagg-aborted", detail))
        logger.error("round %d aborted before training: %s", server_round, error)
        return None, detail
    replies = _record(
        grid.send_and_receive(messages, timeout=timeout), server_round, "train", names, result
    )
    clear = {
        m.site: (m.num_examples, m.loss)
        for m in result.metrics
        if m.round == server_round and m.phase == "train" and not m.error
    }
    try:
        outcome = secure.close_round(
            grid, secure_round, replies, arrays=arrays, train_metrics=clear, timeout_s=timeout
        )
    except SecAggAbortedError as error:
        missing = ", ".join(secure.names(error.missing)) or "none"
        detail = f"fewer surviving sites than the threshold; missing: {missing}"
        result.events.append(RoundEvent(server_round, "secagg-aborted", detail))
        logger.error("round %d aborted, global model kept: %s", server_round, error)
        return None, detail
    except (PrivacyError, ProtocolError) as error:
        result.events.append(RoundEvent(server_round, "secagg-aborted", str(error)))
        logger.error("round %d aborted, global model kept: %s", server_round, error)
        return None, str(error)
    for detail in outcome.rejected:
        result.events.append(RoundEvent(server_round, "secagg-rejected", detail))
    if outcome.dropped:
        result.events.append(
            RoundEvent(
                server_round,
                "secagg-dropout",
                f"{', '.join(outcome.dropped)} dropped; sum of {', '.join(outcome.contributors)} "
                f"recovered in {outcome.exchanges} exchanges",
            )
        )
    if outcome.out_of_range:
        detail = (
            f"{outcome.out_of_range} update values outside [-{config.secure_aggregation.clip_range:g}, "
            f"{config.secure_aggregation.clip_range:g}] were clipped (raise secure_aggregation.clip_range)"
        )
        if config.secure_aggregation.on_out_of_range == "fail-round":
            result.events.append(RoundEvent(server_round, "secagg-out-of-range-failed", detail))
            logger.error("round %d failed: %s", server_round, detail)
            return None, detail
        result.events.append(RoundEvent(server_round, "secagg-out-of-range", detail))
        logger.warning("round %d: %s", server_round, detail)
    if len(outcome.contributors) < config.min_sites:
        detail = (
            f"only {len(outcome.contributors)} site(s) contributed "
            f"({', '.join(outcome.contributors)}), min_sites is {config.min_sites}"
        )
        result.events.append(RoundEvent(server_round, "round-aborted", detail))
        logger.error("round %d aborted, global model kept: %s", server_round, detail)
        return None, detail
    new_arrays, _ = strategy.aggregate_train(server_round, [outcome.reply])
    if new_arrays is None:
        return None, "the strategy produced no model"
    return new_arrays, f"sum of {', '.join(sorted(outcome.contributors))}"


def _plain_train_round(
    *,
    grid: Grid,
    strategy: Strategy,
    server_round: int,
    messages: list[Message],
    arrays: ArrayRecord,
    config: RunConfig,
    names: dict[int, str],
    declared: dict[str, int],
    result: FederationResult,
) -> _Outcome:
    """One training round without secure aggregation: validate, then aggregate the others."""
    malformed: set[int] = set()
    replies = _record(
        grid.send_and_receive(messages, timeout=config.round_timeout_s),
        server_round,
        "train",
        names,
        result,
        malformed=malformed,
    )
    kept, rejected = validate_replies(
        [r for r in replies if r.metadata.src_node_id not in malformed],
        arrays,
        names=names,
        max_update_norm=config.validation.max_update_norm,
        declared_examples=declared,
    )
    for r in rejected:
        result.events.append(RoundEvent(server_round, "update-rejected", f"{r.site}: {r.reason}"))
    # A fixed order (by site name) makes the aggregate independent of arrival order, so that a
    # resumed run reproduces an uninterrupted one bit for bit.
    kept.sort(key=lambda m: names.get(m.metadata.src_node_id, ""))
    contributors = [names.get(m.metadata.src_node_id, "?") for m in kept]
    if len(kept) < config.min_sites:
        detail = (
            f"only {len(kept)} valid update(s) ({', '.join(contributors) or 'none'}), "
            f"min_sites is {config.min_sites}"
        )
        result.events.append(RoundEvent(server_round, "round-aborted", detail))
        logger.error("round %d aborted, global model kept: %s", server_round, detail)
        return None, detail
    robust = config.robust_aggregation
    to_aggregate = kept if robust.method == "none" else [robust_reply(kept, robust)]
    new_arrays, _ = strategy.aggregate_train(server_round, to_aggregate)
    if new_arrays is None:
        return None, "the strategy produced no model"
    detail = f"{len(kept)} update(s) aggregated"
    if rejected:
        detail += f"; rejected: {', '.join(r.site for r in rejected)}"
    return new_arrays, detail


def _layout(sites: list[SiteInfo]) -> str:
    s = sites[0]
    return f"{s.fingerprint}/{s.num_features}/{s.num_classes}"


def _resume(result: FederationResult, checkpoint: Checkpoint, sites: list[SiteInfo]) -> None:
    result.metrics.extend(checkpoint.metrics)
    result.events.extend(checkpoint.events)
    result.rounds.extend(checkpoint.rounds)
    result.round_seconds.extend(checkpoint.round_seconds)
    result.sites = sorted(set(result.sites) | set(checkpoint.sites))
    result.resumed_from = checkpoint.last_round
    spend = ", ".join(f"{k} {v:.3g}" for k, v in sorted(checkpoint.privacy.items()))
    detail = (
        f"resumed from the checkpoint after round {checkpoint.last_round} with "
        f"{', '.join(s.name for s in sites)}; epsilon reported so far: {spend or 'none'}"
    )
    result.events.append(RoundEvent(checkpoint.last_round + 1, "resumed", detail))
    logger.warning("%s", detail)


def run_federation(
    grid: Grid,
    config: RunConfig,
    *,
    on_round_end: Callable[[FederationResult], None] | None = None,
) -> FederationResult:
    """Run ``config.rounds`` rounds of federated training with per-site evaluation.

    With ``config.checkpoint.dir`` set, the run's state is checkpointed after every round and a
    run restarted with the same ``checkpoint.run_id`` resumes after the last checkpointed round.
    ``on_round_end`` is called after every round (completed or not), once its checkpoint is
    written.
    """
    started = time.monotonic()
    checkpoint = load_checkpoint(config) if config.checkpoint.dir else None
    if checkpoint is not None and checkpoint.stopped:
        raise ConfigError(
            f"run {config.checkpoint.run_id!r} was stopped after round {checkpoint.last_round} "
            f"({checkpoint.stopped}); it cannot be resumed. Start a new run with another "
            "checkpoint.run_id."
        )
    if checkpoint is not None and checkpoint.last_round >= config.rounds:
        logger.warning(
            "run %r already completed its %d rounds (checkpoint); nothing to do",
            config.checkpoint.run_id,
            config.rounds,
        )
        done = FederationResult(
            run_name=config.name,
            sites=list(checkpoint.sites),
            secure_aggregation=config.secure_aggregation.enabled,
            dp=config.train.dp,
            config_yaml=to_yaml(config),
        )
        done.metrics, done.events = list(checkpoint.metrics), list(checkpoint.events)
        done.rounds, done.round_seconds = list(checkpoint.rounds), list(checkpoint.round_seconds)
        done.resumed_from = checkpoint.last_round
        done.final_state = dict(checkpoint.arrays)
        return done
    secure = (
        SecureAggregator(config.secure_aggregation) if config.secure_aggregation.enabled else None
    )
    if secure is None:
        logger.warning(
            "secure aggregation is OFF (secure_aggregation.enabled=false): the server sees every "
            "site's individual model update"
        )
    problems: list[tuple[str, str]] = []
    queried: set[int] = set()
    sites = discover_sites(
        grid,
        min_sites=config.min_sites,
        timeout_s=config.round_timeout_s,
        expected_sites=config.expected_sites,
        secure=secure,
        problems=problems,
        queried=queried,
    )
    names = {s.node_id: s.name for s in sites}
    declared = {s.name: s.stats.count for s in sites}
    logger.info(
        "federation of %d sites: %s (%d training records in all)",
        len(sites),
        ", ".join(f"{s.name} ({s.stats.count})" for s in sites),
        sum(s.stats.count for s in sites),
    )
    strategy = create_strategy(config.strategy, min_sites=config.min_sites)
    if checkpoint is None:
        arrays = ArrayRecord(_initial_model(config, sites).state_dict())
    else:
        if checkpoint.layout != _layout(sites):
            raise ConfigError(
                f"the sites' data layout ({_layout(sites)}) differs from the checkpointed run's "
                f"({checkpoint.layout}); a run can only resume on the same schema."
            )
        # The checkpoint's model, not a new one: it carries the scaling agreed at the start.
        arrays = checkpoint.global_arrays
        restore_strategy_state(strategy, checkpoint.strategy)
    # The model travels as one packed array each way (Flower's per-array envelope paid once);
    # a model mixing dtypes cannot be packed and travels array by array.
    with contextlib.suppress(ValueError):
        grid = PackingGrid(grid, arrays)
    if secure is not None:
        check_secure_model(arrays)
    result = FederationResult(
        run_name=config.name,
        sites=[s.name for s in sites],
        secure_aggregation=secure is not None,
        dp=config.train.dp,
        config_yaml=to_yaml(config),
    )
    first_round = 1
    if checkpoint is not None:
        _resume(result, checkpoint, sites)
        first_round = checkpoint.last_round + 1
    result.events.extend(RoundEvent(first_round - 1, kind, detail) for kind, detail in problems)
    result.setup_seconds = time.monotonic() - started
    train_config = _train_config(config)
    for server_round in range(first_round, config.rounds + 1):
        round_start = time.monotonic()
        stop = ""
        nodes = _wait_for_sites(grid, config.min_sites, config.round_timeout_s, names)
        if nodes is None:
            connected = len(_connected(grid, names))
            detail = (
                f"only {connected} site(s) connected, min_sites is {config.min_sites}; model kept"
            )
            result.events.append(RoundEvent(server_round, "round-skipped", detail))
            result.rounds.append(RoundRecord(server_round, "aborted", detail))
            logger.error("round %d skipped: %s", server_round, detail)
            result.round_seconds.append(time.monotonic() - round_start)
            _end_round(
                config,
                server_round,
                arrays=arrays,
                strategy=strategy,
                result=result,
                sites=sites,
                stopped="",
                on_round_end=on_round_end,
            )
            continue
        # Only sites that joined at discovery take part (a node that refused, or connected
        # later, has no agreed schema, scaling or secure-aggregation keys).
        _report_latecomers(grid, queried, server_round, result)
        fixed = _FixedNodes(grid, nodes)
        messages = list(
            strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), fixed)
        )
        if secure is None:
            new_arrays, detail = _plain_train_round(
                grid=grid,
                strategy=strategy,
                server_round=server_round,
                messages=messages,
                arrays=arrays,
                config=config,
                names=names,
                declared=declared,
                result=result,
            )
        else:
            new_arrays, detail = _secure_train_round(
                grid=grid,
                strategy=strategy,
                secure=secure,
                server_round=server_round,
                messages=messages,
                arrays=arrays,
                config=config,
                names=names,
                result=result,
            )
        if new_arrays is None:
            result.rounds.append(RoundRecord(server_round, "aborted", detail))
            logger.warning("round %d: the global model is unchanged", server_round)
            if (
                secure is not None
                and config.secure_aggregation.on_abort == "stop"
                and any(
                    e.round == server_round and e.kind.startswith("secagg-") for e in result.events
                )
            ):
                result.round_seconds.append(time.monotonic() - round_start)
                result.events.append(
                    RoundEvent(server_round, "run-stopped", "secure_aggregation.on_abort=stop")
                )
                _end_round(
                    config,
                    server_round,
                    arrays=arrays,
                    strategy=strategy,
                    result=result,
                    sites=sites,
                    stopped="secure_aggregation.on_abort=stop",
                    on_round_end=None,
                )
                break
        else:
            arrays = _cast_like(new_arrays, arrays)
            result.rounds.append(RoundRecord(server_round, "completed", detail))
        eval_messages = list(
            strategy.configure_evaluate(
                server_round, arrays, ConfigRecord(dict(train_config)), fixed
            )
        )
        eval_malformed: set[int] = set()
        eval_replies = _record(
            grid.send_and_receive(eval_messages, timeout=config.round_timeout_s),
            server_round,
            "evaluate",
            names,
            result,
            malformed=eval_malformed,
        )
        strategy.aggregate_evaluate(
            server_round, [r for r in eval_replies if r.metadata.src_node_id not in eval_malformed]
        )
        result.round_seconds.append(time.monotonic() - round_start)
        _log_round(result, server_round, config.rounds, result.round_seconds[-1])
        refused = [
            e for e in result.events if e.round == server_round and e.kind.endswith("-refused")
        ]
        if refused and config.on_site_refusal == "stop":
            stop = f"{len(refused)} site refusal(s); on_site_refusal=stop"
            result.events.append(RoundEvent(server_round, "run-stopped", stop))
            logger.error(
                "stopping the run after round %d: a site refused (on_site_refusal=stop)",
                server_round,
            )
        _end_round(
            config,
            server_round,
            arrays=arrays,
            strategy=strategy,
            result=result,
            sites=sites,
            stopped=stop,
            on_round_end=on_round_end,
        )
        if stop:
            break
    if config.report.enabled:
        # The end-of-run report: each site's aggregates on the final model (server/evaluation.py).
        from clinfed.server.evaluation import evaluate_final_model  # noqa: PLC0415 - cycle

        result.evaluation = evaluate_final_model(
            grid,
            config,
            arrays=arrays,
            names=names,
            model_config=train_config,
            epsilons={s: m.epsilon for s, m in result.final("train").items()},
        )
    result.final_state = arrays.to_torch_state_dict()
    return result


def _end_round(
    config: RunConfig,
    server_round: int,
    *,
    arrays: ArrayRecord,
    strategy: Strategy,
    result: FederationResult,
    sites: list[SiteInfo],
    stopped: str,
    on_round_end: Callable[[FederationResult], None] | None,
) -> None:
    """Checkpoint the round (when configured), then tell the caller."""
    if config.checkpoint.dir:
        save_checkpoint(
            config,
            last_round=server_round,
            arrays=arrays,
            strategy=strategy,
            result=result,
            layout=_layout(sites),
            stopped=stopped,
        )
    if on_round_end is not None:
        on_round_end(result)
