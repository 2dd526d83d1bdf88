"""clinfed's Flower ClientApp: the code a hospital's SuperNode runs for each server request.

The site's own configuration comes from where the site put it — in deployment the SuperNode's
``--node-config 'site-config="/etc/clinfed/site.yaml"'``, in simulation the simulated site list —
never from the run config the server sends.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clinfed import wire
from clinfed.client import report, secure
from clinfed.client.governance import Governance
from clinfed.client.mods import egress_guard_mod
from clinfed.client.site import (
    DPState,
    RoundRequest,
    SiteData,
    check_own_update,
    flat_metrics,
    load_site_data,
    plan_round,
    restore_dp_state,
    run_round,
    schema_fingerprint,
    seeded_bytes,
    site_evaluate,
)
from clinfed.client.training import TrainSettings
from clinfed.config import SiteConfig, load_site_config
from clinfed.errors import ClinfedError, ConfigError, PrivacyError, ProtocolError
from clinfed.models import create_model
from clinfed.models.scaling import FeatureStats, set_standardization
from clinfed.privacy.accountant import DPStep, epsilon_spent

__all__ = ["SiteResolver", "app", "build_client_app", "site_from_node_config"]

logger = logging.getLogger(__name__)
K = wire.Keys
_STATE = "clinfed.dp"

SiteResolver = Callable[[Context], SiteConfig]
"""Finds the site's own :class:`SiteConfig` for a message's context."""


def site_from_node_config(context: Context) -> SiteConfig:
    """The site config named by the SuperNode's ``--node-config site-config=PATH``."""
    path = context.node_config.get("site-config")
    if not isinstance(path, str) or not path:
        raise ConfigError(
            "this SuperNode has no site config: start it with "
            "--node-config 'site-config=\"/etc/clinfed/site.yaml\"'."
        )
    return load_site_config(path)


_SERVER = "the server"


def _request(config: ConfigRecord) -> RoundRequest:
    settings = TrainSettings(
        epochs=wire.read_int(config, K.LOCAL_EPOCHS, sender=_SERVER),
        local_steps=wire.read_int(config, K.LOCAL_STEPS, sender=_SERVER),
        batch_size=wire.read_int(config, K.BATCH_SIZE, sender=_SERVER),
        lr=wire.read_float(config, K.LR, sender=_SERVER),
        momentum=wire.read_float(config, K.MOMENTUM, sender=_SERVER),
        max_grad_norm=wire.read_float(config, K.MAX_GRAD_NORM, sender=_SERVER),
        proximal_mu=wire.read_float(config, K.PROXIMAL_MU, sender=_SERVER, default=0.0),
    )
    request = RoundRequest(
        server_round=wire.read_int(config, K.SERVER_ROUND, sender=_SERVER),
        num_rounds=wire.read_int(config, K.NUM_ROUNDS, sender=_SERVER),
        settings=settings,
        dp=wire.read_bool(config, K.DP, sender=_SERVER),
    )
    s = settings
    if min(s.epochs, s.batch_size, request.num_rounds, request.server_round) < 1 or not (
        s.local_steps >= 0
        and s.lr > 0
        and s.max_grad_norm > 0
        and 0 <= s.momentum < 1
        and s.proximal_mu >= 0
    ):
        raise ProtocolError(f"the server's training settings are out of range: {s}.")
    if request.server_round > request.num_rounds:
        raise PrivacyError(
            f"round {request.server_round} is beyond the {request.num_rounds} rounds the noise "
            "was calibrated for; refused."
        )
    return request


