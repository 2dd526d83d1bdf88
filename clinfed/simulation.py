"""A whole federation on one machine with Flower's simulation engine (Ray backend).

The simulated sites run the same ClientApp as real hospitals; each reads its own site config, as
a real site would. Flower's ``run_simulation`` runs the ServerApp in this process and the
ClientApps in Ray workers, and shuts Ray down at the end, so nothing is left running.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import time
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from clinfed.client.app import build_client_app
from clinfed.client.site import describe_site
from clinfed.config import SimulationConfig, SiteConfig
from clinfed.errors import ConfigError
from clinfed.server.app import build_server_app
from clinfed.server.federation import run_federation
from clinfed.server.results import FederationResult

__all__ = [
    "LocalGrid",
    "SimulationOutcome",
    "check_sites",
    "local_grid",
    "prepare_site_state",
    "run_inprocess_federation",
    "run_simulated_federation",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationOutcome:
    """The result of a simulated run and the folder it was written to."""

    result: FederationResult
    folder: Path


@dataclass(frozen=True)
class _SimulatedSites:
    """Maps a simulated SuperNode (by ``partition-id``) to its site config. Picklable for Ray."""

    sites: tuple[SiteConfig, ...]

    def __call__(self, context: Context) -> SiteConfig:
        pid = context.node_config.get("partition-id")
        if not isinstance(pid, int) or not 0 <= pid < len(self.sites):
            raise ConfigError(f"simulated node has no valid partition-id ({pid!r}).")
        return self.sites[pid]


def check_sites(config: SimulationConfig) -> None:
    """Load every simulated site's data now, so that bad data fails before Ray starts.

    The sites' state folders are created only once every site's data loaded: a bad input leaves
    nothing behind.
    """
    for site in config.sites:
        logger.info("%s", describe_site(site))
    prepare_site_state(config)


def prepare_site_state(config: SimulationConfig) -> None:
    """Create the folders of the simulated sites' ledgers and audit logs."""
    for site in config.sites:
        for path in (site.governance.ledger, site.governance.audit_log):
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)


def run_simulated_federation(config: SimulationConfig) -> SimulationOutcome:
    """Run the federation described by ``config``; returns its results."""
    # Bake-in: never let Flower install dependencies at run time.
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    from flwr.simulation import run_simulation  # noqa: PLC0415 - imports Ray; keep the CLI light

    outcome: list[SimulationOutcome] = []

    def keep(result: FederationResult, folder: Path) -> None:
        outcome.append(SimulationOutcome(result, folder))

    prepare_site_state(config)
    server_app = build_server_app(config.run, on_result=keep, print_summary=False)
    client_app = build_client_app(_SimulatedSites(config.sites))
    backend = {
        "client_resources": {"num_cpus": config.federation.cpus_per_site, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(1, os.cpu_count() or 1), "include_dashboard": False},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(config.sites),
            backend_config=backend,  # type: ignore[arg-type]
        )
    if not outcome:
        raise RuntimeError("the simulated federation ended without results; see the log above.")
    return outcome[0]


ReplyFilter = Callable[[Message, Message], Message | None]


class LocalGrid(Grid):
    """A Flower ``Grid`` that delivers each message to a ClientApp in this process.

    The same ClientApp, server loop and strategies as a real federation, minus the transport: no
    Ray, no network. For tests and benchmarks that run many short federations; ``tox -e
    simulate`` and the end-to-end tests use Flower's own engines. A ClientApp exception becomes an
    error reply, as Flower's engines do.
    """

    def __init__(self, client_app: ClientApp, contexts: list[Context]) -> None:
        self._client_app = client_app
        self._contexts = {c.node_id: c for c in contexts}
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=contexts[0].run_id if contexts else 0)
        self.dropped: set[int] = set()
        """Node ids that are down: not listed as connected, and they receive nothing."""
        self.reply_filter: ReplyFilter | None = None
        """Sees each (request, reply) and may return the reply, another one, or ``None`` (the
        reply is lost): failure injection for tests and reliability benchmarks."""

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self._contexts if n not in self.dropped]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            node = msg.metadata.dst_node_id
            ids.append(msg.metadata.message_id)
            if node in self.dropped or node not in self._contexts:
                continue
            try:
                reply = self._client_app(msg, self._contexts[node])
            except Exception as error:  # noqa: BLE001 - reported to the server as an error reply
                reason = f"{type(error)}:<'{error}'>"  # as Flower's engines report it
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
                )
            if self.reply_filter is not None:
                filtered = self.reply_filter(msg, reply)
                if filtered is None:
                    continue
                reply = filtered
            self._replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        replies = list(self.pull_messages(ids))
        if len(replies) < len(ids) and timeout is not None:
            time.sleep(timeout)  # a lost reply costs the full wait, as over a real network
        return replies


def run_inprocess_federation(config: SimulationConfig) -> FederationResult:
    """Run the federation in this process over a :class:`LocalGrid` (no Ray); nothing is written."""
    return run_federation(local_grid(config), config.run)


def local_grid(config: SimulationConfig) -> LocalGrid:
    """A :class:`LocalGrid` whose nodes are the simulated sites of ``config``."""
    prepare_site_state(config)
    sites = _SimulatedSites(config.sites)
    client_app = build_client_app(sites)
    rng = random.Random(config.run.seed)
    run_id = secrets.randbits(62) + 1  # every in-process run is a new run, as with Flower
    contexts = [
        Context(
            run_id=run_id,
            node_id=rng.getrandbits(62) + 1,
            node_config={"partition-id": i, "num-partitions": len(config.sites)},
            state=RecordDict(),
            run_config={},
        )
        for i in range(len(config.sites))
    ]
    # Flower's Message constructor stamps the sender's identity from TaskIdentity; the engines
    # set it for the ServerApp, so does this in-process one.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, SUPERLINK_NODE_ID
    return LocalGrid(client_app, contexts)
