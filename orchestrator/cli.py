"""The `orchestrator` command: run, enqueue, config check.

Errors a user can fix are one line on stderr and exit code 2 (`CLIError`); the job's own
status decides the exit code of `enqueue --wait` (see `STATUS_EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.config import DaemonSettings, SettingsError, load_settings
from orchestrator.imagemap import DEFAULT_IMAGE_MAP, ImageMap, ImageMapError, RequestRejected, load_image_map
from orchestrator.messages import JobRequest, JobResult, JobStatus

STATUS_EXIT_CODES = {
    JobStatus.SUCCEEDED: 0,
    JobStatus.FAILED: 1,
    JobStatus.ERROR: 3,
    JobStatus.TIMEOUT: 124,
    JobStatus.CANCELLED: 130,
}


class CLIError(Exception):
    """An error that should be reflected back to the CLI user as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other CLI error
        raise CLIError(f"{self.prog}: {message} (see --help)")


def _add_broker_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--amqp-url", help="broker URL (env AMQP_URL; default amqp://guest:guest@127.0.0.1:5672/)")
    parser.add_argument("--amqp-prefix", help="name prefix of exchanges and queues (env AMQP_PREFIX; default ci)")
    parser.add_argument("--config", type=Path, help=f"image map YAML (env ORCH_CONFIG; default {DEFAULT_IMAGE_MAP})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orchestrator", description="CI VM orchestrator: runs CI jobs from RabbitMQ in throwaway VMs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="run the host daemon", description="Consume jobs and run each in a VM until SIGINT/SIGTERM.")
    _add_broker_flags(run)
    run.add_argument("--max-concurrency", type=int, help="jobs at once on this host (env MAX_CONCURRENCY; default 2)")
    run.add_argument("--capacity-map", help="per-label limits label=n,... (env CAPACITY_MAP)")
    run.add_argument("--host-cpus", type=int, help="vCPU budget (env HOST_CPUS; default: this machine's CPUs)")
    run.add_argument("--host-memory-mb", type=int, help="memory budget in MiB (env HOST_MEMORY_MB; default: this machine's)")
    run.add_argument("--host-name", help="name in results and heartbeats (env HOST_NAME)")
    run.add_argument("--state-dir", type=Path, help="journal, overlays, seeds, logs (env STATE_DIR; default /var/lib/orchestrator)")
    run.add_argument("--backend", choices=["libvirt", "zones", "noop"], help="default backend for images without one (env ORCH_BACKEND; default libvirt)")
    run.add_argument("--drain-timeout-s", type=float, help="how long running jobs may finish on shutdown (env DRAIN_TIMEOUT_S; default 300)")
    run.add_argument("--log-format", choices=["json", "text"], help="log line format (env LOG_FORMAT; default json)")

    enqueue = commands.add_parser("enqueue", help="publish a job request", description="Publish one job request (with publisher confirms).")
    _add_broker_flags(enqueue)
    enqueue.add_argument("--repo", required=True, help="repository URL to check out")
    enqueue.add_argument("--commit", required=True, help="full commit SHA (40 or 64 hex digits)")
    enqueue.add_argument("--runs-on", help="label (default: the image map's default_label)")
    script = enqueue.add_mutually_exclusive_group()
    script.add_argument("--script", help="inline shell script to run in the VM")
    script.add_argument("--script-path", help="script inside the repository to run")
    enqueue.add_argument("--env", action="append", default=[], metavar="K=V", help="environment for the job (repeatable)")
    enqueue.add_argument("--size", help="size preset from the image map")
    enqueue.add_argument("--timeout", type=int, help="job timeout in seconds")
    enqueue.add_argument("--request-id", help="job id (default: a new UUID)")
    enqueue.add_argument("--wait", action="store_true", help="wait for the result, print it, exit with the job's status")
    enqueue.add_argument("--wait-timeout", type=float, default=3600, help="give up waiting after this many seconds (default 3600)")

    cancel = commands.add_parser(
        "cancel", help="cancel a job", description="Cancel a job: the host running it destroys its VM and publishes a cancelled result; a job still queued is dropped when a host takes it (cancels are remembered for a day)."
    )
    _add_broker_flags(cancel)
    cancel.add_argument("job_id", help="the job's request_id")
    cancel.add_argument("--answer-timeout", type=float, default=3.0, help="seconds to wait for hosts to answer (default 3)")

    hosts = commands.add_parser("hosts", help="the fleet: every host's labels, capacity and usage", description="Ask every host on the broker to describe itself and print the answers.")
    _add_broker_flags(hosts)
    hosts.add_argument("--answer-timeout", type=float, default=2.0, help="seconds to wait for hosts to answer (default 2)")
    hosts.add_argument("--json", action="store_true", help="one JSON heartbeat per line")

    images = commands.add_parser("images", help="prepare and list base images")
    image_commands = images.add_subparsers(dest="images_command", required=True, parser_class=_Parser)
    prepare = image_commands.add_parser(
        "prepare", help="download (and decompress, verify) images",
        description="Download missing images (all, or the labels given); --refresh re-checks the source and replaces an image only when it changed.",
    )
    _add_broker_flags(prepare)
    prepare.add_argument("labels", nargs="*", metavar="LABEL", help="labels or aliases (default: every image with a source)")
    prepare.add_argument("--refresh", action="store_true", help="check the source for a newer image (ETag / Last-Modified)")
    prepare.add_argument("--state-dir", type=Path, help="env STATE_DIR (image_dir defaults to STATE_DIR/images)")
    prepare.add_argument("--image-dir", type=Path, help="where images may be written (env IMAGE_DIR)")
    listing = image_commands.add_parser("list", help="each label's image file, size, format, sha256, source, fetch time")
    _add_broker_flags(listing)

    config = commands.add_parser("config", help="inspect configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    check = config_commands.add_parser("check", help="validate the image map and settings and print what they resolve to")
    _add_broker_flags(check)
    return parser


def _settings(args: argparse.Namespace) -> DaemonSettings:
    flags = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return load_settings(flags)
    except SettingsError as exc:
        raise CLIError(str(exc)) from None


def _image_map(settings: DaemonSettings) -> ImageMap:
    try:
        return load_image_map(settings.config)
    except ImageMapError as exc:
        raise CLIError(str(exc)) from None


# --- run -----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.daemon import StartupError, run_daemon
    from orchestrator.logsetup import configure_logging

    settings = _settings(args)
    image_map = _image_map(settings)
    configure_logging(fmt=settings.log_format)
    try:
        asyncio.run(run_daemon(settings, image_map))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# --- enqueue -------------------------------------------------------------------------------


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise CLIError(f"--env {pair!r}: expected NAME=VALUE")
        env[name] = value
    return env


def _build_request(args: argparse.Namespace) -> JobRequest:
    fields: dict[str, Any] = {
        "request_id": args.request_id or str(uuid.uuid4()),
        "source": "cli",
        "repo_url": args.repo,
        "commit_sha": args.commit,
        "runs_on": args.runs_on,
        "script": args.script,
        "script_path": args.script_path,
        "env": _parse_env(args.env),
        "size": args.size,
        "timeout_s": args.timeout,
    }
    try:
        return JobRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "request"
        flag = {"repo_url": "--repo", "commit_sha": "--commit", "runs_on": "--runs-on", "request_id": "--request-id",
                "timeout_s": "--timeout"}.get(field, "--" + field.replace("_", "-"))
        raise CLIError(f"{flag}: {error['msg']}") from None


def _print_result(result: JobResult) -> None:
    print(f"job {result.request_id}: {result.status.value} (exit code {result.exit_code}) on {result.host}: {result.summary}")
    if result.console_tail:
        print("--- console tail ---")
        print(result.console_tail)
    print(result.model_dump_json(indent=2))


@contextlib.asynccontextmanager
async def _broker_exchange(settings: DaemonSettings, name: str) -> AsyncIterator[tuple[Any, Any]]:
    """A confirm channel and an exchange the daemons declared; CLIError when either the
    broker or the exchange is not there."""
    import aio_pika

    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    except Exception as exc:
        raise CLIError(f"cannot connect to the broker at {settings.masked_amqp_url()}: {exc}") from None
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        try:
            exchange = await channel.get_exchange(name, ensure=True)
        except aio_pika.exceptions.ChannelClosed:
            raise CLIError(
                f"exchange {name} does not exist: no orchestrator daemon with prefix {settings.amqp_prefix!r} has started on this broker yet"
            ) from None
        yield channel, exchange


async def _enqueue(args: argparse.Namespace, settings: DaemonSettings, request: JobRequest, routing_key: str) -> int:
    from orchestrator.amqp import json_message
    from orchestrator.topology import Topology

    topology = Topology(settings.amqp_prefix)
    async with _broker_exchange(settings, topology.jobs) as (channel, jobs):
        results_queue = None
        if args.wait:
            results = await channel.get_exchange(topology.results, ensure=False)
            results_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await results_queue.bind(results, routing_key=request.job_id)
        await jobs.publish(json_message(request, message_id=f"{request.job_id}/{request.attempt}"), routing_key=routing_key)
        print(f"enqueued job {request.job_id} (routing key {routing_key!r})", file=sys.stderr)
        if results_queue is None:
            print(request.job_id)
            return 0
        try:
            async with asyncio.timeout(args.wait_timeout):
                async with results_queue.iterator() as messages:
                    async for message in messages:
                        async with message.process():
                            result = JobResult.model_validate_json(message.body)
                        _print_result(result)
                        return STATUS_EXIT_CODES[result.status]
        except TimeoutError:
            raise CLIError(f"no result for job {request.job_id} within {args.wait_timeout} s (it may still run)") from None
    return 3


def cmd_enqueue(args: argparse.Namespace) -> int:
    settings = _settings(args)
    request = _build_request(args)
    routing_key = request.runs_on or ""
    # Check the label against the image map when there is one here, so a typo is
    # reported at once; without a local map the fleet answers with an error result.
    image_map: ImageMap | None = None
    if args.config is not None or settings.config.exists():
        image_map = _image_map(settings)
    if image_map is not None:
        try:
            routing_key = image_map.resolve(request.runs_on)
            image_map.resources_for(routing_key, request)
        except RequestRejected as exc:
            raise CLIError(str(exc)) from None
    return asyncio.run(_enqueue(args, settings, request, routing_key))


# --- config check ----------------------------------------------------------------------------


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    image_map = _image_map(settings)
    print(f"image map {settings.config}: OK")
    print(f"default label: {image_map.default_label} -> {image_map.resolve(None)}")
    for alias in sorted(image_map.aliases):
        print(f"alias {alias} -> {image_map.resolve(alias)}")
    for name, preset in sorted(image_map.sizes.items()):
        print(f"size {name}: {preset.cpus} CPU, {preset.memory_mb} MiB" + (f", {preset.disk_gb} GiB" if preset.disk_gb else ""))
    for label, image in sorted(image_map.images.items()):
        res = image_map.default_resources(label)
        keys = ", ".join(repr(k) for k in image_map.routing_keys(label))
        print(
            f"label {label}: backend {(image.backend or settings.backend).value}, {res.cpus} CPU, {res.memory_mb} MiB"
            + (f", {res.disk_gb} GiB disk" if res.disk_gb else "")
            + f", image {image.local_path}, routing keys {keys}"
        )
    shown = settings.model_dump(mode="json")
    shown["amqp_url"] = settings.masked_amqp_url()
    if shown.get("http_token"):
        shown["http_token"] = "****"
    print("settings: " + json.dumps(shown, sort_keys=True))
    return 0


# --- cancel ---------------------------------------------------------------------------------


async def _cancel(settings: DaemonSettings, job_id: uuid.UUID, answer_timeout: float) -> int:
    from orchestrator.amqp import json_message
    from orchestrator.messages import CancelOutcome, CancelReply, ControlKind, ControlMessage
    from orchestrator.topology import Topology

    topology = Topology(settings.amqp_prefix)
    async with _broker_exchange(settings, topology.control) as (channel, control):
        message = json_message(ControlMessage(kind=ControlKind.CANCEL, request_id=job_id), persistent=False)
        bodies = await _ask_hosts(control, channel, message, answer_timeout)
    replies = [CancelReply.model_validate_json(body) for body in bodies]
    for reply in replies:
        if reply.outcome is CancelOutcome.CANCELLING:
            print(f"job {job_id}: cancelling on {reply.host}; its VM is being destroyed and a cancelled result published")
            return 0
    for reply in replies:
        if reply.outcome is CancelOutcome.FINISHED:
            print(f"job {job_id}: already finished on {reply.host} ({reply.status.value if reply.status else 'done'}); nothing to cancel")
            return 1
    print(
        f"job {job_id}: not running on any of the {len(replies)} host(s) that answered; "
        "if it is still queued it will be dropped with a cancelled result when a host takes it"
    )
    return 0


async def _ask_hosts(control: Any, channel: Any, message: Any, answer_timeout: float) -> list[bytes]:
    """Publish a control message with a reply queue; collect answers until the timeout."""
    replies_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    message.reply_to = replies_queue.name
    await control.publish(message, routing_key="")
    bodies: list[bytes] = []
    try:
        async with asyncio.timeout(answer_timeout):
            async with replies_queue.iterator() as incoming:
                async for reply in incoming:
                    async with reply.process():
                        bodies.append(reply.body)
    except TimeoutError:
        pass
    return bodies


async def _hosts(settings: DaemonSettings, answer_timeout: float, as_json: bool) -> int:
    from orchestrator.amqp import json_message
    from orchestrator.messages import ControlKind, ControlMessage, Heartbeat
    from orchestrator.topology import Topology

    topology = Topology(settings.amqp_prefix)
    async with _broker_exchange(settings, topology.control) as (channel, control):
        message = json_message(ControlMessage(kind=ControlKind.DESCRIBE), persistent=False)
        bodies = await _ask_hosts(control, channel, message, answer_timeout)
    beats = sorted((Heartbeat.model_validate_json(b) for b in bodies), key=lambda h: h.host)
    for beat in beats:
        if as_json:
            print(beat.model_dump_json())
            continue
        state = "draining" if beat.draining else "serving"
        print(
            f"{beat.host}: {state}, {beat.running}/{beat.max_concurrency} jobs, "
            f"{beat.cpus_used}/{beat.cpus_total} vCPUs, {beat.memory_mb_used}/{beat.memory_mb_total} MiB, "
            f"version {beat.version}, labels {', '.join(beat.labels)}"
        )
    if not as_json:
        print(f"{len(beats)} host(s) answered within {answer_timeout:g} s")
    return 0 if beats else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        job_id = uuid.UUID(args.job_id)
    except ValueError:
        raise CLIError(f"job_id: {args.job_id!r} is not a UUID (a job's request_id)") from None
    return asyncio.run(_cancel(settings, job_id, args.answer_timeout))


# --- images ---------------------------------------------------------------------------------


class ProgressPrinter:
    """A progress bar on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, stream: Any = None, *, interval_s: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = 0.2 if self.tty else interval_s
        self._last = 0.0

    def __call__(self, status: Any) -> None:
        import time

        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        elapsed = max(1e-6, now - (status.started_at or now))
        rate = status.bytes_in / elapsed
        total = status.bytes_total
        mib = 2**20
        if total:
            eta = (total - status.bytes_in) / rate if rate else 0
            text = f"{status.label}: {status.bytes_in / mib:.0f}/{total / mib:.0f} MiB {100 * status.bytes_in / total:3.0f}% {rate / mib:.1f} MiB/s ETA {eta:.0f}s"
        else:
            text = f"{status.label}: {status.bytes_in / mib:.0f} MiB {rate / mib:.1f} MiB/s"
        if self.tty:
            width = 24
            done = int(width * (status.bytes_in / total)) if total else 0
            print(f"\r[{'#' * done}{'.' * (width - done)}] {text}", end="", file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)

    def done(self) -> None:
        if self.tty:
            print(file=self.stream)


def cmd_images_prepare(args: argparse.Namespace) -> int:
    from orchestrator.images import ImagePreparer, ImagePrepError

    settings = _settings(args)
    image_map = _image_map(settings)
    try:
        labels = [image_map.resolve(label) for label in args.labels] or [
            label for label, image in image_map.images.items() if image.source is not None
        ]
    except RequestRejected as exc:
        raise CLIError(str(exc)) from None

    async def prepare_all() -> int:
        failures = 0
        progress = ProgressPrinter()
        def waiting(label: str, lock: Path) -> None:
            print(f"{label}: another process is preparing this image ({lock}); waiting for it", file=sys.stderr, flush=True)

        preparer = ImagePreparer(
            image_map, image_dir=settings.images_dir, max_image_bytes=settings.max_image_bytes,
            on_progress=progress, on_wait=waiting,
        )
        try:
            for label in labels:
                try:
                    outcome = await preparer.prepare(label, refresh=args.refresh)
                    progress.done()
                    print(f"{label}: {outcome.value} ({image_map.images[label].local_path})")
                except ImagePrepError as exc:
                    progress.done()
                    print(f"error: {exc}", file=sys.stderr)
                    failures += 1
        finally:
            await preparer.close()
        return 1 if failures else 0

    return asyncio.run(prepare_all())


def cmd_images_list(args: argparse.Namespace) -> int:
    from orchestrator.images import ImageMeta

    settings = _settings(args)
    image_map = _image_map(settings)
    for label, image in sorted(image_map.images.items()):
        path = image.local_path
        meta = ImageMeta.read(path) if path.exists() else None
        size = f"{path.stat().st_size / 2**20:.0f} MiB" if path.exists() else "missing"
        print(
            f"{label}: {path} {size} format={(meta.format if meta else image.format.value if image.format else '?')} "
            f"sha256={meta.sha256 if meta else '-'} source={image.source or '-'} fetched={meta.fetched_at if meta else '-'}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "enqueue":
            return cmd_enqueue(args)
        if args.command == "config":
            return cmd_config_check(args)
        if args.command == "cancel":
            return cmd_cancel(args)
        if args.command == "hosts":
            return asyncio.run(_hosts(_settings(args), args.answer_timeout, args.json))
        if args.command == "images":
            return cmd_images_prepare(args) if args.images_command == "prepare" else cmd_images_list(args)
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `orchestrator ... | head`: the reader has what it wanted
        sys.stderr.close()
        return 0
    return 2
