"""The bridge's HTTP side: `POST /hooks/<forge>`, `GET /healthz`, `/readyz`, `/metrics`.

A delivery is answered only after it is safe: bodies above `max_body_bytes` are refused
before they are read (413); an unknown repository gets 403, a wrong signature 401, a
body that cannot be read 400 with the reason; pings 200; events the bridge does not act
on 204; an event it acts on is journaled first, then answered 202 (also when the broker
is away: the job is published once it is back). A redelivery (same delivery id) is
answered 202 and publishes nothing new. The receiver never branches on a forge's name.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.core.httpserver import headers_arrived
from orchestrator.core.logsetup import EventLogger
from orchestrator.forge.base import Forge, Ignored, Ping, WebhookError
from orchestrator.forge.config import LoadedForgeConfig
from orchestrator.forge.dispatcher import Dispatcher

log = EventLogger("orchestrator.forge.receiver")

BODIES_AT_ONCE = 4


class _Metrics(Collector):
    def __init__(self, webhooks: Counter[tuple[str, str]], extra: Callable[[], list[Any]]) -> None:
        self._webhooks = webhooks
        self._extra = extra

    def collect(self) -> Any:
        family = CounterMetricFamily(
            "orchestrator_forge_webhooks", "Webhook deliveries by forge and answer", labels=["forge", "outcome"]
        )
        for (forge, outcome), count in sorted(self._webhooks.items()):
            family.add_metric([forge, outcome], count)
        yield family
        yield from self._extra()


def build_receiver(
    *,
    forges: Mapping[str, Forge],
    config: LoadedForgeConfig,
    dispatcher: Dispatcher,
    not_ready_reasons: Callable[[], list[str]],
    metrics: Callable[[], list[Any]],
    broker_node: Callable[[], str | None] = lambda: None,
) -> web.Application:
    webhooks: Counter[tuple[str, str]] = Counter()
    # Bodies are read (up to max_body_bytes each) before they can be authenticated: only
    # a few at once, so a flood of large unsigned bodies costs bounded memory.
    reading = asyncio.Semaphore(BODIES_AT_ONCE)
    registry = CollectorRegistry()
    registry.register(_Metrics(webhooks, metrics))

    def answer(forge: str, outcome: str, status: int, text: str) -> web.Response:
        webhooks[(forge, outcome)] += 1
        if status == 204:
            return web.Response(status=204)
        return web.json_response({"outcome": outcome, "detail": text}, status=status)

    async def hook(request: web.Request) -> web.Response:
        name = request.match_info["forge"]
        forge = forges.get(name)
        if forge is None:
            raise web.HTTPNotFound(text=f"no forge named {name!r} here (forges: {', '.join(sorted(forges))})\n")
        async with reading:
            body = await request.read()
        headers = request.headers
        try:
            full_name = forge.repository_of(body)
        except WebhookError as exc:
            return answer(name, "malformed", 400, str(exc))
        repo = config.config.repository(name, full_name) if full_name else None
        if repo is None:
            log.warning("webhook.unknown_repository", forge=name, repo=full_name)
            return answer(
                name, "unknown_repository", 403, f"repository {full_name!r} is not configured for this bridge"
            )
        if not forge.authentic(headers, body, config.webhook_secrets(name, repo)):
            log.warning("webhook.bad_signature", forge=name, repo=full_name)
            return answer(name, "bad_signature", 401, "the signature does not match this repository's webhook secret")
        try:
            outcome = forge.parse(headers, body)
        except WebhookError as exc:
            return answer(name, "malformed", 400, str(exc))
        if isinstance(outcome, Ping):
            return answer(name, "ping", 200, "pong")
        if isinstance(outcome, Ignored):
            return answer(name, "ignored", 204, outcome.reason)
        delivery_id = forge.delivery_id(headers) or "sha256:" + hashlib.sha256(body).hexdigest()
        fresh = await dispatcher.submit(name, delivery_id, outcome, source="webhook")
        log.info(
            "webhook.accepted",
            forge=name,
            repo=full_name,
            delivery=delivery_id,
            redelivery=not fresh,
            kind=outcome.kind.value,
            commit=outcome.commit_sha,
            ref=outcome.ref_key,
        )
        return answer(name, "accepted" if fresh else "redelivery", 202, delivery_id)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        reasons = not_ready_reasons()
        body = {"ready": not reasons, "broker_node": broker_node(), "reasons": reasons}
        return web.json_response(body, status=200 if not reasons else 503)

    async def metrics_page(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    app = web.Application(client_max_size=config.config.max_body_bytes, middlewares=[headers_arrived])
    app.add_routes(
        [
            web.post("/hooks/{forge}", hook),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics_page),
        ]
    )
    return app


def gauges(
    dispatcher: Dispatcher,
    sent: Counter[str],
    dropped: Counter[tuple[str, str]],
    broker_connected: bool,
    caught_up: Counter[tuple[str, str]],
    last_pass: dict[tuple[str, str], float],
) -> list[Any]:
    """The bridge's own numbers for /metrics."""
    published = CounterMetricFamily(
        "orchestrator_forge_jobs_published", "Jobs published with confirms", value=dispatcher.counts["jobs_published"]
    )
    statuses = CounterMetricFamily(
        "orchestrator_forge_statuses_set", "Commit statuses the forges took", labels=["forge"]
    )
    for forge, count in sorted(sent.items()):
        statuses.add_metric([forge], count)
    failures = CounterMetricFamily(
        "orchestrator_forge_status_failures", "Commit statuses a forge refused (not retried)", labels=["forge", "code"]
    )
    for (forge, code), count in sorted(dropped.items()):
        failures.add_metric([forge, code], count)
    broker = GaugeMetricFamily(
        "orchestrator_forge_broker_connected", "1 while the broker connection is open", value=float(broker_connected)
    )
    # A count that keeps rising means webhooks are being lost (alert on it).
    caught = CounterMetricFamily(
        "orchestrator_forge_caught_up", "Commits run by catch-up, not by their webhook", labels=["forge", "repo"]
    )
    for (forge, repo), count in sorted(caught_up.items()):
        caught.add_metric([forge, repo], count)
    webhook_at = GaugeMetricFamily(
        "orchestrator_forge_last_webhook_timestamp_seconds",
        "When a repository's last webhook came",
        labels=["forge", "repo"],
    )
    for (forge, repo), at in sorted(dispatcher.last_webhook.items()):
        webhook_at.add_metric([forge, repo], at)
    pass_at = GaugeMetricFamily(
        "orchestrator_forge_last_catchup_timestamp_seconds",
        "When catch-up last listed a repository",
        labels=["forge", "repo"],
    )
    for (forge, repo), at in sorted(last_pass.items()):
        pass_at.add_metric([forge, repo], at)
    return [published, statuses, failures, broker, caught, webhook_at, pass_at]