def _model(
    config: ConfigRecord, data: SiteData, arrays: ArrayRecord | None
) -> tuple[torch.nn.Module, ArrayRecord]:
    """The server's model on this site's data layout, and its arrays (unpacked if packed)."""
    model = create_model(
        wire.read_str(config, K.MODEL_NAME, sender=_SERVER),
        num_features=data.num_features,
        num_classes=data.num_classes,
        hidden=wire.read_ints(config, K.MODEL_HIDDEN, sender=_SERVER, default=[]),
        dropout=wire.read_float(config, K.MODEL_DROPOUT, sender=_SERVER, default=0.0),
    )
    if arrays is None:
        raise ProtocolError("the server's request carries no model arrays.")
    if wire.is_packed(arrays):
        arrays = wire.unpack_arrays(arrays, ArrayRecord(model.state_dict()), sender=_SERVER)
    try:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    except (RuntimeError, ValueError, KeyError) as error:
        first = str(error).splitlines()[0]
        raise ProtocolError(
            f"the server's model does not fit this site's data layout: {first}"
        ) from None
    if wire.read_str(config, K.SCALING, sender=_SERVER, default="federated") == "local":
        set_standardization(model, *FeatureStats.of(data.x_train).standardization())
    return model, arrays


def _load_state(context: Context) -> DPState:
    record = context.state.config_records.get(_STATE)
    if record is None:
        return DPState()
    me = "this site's saved state"
    sigmas = wire.read_floats(record, "sigma", sender=me)
    rates = wire.read_floats(record, "rate", sender=me)
    steps = wire.read_ints(record, "steps", sender=me)
    history = [
        DPStep(noise_multiplier=a, sample_rate=b, steps=c)
        for a, b, c in zip(sigmas, rates, steps, strict=True)
    ]
    return DPState(
        plan=wire.read_str(record, "plan", sender=me),
        noise_multiplier=wire.read_float(record, "noise", sender=me),
        history=history,
        non_private_rounds=wire.read_int(record, "non-private-rounds", sender=me),
    )


def _save_state(context: Context, state: DPState) -> None:
    context.state.config_records[_STATE] = ConfigRecord(
        {
            "plan": state.plan,
            "noise": state.noise_multiplier,
            "sigma": [s.noise_multiplier for s in state.history],
            "rate": [s.sample_rate for s in state.history],
            "steps": [s.steps for s in state.history],
            "non-private-rounds": state.non_private_rounds,
        }
    )


def _payload_bytes(reply: Message) -> int:
    """Bytes of model or masked-update payload in a reply (for the audit log)."""
    total = 0
    for record in reply.content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(a.data) for a in record.values())
        elif isinstance(record, ConfigRecord):
            total += sum(len(v) for v in record.values() if isinstance(v, bytes))
    return total


