"""Daemon settings: command-line flag, else environment variable, else default.

Every setting is validated by `DaemonSettings`; a bad value is refused with the name of
the flag and variable that set it.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hypervisors.base import BackendName
from hypervisors.statedir import StateDir
from orchestrator.core.imagemap import DEFAULT_IMAGE_MAP, MAP_MAX_BYTES
from orchestrator.core.messages import LABEL_PATTERN, MAX_MESSAGE_BYTES
from orchestrator.core.reference import AMQP_NAME_PATTERN, REFERENCE_ROUTING_KEY, ReferenceError, map_reference_settings


class SettingsError(Exception):
    """A setting is invalid; the message names the flag/variable and the fix."""


def _memory_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):
        return 4096


def split_amqp_urls(text: str) -> list[str]:
    """`AMQP_URL` as its list of nodes: comma-separated, blanks ignored (a comma inside a
    password is written %2C, as URLs escape it)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_capacity_map(text: str) -> dict[str, int]:
    """`label=n,label=n` into a dict; raises ValueError naming the bad entry."""
    capacity: dict[str, int] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        label, sep, count = entry.partition("=")
        if not sep or not re.match(LABEL_PATTERN, label.strip()) or not count.strip().isdigit():
            raise ValueError(f"entry {entry!r} is not label=N (for example ubuntu-22.04=4)")
        capacity[label.strip()] = int(count)
    return capacity


class DaemonSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    broker_connect_timeout_s: Annotated[float, Field(ge=0)] = 60.0
    amqp_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")] = "ci"
    # The reference orchestrator's AMQP settings, mapped onto ours (orchestrator/core/reference.py):
    # an exchange other than <prefix>.jobs bound into it, a queue consumed as an ingress.
    amqp_exchange: Annotated[str, Field(pattern=AMQP_NAME_PATTERN)] | None = None
    amqp_queue: Annotated[str, Field(pattern=AMQP_NAME_PATTERN)] | None = None
    amqp_routing_key: Annotated[str, Field(pattern=r"^[^\s]{0,255}$")] = REFERENCE_ROUTING_KEY
    amqp_prefetch: Annotated[int, Field(ge=1, le=65535)] | None = None  # reported, not applied
    config: Path = DEFAULT_IMAGE_MAP
    map_max_bytes: Annotated[int, Field(ge=1024)] = MAP_MAX_BYTES
    max_concurrency: Annotated[int, Field(ge=1, le=1024)] = 2
    capacity_map: dict[str, Annotated[int, Field(ge=0, le=1024)]] = Field(default_factory=dict)
    host_cpus: Annotated[int, Field(ge=1)] = Field(default_factory=lambda: os.cpu_count() or 1)
    host_memory_mb: Annotated[int, Field(ge=64)] = Field(default_factory=_memory_mb)
    host_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")] = Field(
        default_factory=lambda: socket.gethostname().split(".")[0] or "host"
    )
    state_dir: Path = Path("/var/lib/orchestrator")
    image_dir: Path | None = None  # default: STATE_DIR/images
    max_image_bytes: Annotated[int, Field(ge=1)] = 64 * 1024**3
    backend: BackendName = BackendName.LIBVIRT
    drain_timeout_s: Annotated[float, Field(ge=0)] = 300.0
    shutdown_timeout_s: Annotated[float, Field(ge=0)] = 30.0
    default_timeout_s: Annotated[int, Field(ge=1)] = 3600
    boot_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    # warm pools: how many pool VMs may boot at once (refills never starve running jobs)
    warm_boots_at_once: Annotated[int, Field(ge=1, le=64)] = 1
    console_max_bytes: Annotated[int, Field(ge=4 * 1024 * 1024)] = 64 * 1024 * 1024
    delivery_limit: Annotated[int, Field(ge=1, le=1000)] = 50
    # Quorum queues' initial member count (x-quorum-initial-group-size); RabbitMQ
    # places min(this, cluster nodes) members. Every host must use the same value.
    quorum_size: Annotated[int, Field(ge=1, le=15)] = 3
    dlq_max_length: Annotated[int, Field(ge=1)] = 100_000
    # How long a delivery may be held un-acked waiting for room for its size before it
    # is handed back: below RabbitMQ's consumer_timeout (30 min by default), past which
    # the broker closes the channel and requeues everything it holds.
    max_hold_s: Annotated[float, Field(gt=0, lt=1800)] = 1200.0
    retention_days: Annotated[float, Field(gt=0)] = 14.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    heartbeat_s: Annotated[float, Field(gt=0)] = 10.0
    http_listen: Annotated[str, Field(pattern=r"^(off|[^\s:]+:\d{1,5})$")] = "127.0.0.1:9465"
    http_token: str | None = None
    public_url: Annotated[str, Field(pattern=r"^https?://\S+[^/]$")] | None = None
    log_format: Annotated[str, Field(pattern=r"^(json|text)$")] = "json"
    # libvirt backend
    libvirt_uri: str = "qemu:///system"
    libvirt_network: str | None = "default"
    libvirt_domain_type: Annotated[str, Field(pattern=r"^(kvm|qemu|auto)$")] = "auto"
    # zones backend (illumos bhyve)
    zones_dataset: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")] = "rpool/orchestrator"
    zones_zonepath_root: Path = Path("/zones")
    zones_global_nic: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+$")] | None = None
    orchestrator_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")] = "ci-orchestrator"
    # job requests: a body over this is refused before it is parsed (the default admits
    # the largest valid request, see messages.MAX_MESSAGE_BYTES)
    max_message_bytes: Annotated[int, Field(ge=4096)] = MAX_MESSAGE_BYTES
    # what HTTP clients may hold (see orchestrator/web/app.py `HttpLimits`)
    http_max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 256
    http_header_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    http_max_streams: Annotated[int, Field(ge=1, le=1_000_000)] = 64

    @field_validator("http_listen")
    @classmethod
    def _port_in_range(cls, value: str) -> str:
        if value != "off" and not 0 < int(value.rpartition(":")[2]) <= 65535:
            raise ValueError("the port must be 1-65535")
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        """One URL, or a comma-separated list of a cluster's nodes: each is checked, and
        the error names which one (without its password)."""
        urls = split_amqp_urls(value)
        if not urls:
            raise ValueError("no broker URL given")
        for position, url in enumerate(urls, start=1):
            where = f"URL {position} of {len(urls)} ({mask_password(url)})" if len(urls) > 1 else "it"
            if not url.startswith(("amqp://", "amqps://")):
                raise ValueError(f"{where} must start with amqp:// or amqps://")
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 - raises ValueError when out of range or not a number
            except ValueError as exc:
                raise ValueError(f"{where} is not a valid URL: {exc}") from None
            if not parts.hostname:
                raise ValueError(f"{where} names no host")
        return ",".join(urls)

    @property
    def amqp_urls(self) -> list[str]:
        """The broker nodes `AMQP_URL` lists, in order."""
        return split_amqp_urls(self.amqp_url)

    @property
    def state(self) -> StateDir:
        return StateDir(self.state_dir)

    @property
    def images_dir(self) -> Path:
        return self.image_dir or self.state.default_images

    def masked_amqp_url(self) -> str:
        """`AMQP_URL` for logs and messages: every node's password masked."""
        return ",".join(mask_password(url) for url in self.amqp_urls)


def mask_password(url: str) -> str:
    return re.sub(r"//([^:/@]+):([^@]+)@", r"//\1:****@", url)


