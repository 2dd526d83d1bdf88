"""The server's side of secure aggregation, wrapped around any strategy's training round.

The strategy still decides who trains and how updates combine; this module replaces what travels:
each site sends its weighted, quantized, masked update instead of its model, and the server
recovers only the sum (:mod:`clinfed.privacy.secagg`; design and security argument in
``privacy/secagg/DESIGN.md`` and the README's threat model). The sum is handed to the strategy as
a single reply holding the weighted mean, so FedAvg, FedProx and FedAdam aggregate it unchanged.

Per round: one exchange when every participant answers (the training exchange itself), two when
a site drops during the round (survivors reveal that round's pair seeds with it), and none extra
for a site that is down when the round starts (it is simply not a participant). Fewer survivors
than the threshold abort the round cleanly: the previous global model is kept and the sites are
named.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)
from flwr.serverapp import Grid

from clinfed import wire
from clinfed.config import SecureAggregationConfig
from clinfed.errors import ConfigError, ProtocolError
from clinfed.privacy.secagg import (
    KeyAdvertisement,
    MaskedInput,
    SecAggConfig,
    SecAggResult,
    SecAggRound,
    SecAggServer,
    UnmaskResponse,
)

__all__ = ["RoundOutcome", "SecureAggregator"]

logger = logging.getLogger(__name__)
K = wire.Keys


@dataclass(frozen=True)
class RoundOutcome:
    """What a secure round produced: the strategy's single reply, and what the lab should know."""

    reply: Message
    contributors: tuple[str, ...]
    dropped: tuple[str, ...]
    out_of_range: int
    exchanges: int
    rejected: tuple[str, ...] = ()