def build_client_app(resolve_site: SiteResolver = site_from_node_config) -> ClientApp:
    """The ClientApp, with the site's configuration found by ``resolve_site``."""
    client_app = ClientApp()

    def audited(
        kind: str, handler: Callable[[Message, Context], Message]
    ) -> Callable[[Message, Context], Message]:
        """Audit a request and its decision around ``handler`` (training audits itself)."""

        def run(msg: Message, context: Context) -> Message:
            try:
                governance = Governance(resolve_site(context))
            except ClinfedError:
                return handler(msg, context)  # the handler raises the same error, reported as is
            governance.audit(kind="request", message=kind, run=str(context.run_id))
            try:
                reply = handler(msg, context)
            except ClinfedError as error:
                governance.audit(
                    kind="decision", decision="refused", message=kind, reason=str(error)
                )
                raise
            governance.audit(
                kind="decision", decision="accepted", message=kind, bytes_sent=_payload_bytes(reply)
            )
            return reply

        return run

    def query_handler(msg: Message, context: Context) -> Message:
        config = msg.content.config_records.get(wire.CONFIG, ConfigRecord())
        kind = wire.read_str(config, K.QUERY, sender=_SERVER)
        if kind == wire.QUERY_SECAGG_UNMASK:
            request = msg.content.config_records.get(wire.SECAGG)
            if request is None:
                raise ProtocolError(
                    "the server's unmask request carries no secure-aggregation record."
                )
            return Message(RecordDict({wire.SECAGG: secure.unmask(context, request)}), reply_to=msg)
        if kind in (wire.QUERY_SITE_REPORT, wire.QUERY_SITE_CONFORMAL):
            return _report(msg, context, config, kind)
        if kind != wire.QUERY_SITE_INFO:
            raise ProtocolError(f"the server sent an unknown query {kind!r}.")
        site = resolve_site(context)
        data = load_site_data(site)
        stats = FeatureStats.of(data.x_train)
        content = RecordDict(
            {
                wire.SITE: ConfigRecord(
                    {
                        K.SITE_NAME: site.name,
                        K.SCHEMA_FINGERPRINT: schema_fingerprint(data.schema),
                        K.NUM_FEATURES: data.num_features,
                        K.NUM_CLASSES: data.num_classes,
                    }
                ),
                wire.STATS: MetricRecord(
                    {
                        K.STATS_COUNT: stats.count,
                        K.STATS_SUM: list(stats.total),
                        K.STATS_SUM_SQ: list(stats.total_sq),
                    }
                ),
            }
        )
        setup = msg.content.config_records.get(wire.SECAGG)
        settings = msg.content.config_records.get(wire.SECAGG_SETTINGS)
        if setup is not None and settings is not None:
            content[wire.SECAGG] = secure.setup_keys(context, setup, settings)
        return Message(content, reply_to=msg)

    def _report(msg: Message, context: Context, config: ConfigRecord, kind: str) -> Message:
        """The site's part of the end-of-run report on the model the server sent (aggregates)."""
        site = resolve_site(context)
        torch.set_num_threads(site.torch_threads)
        data = load_site_data(site)
        model, _ = _model(config, data, msg.content.array_records.get(wire.ARRAYS))
        if kind == wire.QUERY_SITE_REPORT:
            values = report.site_report(model, data, report.read_report_request(config))
        else:
            values = report.site_conformal(
                model,
                data,
                threshold_bin=wire.read_int(config, K.CONFORMAL_THRESHOLD_BIN, sender=_SERVER),
                bins=wire.read_int(config, K.CONFORMAL_BINS, sender=_SERVER),
            )
        Governance(site).check_metrics(values)
        return Message(RecordDict({wire.REPORT: MetricRecord(values)}), reply_to=msg)

    @client_app.train(mods=[egress_guard_mod])
    def train(msg: Message, context: Context) -> Message:
        site = resolve_site(context)
        governance = Governance(site)
        config = msg.content.config_records.get(wire.CONFIG, ConfigRecord())
        # A resumable run (the lab set checkpoint.run_id) keeps its id across server restarts,
        # so the ledger sees one run; otherwise the id is Flower's run id.
        run_id = (
            f"{wire.read_str(config, K.RUN_NAME, sender=_SERVER, default='run')}#"
            f"{wire.read_str(config, K.RUN_ID, sender=_SERVER, default='') or context.run_id}"
        )
        server_round = config.get(K.SERVER_ROUND, 0)
        governance.audit(kind="request", message="train", run=run_id, round=str(server_round))
        try:
            reply, spend = _train(
                msg, context, site=site, governance=governance, config=config, run_id=run_id
            )
        except ClinfedError as error:
            governance.audit(kind="decision", decision="refused", run=run_id, reason=str(error))
            raise
        governance.audit(
            kind="decision",
            decision="accepted",
            run=run_id,
            round=str(server_round),
            bytes_sent=_payload_bytes(reply),
            **spend,
        )
        return reply

    def _train(
        msg: Message,
        context: Context,
        *,
        site: SiteConfig,
        governance: Governance,
        config: ConfigRecord,
        run_id: str,
    ) -> tuple[Message, Mapping[str, float]]:
        torch.set_num_threads(site.torch_threads)
        data = load_site_data(site)
        request = _request(config)
        packed = wire.ARRAYS in msg.content and wire.is_packed(
            msg.content.array_records[wire.ARRAYS]
        )
        model, global_arrays = _model(config, data, msg.content.array_records.get(wire.ARRAYS))
        secagg_request = msg.content.config_records.get(wire.SECAGG)
        state = _load_state(context)
        fresh_state = not state.plan and not state.history
        plan = plan_round(data, request, site=site, state=state)
        resumable = K.RUN_ID in config
        if fresh_state and (request.server_round > 1 or resumable):
            history = governance.run_history(run_id) if resumable else None
            if history is None and not governance.enabled and request.server_round > 1:
                logger.warning(
                    "%s",
                    restore_dp_state(plan, request, site=site, state=state, ledger_history=None),
                )
            elif history:
                logger.warning(
                    "%s",
                    restore_dp_state(plan, request, site=site, state=state, ledger_history=history),
                )
                fresh_state = False
            if state.history or state.non_private_rounds:
                plan = plan_round(data, request, site=site, state=state)
        governance.check_training(
            run_id=run_id,
            request=request,
            plan=plan,
            model=wire.read_str(config, K.MODEL_NAME, sender=_SERVER),
            secure_aggregation=secagg_request is not None,
            metric_keys=wire.TRAIN_METRIC_KEYS,
            fresh_state=fresh_state,
        )
        result = run_round(model, data, request, plan, site=site, state=state)
        epsilon = plan.epsilon_after
        logger.info(
            "site %s round %d: trained on %d records, loss %.4f, epsilon %.4g",
            site.name,
            request.server_round,
            result.num_examples,
            result.mean_loss,
            epsilon,
        )
        metrics: dict[str, int | float] = {
            K.NUM_EXAMPLES: result.num_examples,
            K.TRAIN_LOSS: result.mean_loss,
            K.EPSILON: epsilon,
            K.DELTA: site.privacy.delta,
            K.NOISE_MULTIPLIER: result.noise_multiplier or 0.0,
        }
        assert global_arrays is not None  # checked by _model
        flat_update = secure.flatten_update(global_arrays, model.state_dict())
        check_own_update(
            flat_update,
            site=site.name,
            max_norm=wire.read_float(config, K.MAX_UPDATE_NORM, sender=_SERVER, default=math.inf),
        )
        if secagg_request is None:
            trained = ArrayRecord(model.state_dict())
            update_record: dict[str, ArrayRecord | ConfigRecord] = {
                # answered in the form asked: packed if the server sent the model packed
                wire.ARRAYS: wire.pack_arrays(trained) if packed else trained
            }
        else:
            # Secure aggregation: the model never leaves; its weighted update does, masked.
            total = wire.read_int(config, K.SECAGG_TOTAL_EXAMPLES, sender=_SERVER)
            if total < result.num_examples:
                raise ProtocolError(
                    f"the server's total of training records ({total}) is below this site's own."
                )
            masked, _ = secure.mask_update(
                context,
                secagg_request,
                flat_update,
                weight=result.num_examples / total,
                rounding_bytes=seeded_bytes(site, request.server_round, "secagg-rounding"),
            )
            update_record = {wire.SECAGG: masked}
        # Write-ahead: the spend is durable in the ledger before the update can leave the site.
        spend = governance.record_spend(run_id=run_id, server_round=request.server_round, plan=plan)
        _save_state(context, state)
        reply = Message(
            RecordDict({**update_record, wire.METRICS: MetricRecord(flat_metrics(metrics))}),
            reply_to=msg,
        )
        return reply, spend

    def evaluate_handler(msg: Message, context: Context) -> Message:
        site = resolve_site(context)
        torch.set_num_threads(site.torch_threads)
        data = load_site_data(site)
        config = msg.content.config_records.get(wire.CONFIG, ConfigRecord())
        model, _ = _model(config, data, msg.content.array_records.get(wire.ARRAYS))
        result = site_evaluate(model, data)
        state = _load_state(context)
        spent = (
            math.inf  # trained without DP at least once (only where the site allows it)
            if state.non_private_rounds
            else epsilon_spent(
                state.history, delta=site.privacy.delta, accountant=site.privacy.accountant
            )
        )
        metrics: dict[str, int | float] = {
            K.NUM_EXAMPLES: result.num_examples,
            K.LOSS: result.loss,
            K.ACCURACY: result.accuracy,
            K.ROC_AUC: result.roc_auc,
            K.EPSILON: spent,
        }
        Governance(site).check_metrics(metrics)
        return Message(
            RecordDict({wire.METRICS: MetricRecord(flat_metrics(metrics))}),
            reply_to=msg,
        )

    client_app.query(mods=[egress_guard_mod])(audited("query", query_handler))
    client_app.evaluate(mods=[egress_guard_mod])(audited("evaluate", evaluate_handler))
    return client_app


app = build_client_app()
"""The deployment ClientApp (``flwr run``): site config from ``--node-config site-config=...``."""