# flag/field name -> environment variable
ENV_NAMES: Mapping[str, str] = {
    "amqp_url": "AMQP_URL",
    "broker_connect_timeout_s": "BROKER_CONNECT_TIMEOUT_S",
    "amqp_prefix": "AMQP_PREFIX",
    "amqp_exchange": "AMQP_EXCHANGE",
    "amqp_queue": "AMQP_QUEUE",
    "amqp_routing_key": "AMQP_ROUTING_KEY",
    "amqp_prefetch": "AMQP_PREFETCH",
    "config": "ORCH_CONFIG",
    "map_max_bytes": "MAP_MAX_BYTES",
    "max_concurrency": "MAX_CONCURRENCY",
    "capacity_map": "CAPACITY_MAP",
    "host_cpus": "HOST_CPUS",
    "host_memory_mb": "HOST_MEMORY_MB",
    "host_name": "HOST_NAME",
    "state_dir": "STATE_DIR",
    "image_dir": "IMAGE_DIR",
    "max_image_bytes": "MAX_IMAGE_BYTES",
    "backend": "ORCH_BACKEND",
    "drain_timeout_s": "DRAIN_TIMEOUT_S",
    "shutdown_timeout_s": "SHUTDOWN_TIMEOUT_S",
    "default_timeout_s": "DEFAULT_TIMEOUT_S",
    "warm_boots_at_once": "WARM_BOOTS_AT_ONCE",
    "boot_timeout_s": "BOOT_TIMEOUT_S",
    "console_max_bytes": "CONSOLE_MAX_BYTES",
    "delivery_limit": "DELIVERY_LIMIT",
    "quorum_size": "QUORUM_SIZE",
    "dlq_max_length": "DLQ_MAX_LENGTH",
    "max_hold_s": "MAX_HOLD_S",
    "retention_days": "RETENTION_DAYS",
    "max_attempts": "MAX_ATTEMPTS",
    "heartbeat_s": "HEARTBEAT_S",
    "http_listen": "HTTP_LISTEN",
    "http_token": "HTTP_TOKEN",
    "public_url": "PUBLIC_URL",
    "log_format": "LOG_FORMAT",
    "libvirt_uri": "LIBVIRT_URI",
    "libvirt_network": "LIBVIRT_NETWORK",
    "libvirt_domain_type": "LIBVIRT_DOMAIN_TYPE",
    "zones_dataset": "ZONES_DATASET",
    "zones_zonepath_root": "ZONES_ZONEPATH_ROOT",
    "zones_global_nic": "ZONES_GLOBAL_NIC",
    "orchestrator_id": "ORCH_ID",
    "max_message_bytes": "MAX_MESSAGE_BYTES",
    "http_max_connections": "HTTP_MAX_CONNECTIONS",
    "http_header_timeout_s": "HTTP_HEADER_TIMEOUT_S",
    "http_max_streams": "HTTP_MAX_STREAMS",
}


def load_settings(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> DaemonSettings:
    """Merge flags (None = not given) over the environment over defaults, then validate."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for name, env_name in ENV_NAMES.items():
        value = flags.get(name)
        if value is None and environ.get(env_name, "") != "":
            value = environ[env_name]
        if value is None:
            continue
        if name == "capacity_map" and isinstance(value, str):
            try:
                value = parse_capacity_map(value)
            except ValueError as exc:
                raise SettingsError(f"--capacity-map / CAPACITY_MAP: {exc}") from None
        if name == "libvirt_network" and value in ("", "none"):
            value = None
        raw[name] = value
    try:
        map_reference_settings(raw, default_prefix=DaemonSettings.model_fields["amqp_prefix"].default)
    except ReferenceError as exc:
        raise SettingsError(str(exc)) from None
    try:
        settings = DaemonSettings.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "?"
        flag = "--" + name.replace("_", "-")
        env_name = ENV_NAMES.get(name, "?")
        given = first.get("input")
        if name == "amqp_url" and isinstance(given, str):
            given = ",".join(mask_password(url) for url in split_amqp_urls(given))  # never a password in an error
        raise SettingsError(f"{flag} / {env_name}: {first['msg']} (got {given!r})") from None
    if settings.amqp_queue is not None and settings.amqp_queue in _own_queue_names(settings.amqp_prefix):
        raise SettingsError(
            f"AMQP_QUEUE={settings.amqp_queue} is one of this fleet's own queues: name the queue the reference "
            "integration's requests wait in (the reference's AMQP_QUEUE), or drop AMQP_QUEUE"
        )
    return settings


def _own_queue_names(prefix: str) -> set[str]:
    from orchestrator.core.topology import Topology  # (imports the image map; settings load first)

    own = Topology(prefix)
    return {own.unroutable_queue, own.dlq, own.dead_letters_queue, own.results_queue, own.forge_status_queue}
