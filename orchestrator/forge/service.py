"""`orchestrator forge`: the bridge between forges and the fleet, as one service.

Start-up opens each part and pushes its shutdown onto one `AsyncExitStack` (as the
daemon does): the journal, the forges' API clients, the broker (retried for
`BROKER_CONNECT_TIMEOUT_S`), the status reporter's queue, the dispatcher and the status
sender, and last the HTTP receiver — so webhooks are taken only once everything that
handles them runs, and on SIGTERM they stop being taken first.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import AsyncExitStack
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from hypervisors.statedir import STATE_DIR_MODE, restrict_umask
from orchestrator.core.amqp import ConfirmedPublisher, FailoverConnection, connect_with_retry, describe_error
from orchestrator.core.config import DaemonSettings
from orchestrator.core.httpserver import HttpLimits, HttpLoad, bound_port, serve_within_limits
from orchestrator.core.lifecycle import BackgroundTasks, StartupError, bounded, failing_as
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.topology import Topology, declare_topology
from orchestrator.forge.base import Forge
from orchestrator.forge.catchup import CatchUp, RepoReport
from orchestrator.forge.config import LoadedForgeConfig
from orchestrator.forge.dispatcher import Dispatcher
from orchestrator.forge.journal import BridgeJournal
from orchestrator.forge.receiver import build_receiver, gauges
from orchestrator.forge.registry import build_forge
from orchestrator.forge.reporter import StatusReporter

log = EventLogger("orchestrator.forge")


class ForgeBridge:
    def __init__(
        self,
        settings: DaemonSettings,
        config: LoadedForgeConfig,
        *,
        forges: dict[str, Forge] | None = None,
        serve: bool = True,
    ) -> None:
        """`serve`: take webhooks, consume results and catch up periodically (the
        service). Without it (the `catch-up` and `rerun` commands) only what publishes
        jobs and sets statuses runs."""
        self._serve = serve
        self.settings = settings
        self.config = config
        self.topology = Topology(settings.amqp_prefix)
        self.forges: dict[str, Forge] = forges if forges is not None else {}
        self._given_forges = forges is not None
        self.journal: BridgeJournal | None = None
        self.dispatcher: Dispatcher | None = None
        self.reporter: StatusReporter | None = None
        self.catchup: CatchUp | None = None
        self._connection: AbstractRobustConnection | None = None
        self._stack = AsyncExitStack()
        self.port: int | None = None

    @property
    def broker_connected(self) -> bool:
        connection = self._connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    @property
    def broker_node(self) -> str | None:
        """`host:port` of the broker node the bridge is connected to; None while it is not."""
        connection = self._connection
        return connection.node if isinstance(connection, FailoverConnection) else None

    def not_ready_reasons(self) -> list[str]:
        reasons = (
            []
            if self.broker_connected
            else ["broker connection is down (webhooks are still journaled and answered 202)"]
        )
        if self.catchup is not None:
            for (forge, repo), problems in sorted(self.catchup.hook_problems.items()):
                reasons += [
                    f"{forge} {repo}: {problem} (catch-up covers it; re-enable the hook)" for problem in problems
                ]
        return reasons

    def _metrics(self) -> list[Any]:
        assert self.dispatcher is not None and self.reporter is not None and self.catchup is not None
        return gauges(
            self.dispatcher,
            self.reporter.sent,
            self.reporter.dropped,
            self.broker_connected,
            self.catchup.caught_up,
            self.catchup.last_pass,
        )

    async def start(self) -> None:
        try:
            await self._open(self._stack)
        except BaseException:
            await self._stack.aclose()
            raise
        if self._serve:
            log.info(
                "forge.started",
                listen=self.config.config.listen,
                forges=sorted(self.forges),
                repositories=[r.repo for r in self.config.config.repositories],
            )

    async def stop(self) -> None:
        await self._stack.aclose()
        if self._serve:
            log.info("forge.stopped")

    def _catchup_forges(self) -> dict[str, Forge]:
        if self._given_forges:
            return self.forges
        config = self.config.config
        return {
            name: build_forge(
                config.kind_of(name), api_url=entry.api_url, token=self.config.tokens[name].get_secret_value()
            )
            for name, entry in config.forges.items()
        }

    async def _catch_up_forever(self, forge: str) -> None:
        """A pass at start, then every `catchup_interval_s`; a failed pass is logged and
        the next one comes as planned."""
        assert self.catchup is not None
        interval = self.config.config.forges[forge].catchup_interval_s
        while True:
            try:
                await self.catchup.pass_forge(forge)
            except Exception as exc:  # never let catch-up stop the bridge
                log.error("catchup.pass_failed", forge=forge, error=describe_error(exc), exc_info=True)
            await asyncio.sleep(interval)

    async def _open(self, stack: AsyncExitStack) -> None:
        s, config = self.settings, self.config.config
        with failing_as(
            f"cannot use the forge state_dir {config.state_dir}", "make it a directory this user can write"
        ):
            await asyncio.to_thread(_make_state_dir, config)
            self.journal = BridgeJournal(config.state_dir / "forge.db")
        stack.push_async_callback(self.journal.close)
        if not self._given_forges:
            for name, entry in config.forges.items():
                self.forges[name] = build_forge(
                    config.kind_of(name), api_url=entry.api_url, token=self.config.tokens[name].get_secret_value()
                )
        for forge in self.forges.values():
            stack.push_async_callback(forge.close)
        try:
            self._connection = await connect_with_retry(
                s.amqp_url,
                name="orchestrator-forge",
                timeout_s=s.broker_connect_timeout_s,
                masked_url=s.masked_amqp_url(),
            )
        except (TimeoutError, OSError) as exc:
            raise StartupError(
                f"cannot connect to the broker at {s.masked_amqp_url()} within {s.broker_connect_timeout_s:g} s: "
                f"{describe_error(exc)} (start RabbitMQ or fix AMQP_URL)"
            ) from None
        stack.push_async_callback(bounded(self._connection.close, "broker connection"))
        with failing_as(
            "cannot declare the broker's exchanges",
            "use the same DELIVERY_LIMIT, DLQ_MAX_LENGTH and QUORUM_SIZE as the hosts",
        ):
            declared = await declare_topology(
                self._connection,
                self.topology,
                None,
                delivery_limit=s.delivery_limit,
                dlq_max_length=s.dlq_max_length,
                quorum_size=s.quorum_size,
            )
            await declared.channel.close()
        publisher = await ConfirmedPublisher.open(self._connection)
        self.reporter = StatusReporter(
            journal=self.journal,
            forges=self.forges,
            topology=self.topology,
            delivery_limit=s.delivery_limit,
            quorum_size=s.quorum_size,
        )
        self.dispatcher = Dispatcher(
            journal=self.journal,
            forges=self.forges,
            config=self.config,
            publisher=publisher,
            topology=self.topology,
            propose_status=self.reporter.propose,
            statuses_changed=self.reporter.wake,
        )
        # Catch-up works on API clients of its own: its budget and retries never slow
        # what the receiver and the reporter ask of the same forge.
        catchup_forges = self._catchup_forges()
        for forge in catchup_forges.values():
            stack.push_async_callback(forge.close)
        self.catchup = CatchUp(
            journal=self.journal, forges=catchup_forges, config=self.config, dispatcher=self.dispatcher
        )
        tasks = BackgroundTasks()
        stack.push_async_callback(tasks.cancel_all)
        tasks.spawn(self.dispatcher.run_forever(), name="forge-dispatcher")
        if not self._serve:
            return  # `catch-up` and `rerun` send their statuses once, at their end (`send_due`)
        tasks.spawn(self.reporter.send_forever(), name="forge-status-sender")
        for name in catchup_forges:
            tasks.spawn(self._catch_up_forever(name), name=f"forge-catch-up-{name}")
        with failing_as(
            f"cannot consume {self.topology.forge_status_queue}",
            "use the same DELIVERY_LIMIT and QUORUM_SIZE as when it was declared",
        ):
            await self.reporter.start(self._connection)
        stack.push_async_callback(self.reporter.stop)
        app = build_receiver(
            forges=self.forges,
            config=self.config,
            dispatcher=self.dispatcher,
            not_ready_reasons=self.not_ready_reasons,
            metrics=self._metrics,
            broker_node=lambda: self.broker_node,
        )
        load = HttpLoad(HttpLimits(max_connections=config.max_connections, header_timeout_s=config.header_timeout_s))
        with failing_as(f"cannot listen on {config.listen}", "choose a free address in the forge config's `listen`"):
            runner = await serve_within_limits(app, config.listen, load)
        stack.push_async_callback(bounded(runner.cleanup, "HTTP receiver"))
        self.port = bound_port(runner)


def _make_state_dir(config: Any) -> None:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    config.state_dir.chmod(STATE_DIR_MODE)  # its journal holds jobs' env, secrets included


async def run_bridge(settings: DaemonSettings, config: LoadedForgeConfig) -> None:
    """Run until SIGINT or SIGTERM. Raises `StartupError`."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    restrict_umask()  # its journal holds jobs' env, secrets included
    bridge = ForgeBridge(settings, config)
    await bridge.start()
    try:
        await stop.wait()
    finally:
        await bridge.stop()


