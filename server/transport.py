"""Grid wrappers for the server loop: prompt replies, and models sent as one packed array.

:class:`PromptGrid` — prompt replies: polls for replies every few tens of milliseconds.

Flower's deployment Grid (``flwr.superlink.grid.http_grid``) pulls replies every 3 s. A site
answers a round's request in well under a second, so each exchange waited up to 3 s more than it
had to, twice a round (train, evaluate). :class:`PromptGrid` wraps any Grid and polls its public
``pull_messages`` every ``poll_s`` seconds instead; everything else is delegated unchanged. The
SuperLink serves a pull from memory: at 20 polls a second the load stays negligible.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.app.message import make_message
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from clinfed import wire
from clinfed.errors import ProtocolError

__all__ = ["DEFAULT_POLL_S", "DelegatingGrid", "PackingGrid", "PromptGrid"]

logger = logging.getLogger(__name__)

DEFAULT_POLL_S = 0.05
"""Seconds between two pulls while replies are outstanding."""


class DelegatingGrid(Grid):
    """A Grid that hands every call to ``grid``: the base of clinfed's Grid wrappers."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class PromptGrid(DelegatingGrid):
    """``grid`` with a ``send_and_receive`` that notices replies within ``poll_s`` seconds."""

    def __init__(self, grid: Grid, *, poll_s: float = DEFAULT_POLL_S) -> None:
        if not 0 < poll_s <= 10:
            raise ValueError(f"poll_s must be in (0, 10] seconds. Found {poll_s!r}.")
        super().__init__(grid)
        self._poll_s = poll_s

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then pull until every reply is in or ``timeout`` seconds passed."""
        outstanding = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while outstanding:
            pulled = list(self.pull_messages(outstanding))
            replies.extend(pulled)
            outstanding.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not outstanding:
                break
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(self._poll_s, left))
            else:
                time.sleep(self._poll_s)
        return replies


class PackingGrid(PromptGrid):
    """``grid`` sending the model as one packed array (:data:`clinfed.wire.PACKED`) each way.

    Every outgoing message whose model ArrayRecord has exactly ``layout``'s arrays is packed;
    every reply's packed arrays are unpacked back to ``layout``'s names and shapes before the
    strategy sees them, so strategies, secure aggregation and results are unchanged. A reply
    whose packed model does not fit is passed on as it came, for the update validation
    (:mod:`clinfed.server.validation`) to reject with the site's name. Flower's envelope per
    array (~450 B) is paid once per model.
    """

    def __init__(self, grid: Grid, layout: ArrayRecord, *, poll_s: float = DEFAULT_POLL_S) -> None:
        super().__init__(grid, poll_s=poll_s)
        wire.pack_arrays(layout)  # ValueError now, not mid-run, if it cannot be packed
        self._layout = layout
        self._keys = list(layout.keys())
        self._last: tuple[ArrayRecord, ArrayRecord] | None = None

    def _packed(self, arrays: ArrayRecord) -> ArrayRecord:
        # A strategy sends one ArrayRecord to every site: pack it once.
        if self._last is None or self._last[0] is not arrays:
            self._last = (arrays, wire.pack_arrays(arrays))
        return self._last[1]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        batch = list(messages)
        for message in batch:
            if not message.has_content():
                continue
            arrays = message.content.array_records.get(wire.ARRAYS)
            if arrays is not None and list(arrays.keys()) == self._keys:
                message.content[wire.ARRAYS] = self._packed(arrays)
        return self._grid.push_messages(batch)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._unpacked(reply) for reply in self._grid.pull_messages(message_ids)]

    def _unpacked(self, reply: Message) -> Message:
        if reply.has_error() or wire.ARRAYS not in reply.content:
            return reply
        arrays = reply.content.array_records[wire.ARRAYS]
        if not wire.is_packed(arrays):
            return reply
        try:
            unpacked = wire.unpack_arrays(
                arrays, self._layout, sender=f"node {reply.metadata.src_node_id}"
            )
        except ProtocolError as error:
            # Left as it came: the update validation rejects it, naming the site.
            logger.warning("%s", error)
            return reply
        # A new message: the reply as it came off the wire stays as it was (packed).
        return make_message(
            metadata=reply.metadata,
            content=RecordDict({**reply.content, wire.ARRAYS: unpacked}),
        )
