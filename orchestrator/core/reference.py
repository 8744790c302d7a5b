"""The reference orchestrator's settings (`../shared/seeds/004_*`), honoured or refused.

This project replaces the reference orchestrator without touching the forge integration
that feeds it, so an operator may start it with the reference's environment file. Each
setting the reference documents is honoured with the meaning it had there, mapped onto
this project's topology, or refused at start with one line naming our equivalent;
none is ignored. `orchestrator config check` shows what each became (`describe`).

| reference | here |
|---|---|
| `AMQP_URL`, `MAX_CONCURRENCY`, `CAPACITY_MAP`, `ORCH_CONFIG` / `--config`, `--max-concurrency`, `--capacity-map`, `LIBVIRT_URI`, `LIBVIRT_NETWORK` | the same settings, the same meaning |
| `AMQP_EXCHANGE` | bound into `<prefix>.jobs` with `AMQP_ROUTING_KEY` (nothing to do when it is `<prefix>.jobs`) |
| `AMQP_QUEUE` | consumed as an ingress: each request re-published to its label's queue |
| `AMQP_ROUTING_KEY` | the key of that binding (default `jobrequest.v1`) |
| `AMQP_PREFETCH` | not applied: each host's window sets its prefetch (reported) |
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

REFERENCE_ROUTING_KEY = "jobrequest.v1"  # what the reference integration publishes with
# RabbitMQ names: up to 255 bytes; ours stay printable and free of spaces.
AMQP_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,255}$"
# The reference's settings that mean here what they meant there.
SAME_HERE = {
    "AMQP_URL": "the broker (a cluster's nodes may be listed, comma-separated)",
    "ORCH_CONFIG": "the image map",
    "MAX_CONCURRENCY": "jobs at once on this host",
    "CAPACITY_MAP": "jobs at once per label",
    "LIBVIRT_URI": "the libvirt connection",
    "LIBVIRT_NETWORK": "the libvirt network of job VMs",
}


class ReferenceError(ValueError):
    """A reference setting this project cannot honour; the message is the one line."""


class ReferenceSetting(BaseModel):
    """One reference setting found in the environment, and what it became here."""

    model_config = ConfigDict(frozen=True)

    variable: str
    value: str
    became: str


def map_reference_settings(raw: dict[str, Any], *, default_prefix: str) -> None:
    """Check the reference's AMQP settings in `raw` (field name → value, as
    `config.load_settings` gathers them) against ours, in place: an `AMQP_EXCHANGE` that
    is our own job exchange needs no binding. Raises `ReferenceError` for one that names
    another exchange of ours (binding it would loop results or events into the jobs)."""
    exchange = raw.get("amqp_exchange")
    if not exchange:
        return
    prefix = raw.get("amqp_prefix") or default_prefix
    if exchange == f"{prefix}.jobs":
        raw["amqp_exchange"] = None
        return
    ours = {f"{prefix}.{name}" for name in ("jobs.unroutable", "results", "events", "control", "dlx")}
    if exchange in ours:
        raise ReferenceError(
            f"AMQP_EXCHANGE={exchange} is one of this fleet's own exchanges: name the exchange the reference "
            f"integration publishes its requests to (the reference's AMQP_EXCHANGE), or drop AMQP_EXCHANGE"
        )


def describe(
    environ: Mapping[str, str],
    *,
    prefix: str,
    exchange: str | None,
    queue: str | None,
    routing_key: str,
    prefetch: int | None,
) -> Iterator[ReferenceSetting]:
    """What each reference setting in `environ` became, given the settings loaded (the
    caller masks the password in `AMQP_URL`)."""
    jobs = f"{prefix}.jobs"
    for variable, meaning in SAME_HERE.items():
        if environ.get(variable):
            yield ReferenceSetting(
                variable=variable, value=environ[variable], became=f"the same setting here: {meaning}"
            )
    if environ.get("AMQP_EXCHANGE"):
        value = environ["AMQP_EXCHANGE"]
        if exchange is None:
            became = f"this fleet's own job exchange (AMQP_PREFIX={prefix}): nothing to bind"
        elif queue is not None:
            became = f"the exchange AMQP_QUEUE {queue} is bound to (key {routing_key})"
        else:
            became = f"bound into {jobs} with key {routing_key}: requests published there reach the label queues"
        yield ReferenceSetting(variable="AMQP_EXCHANGE", value=value, became=became)
    if environ.get("AMQP_QUEUE"):
        yield ReferenceSetting(
            variable="AMQP_QUEUE",
            value=environ["AMQP_QUEUE"],
            became=f"consumed as an ingress: each request re-published to {jobs} with its runs_on (or the default label)",
        )
    if environ.get("AMQP_ROUTING_KEY"):
        if exchange is None and queue is None:
            became = (
                f"{jobs} has no label queue bound with it: requests published with it are re-published "
                "with their runs_on (or the default label), as any unroutable request"
            )
        else:
            became = "the key of the ingress binding"
        yield ReferenceSetting(variable="AMQP_ROUTING_KEY", value=environ["AMQP_ROUTING_KEY"], became=became)
    if environ.get("AMQP_PREFETCH"):
        yield ReferenceSetting(
            variable="AMQP_PREFETCH",
            value=environ["AMQP_PREFETCH"],
            became=(
                "not applied: each host's window sets its consumers' prefetch from what it can start now "
                "(MAX_CONCURRENCY, CAPACITY_MAP, CPU and memory); a fixed prefetch would let the broker send "
                "more than fits" + (f" (read as {prefetch})" if prefetch is not None else "")
            ),
        )