async def catch_up_once(
    settings: DaemonSettings, config: LoadedForgeConfig, *, repo: str | None, dry_run: bool
) -> list[RepoReport]:
    """One pass over every repository (or `repo`), as `orchestrator forge catch-up` runs
    it beside the service: the same journal, so nothing runs twice. A dry run reads the
    forges and the journal and changes nothing."""
    if dry_run:
        journal = BridgeJournal(config.config.state_dir / "forge.db")
        forges = {
            name: build_forge(
                config.config.kind_of(name), api_url=entry.api_url, token=config.tokens[name].get_secret_value()
            )
            for name, entry in config.config.forges.items()
        }
        try:
            return await CatchUp(journal=journal, forges=forges, config=config, dispatcher=None).pass_all(only=repo)
        finally:
            for forge in forges.values():
                await forge.close()
            await journal.close()
    bridge = ForgeBridge(settings, config, serve=False)
    await bridge.start()
    try:
        assert bridge.catchup is not None and bridge.dispatcher is not None and bridge.reporter is not None
        reports = await bridge.catchup.pass_all(only=repo)
        await bridge.dispatcher.settled()
        await bridge.reporter.send_due()
        return reports
    finally:
        await bridge.stop()


async def rerun_once(
    settings: DaemonSettings, config: LoadedForgeConfig, *, repo: str, commit_sha: str, job: str | None
) -> list[str]:
    """`orchestrator forge rerun`: new runs of a commit's jobs; their job names and ids."""
    bridge = ForgeBridge(settings, config, serve=False)
    await bridge.start()
    try:
        assert bridge.dispatcher is not None and bridge.reporter is not None
        runs = await bridge.dispatcher.rerun(repo, commit_sha, job=job)
        await bridge.reporter.send_due()
        return [f"{run.job_name} ({run.ref_key}): {run.request_id}" for run in runs]
    finally:
        await bridge.stop()