class SecureAggregator:
    """Drives :class:`~clinfed.privacy.secagg.SecAggServer` over Flower messages."""

    def __init__(self, config: SecureAggregationConfig) -> None:
        self.config = config
        self.protocol = SecAggConfig(
            mode=config.mode,  # type: ignore[arg-type]
            bits=config.bits,
            clip_range=config.clip_range,
            max_sites=config.max_sites,
            threshold=config.threshold or None,
            # Sites always clip-and-count; the server learns the round's total and fails the
            # round itself when secure_aggregation.on_out_of_range is "fail-round".
            on_out_of_range="count",
        )
        self.run_id = secrets.randbits(63)
        self._server = SecAggServer(run_id=self.run_id, config=self.protocol)
        self._site_ids: dict[int, int] = {}  # Flower node id -> secagg site id
        self._names: dict[int, str] = {}  # secagg site id -> site name
        self._examples: dict[int, int] = {}  # secagg site id -> training records

    # ------------------------------------------------------------------ setup (in discovery)

    def settings_record(self) -> ConfigRecord:
        """The run's settings, as sites must rebuild them (their digest is checked)."""
        c = self.config
        return ConfigRecord(
            {
                K.SECAGG_MODE: c.mode,
                K.SECAGG_BITS: c.bits,
                K.SECAGG_CLIP_RANGE: float(c.clip_range),
                K.SECAGG_MAX_SITES: c.max_sites,
                K.SECAGG_THRESHOLD: c.threshold,
                K.SECAGG_ON_OUT_OF_RANGE: "count",
            }
        )

    def setup_records(self, node_id: int) -> dict[str, ConfigRecord]:
        """Records to add to a node's discovery query: its site id and the settings."""
        site_id = self._site_ids.setdefault(node_id, len(self._site_ids) + 1)
        request = self._server.setup_request(site_id)
        return {
            wire.SECAGG: ConfigRecord(request.to_record()),  # type: ignore[arg-type]
            wire.SECAGG_SETTINGS: self.settings_record(),
        }

    def register(self, reply: Message, *, name: str, num_examples: int) -> None:
        """Take a site's key advertisement from its discovery reply."""
        node = reply.metadata.src_node_id
        record = reply.content.config_records.get(wire.SECAGG)
        if record is None:
            raise ProtocolError(
                f"site {name} answered without secure-aggregation keys; is it running clinfed "
                "with secure aggregation support?"
            )
        site_id = self._site_ids[node]
        self._server.add_key_advertisement(KeyAdvertisement.from_record(record), sender=site_id)
        self._names[site_id] = name
        self._examples[site_id] = num_examples

    # ------------------------------------------------------------------ a round

    def open_round(
        self,
        server_round: int,
        messages: Iterable[Message],
        *,
        arrays: ArrayRecord,
        timeout_s: float,
    ) -> tuple[list[Message], SecAggRound]:
        """Attach the round's request to each training message. Raises SecAggAbortedError."""
        messages = list(messages)
        participants = [self._site_ids[m.metadata.dst_node_id] for m in messages]
        deadline_ms = int((time.time() + timeout_s) * 1000)
        secure_round = self._server.start_round(
            round_id=server_round,
            participants=participants,
            num_elements=_num_elements(arrays),
            deadline_ms=deadline_ms,
        )
        total = sum(self._examples[p] for p in participants)
        record = ConfigRecord(secure_round.request.to_record())  # type: ignore[arg-type]
        for message in messages:
            message.content[wire.SECAGG] = record
            message.content.config_records[wire.CONFIG][K.SECAGG_TOTAL_EXAMPLES] = total
            message.metadata.ttl = timeout_s  # the SuperLink refuses replies after the deadline
        return messages, secure_round

    def close_round(
        self,
        grid: Grid,
        secure_round: SecAggRound,
        replies: Sequence[Message],
        *,
        arrays: ArrayRecord,
        train_metrics: Mapping[str, tuple[int, float]],
        timeout_s: float,
    ) -> RoundOutcome:
        """Collect the masked updates, unmask if a site dropped, return the strategy's reply.

        ``train_metrics`` maps each replying site to its (training records, training loss), sent
        in clear. Raises SecAggAbortedError (model to be kept) and ProtocolError.
        """
        answered: set[int] = set()
        rejected: list[str] = []
        for reply in replies:
            site_id = self._site_ids.get(reply.metadata.src_node_id)
            if site_id is None or site_id not in secure_round.participants:
                continue
            answered.add(site_id)
            if reply.has_error():
                continue
            try:
                record = reply.content.config_records.get(wire.SECAGG)
                if record is None:
                    raise ProtocolError(f"site {site_id} sent no masked update in a secure round")
                secure_round.add_masked_input(MaskedInput.from_record(record), sender=site_id)
            except ProtocolError as error:
                # A malformed, replayed or duplicate vector is not added: the site counts as
                # dropped for this round, and the survivors' sum is recovered without it.
                name = self._names[site_id]
                rejected.append(f"{name}: {error}")
                logger.error(
                    "secure round %d: rejected the update of site %s: %s",
                    secure_round.round_id,
                    name,
                    error,
                )
        # Every participant answered (error replies included): no vector can arrive any more,
        # so dropouts may be recovered now rather than at the deadline.
        now_ms = int(time.time() * 1000)
        if answered >= set(secure_round.participants):
            now_ms = max(now_ms, secure_round.request.deadline_ms + 1)
        unmask_requests = secure_round.close(now_ms=now_ms)
        exchanges = 1
        if unmask_requests:
            exchanges = 2
            node_of = {site: node for node, site in self._site_ids.items()}
            messages = [
                Message(
                    RecordDict(
                        {
                            wire.CONFIG: ConfigRecord({K.QUERY: wire.QUERY_SECAGG_UNMASK}),
                            wire.SECAGG: ConfigRecord(request.to_record()),  # type: ignore[arg-type]
                        }
                    ),
                    dst_node_id=node_of[site],
                    message_type=MessageType.QUERY,
                    ttl=timeout_s,
                )
                for site, request in unmask_requests.items()
            ]
            for reply in grid.send_and_receive(messages, timeout=timeout_s):
                site_id = self._site_ids.get(reply.metadata.src_node_id)
                if site_id is None or reply.has_error():
                    continue
                record = reply.content.config_records.get(wire.SECAGG)
                if record is not None:
                    secure_round.add_unmask_response(
                        UnmaskResponse.from_record(record), sender=site_id
                    )
        result = secure_round.result()
        return self._outcome(result, arrays, train_metrics, exchanges, tuple(rejected))

    def _outcome(
        self,
        result: SecAggResult,
        arrays: ArrayRecord,
        train_metrics: Mapping[str, tuple[int, float]],
        exchanges: int,
        rejected: tuple[str, ...],
    ) -> RoundOutcome:
        contributors = tuple(self._names[s] for s in result.contributors)
        weight = sum(self._examples[s] for s in result.contributors) / self._round_total(result)
        mean_update = result.total / weight
        reply_content = RecordDict(
            {
                wire.ARRAYS: _add(arrays, mean_update),
                wire.METRICS: MetricRecord(_mean_metrics(contributors, train_metrics)),
            }
        )
        reply = Message(reply_content, dst_node_id=0, message_type=MessageType.TRAIN)
        return RoundOutcome(
            reply=reply,
            contributors=contributors,
            dropped=tuple(self._names[s] for s in result.dropped),
            out_of_range=result.out_of_range,
            exchanges=exchanges,
            rejected=rejected,
        )

    def _round_total(self, result: SecAggResult) -> int:
        return sum(self._examples[s] for s in (*result.contributors, *result.dropped))

    def names(self, site_ids: Iterable[int]) -> list[str]:
        """Site names of secagg site ids (for messages)."""
        return [self._names.get(s, f"site-{s}") for s in site_ids]


def check_secure_model(arrays: ArrayRecord) -> None:
    """Secure aggregation sums float32 parameters; refuse anything else up front."""
    for name, array in arrays.items():
        if array.dtype != "float32":
            raise ConfigError(
                f"secure aggregation needs float32 model parameters; {name!r} is {array.dtype}. "
                "Use a model of the registry or set secure_aggregation.enabled=false explicitly."
            )


def _num_elements(arrays: ArrayRecord) -> int:
    return sum(int(np.prod(a.shape)) for a in arrays.values())


def _add(arrays: ArrayRecord, flat_update: npt.NDArray[np.float32]) -> ArrayRecord:
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, array in arrays.items():
        value = array.numpy()
        size = value.size
        out[name] = torch.from_numpy(
            (value + flat_update[offset : offset + size].reshape(value.shape)).astype(np.float32)
        )
        offset += size
    return ArrayRecord(out)


def _mean_metrics(
    contributors: Sequence[str], train_metrics: Mapping[str, tuple[int, float]]
) -> dict[str, MetricRecordValues]:
    rows = [train_metrics[c] for c in contributors if c in train_metrics]
    total = sum(n for n, _ in rows)
    loss = sum(n * loss for n, loss in rows) / total if total else float("nan")
    return {K.NUM_EXAMPLES: total, K.TRAIN_LOSS: loss}
