"""The shipped monitoring: examples/prometheus-alerts.yaml (and the forge bridge's rules)
pass `promtool check rules` and the unit tests in tests/fixtures/prometheus/, the
Grafana dashboard is valid JSON whose queries are valid PromQL, and every metric the
dashboard and the alerts query, and every one docs/operating.md lists, is what a live daemon
exports."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.core.imagemap import load_image_map
from orchestrator.core.images import PrepState
from tests.conftest import ROOT, wait_for
from tests.support.fakes.counting_noop import CountingNoop
from tests.support.rawhttp import scrape
from tests.web.test_httpapi import free_port

ALERTS = ROOT / "examples" / "prometheus-alerts.yaml"
FORGE_RULES = ROOT / "examples" / "prometheus" / "orchestrator-rules.yaml"
ALERT_TESTS = ROOT / "tests" / "fixtures" / "prometheus" / "alerts-test.yaml"
DASHBOARD = ROOT / "examples" / "grafana-dashboard.json"
METRIC_NAME = re.compile(r"\borchestrator_[a-z0-9_]+")
# Grafana's variables, as a query would see them once Grafana has filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*", "$label": ".*", "${datasource}": "prometheus"}


def promtool(*args: str | Path) -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool not found: apt-get install prometheus (scripts/bootstrap-host.sh installs it)")
    run = subprocess.run([found, *map(str, args)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard: its panels' targets and its variables'."""
    document = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in document["panels"] for target in panel.get("targets", [])]
    for variable in document["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(re.fullmatch(r"label_values\((.*), \w+\)", variable["definition"]).group(1))
    return queries


def filled_in(query: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    return query


def test_alert_rules_pass_promtool_check():
    out = promtool("check", "rules", ALERTS, FORGE_RULES)
    assert out.count("SUCCESS") == 2


def test_alert_rules_pass_their_unit_tests():
    promtool("test", "rules", ALERT_TESTS)


def test_every_alert_has_a_summary_and_a_severity():
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    assert len({rule["alert"] for rule in rules}) == len(rules) >= 8
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_dashboard_queries_are_valid_promql(tmp_path):
    queries = dashboard_queries()
    assert len(queries) >= 20
    # promtool parses expressions only in rule files: each query as a recording rule.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{number}", "expr": filled_in(query)}
                    for number, query in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    promtool("check", "rules", path)


def test_dashboard_panels_have_unique_ids_and_fit_the_grid():
    document = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids))
    for panel in document["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


# Declared on /metrics but with no sample in the live test: nothing failed there.
NOT_RECORDED_IN_THE_TEST = {"orchestrator_warm_failed_total"}


def exported_names(text: str) -> tuple[set[str], set[str], set[str]]:
    """The sample names a scrape holds (`..._total`, `..._bucket`, ...), the sample names
    its families declare (a labelled counter nothing has counted yet has a family and no
    sample), and the families' names."""
    samples, declared, families = set(), set(), set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        samples.update(sample.name for sample in family.samples)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        declared.update(family.name + suffix for suffix in suffixes)
    return samples, declared, families


async def test_dashboard_and_alerts_query_what_a_live_daemon_exports(
    daemon_factory, broker, cleanup_topology, tmp_path
):
    # alpha keeps a warm pool VM; beta is downloaded from a file:// source, so every kind
    # of series has been recorded once both have run a job.
    source, image_dir = tmp_path / "release.img", tmp_path / "images"
    source.write_bytes(b"release\n" * 10_000)
    document = {
        "default_label": "alpha",
        "images": {
            "alpha": {"backend": "noop", "local_path": "/nonexistent/alpha.img", "warm": {"ready": 1}},
            "beta": {
                "backend": "noop",
                "source": f"file://{source}",
                "local_path": str(image_dir / "beta.img"),
                "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
            },
        },
    }
    path = tmp_path / "map.yaml"
    path.write_text(yaml.safe_dump(document))
    port = free_port()
    daemon = await daemon_factory(
        load_image_map(path),
        backend=CountingNoop(),
        config=path,
        image_dir=image_dir,
        http_listen=f"127.0.0.1:{port}",
        max_concurrency=4,  # room for both jobs beside the pool VM: the pool never has to give it up
    )
    await wait_for(lambda: daemon.images.state("beta").state is PrepState.READY, what="beta's image")
    await wait_for(lambda: daemon.pools.status()["alpha"]["ready"] == 1, what="alpha's pool VM")
    await broker.open()
    await broker.submit(runs_on="alpha")
    await broker.submit(runs_on="beta")
    await broker.collect(2)
    await wait_for(lambda: daemon.pools.status()["alpha"]["ready"] == 1, what="alpha's pool to refill")
    await wait_for(
        lambda: daemon._dlq_messages is not None and daemon._state_dir_bytes is not None, what="housekeeping"
    )
    text = await scrape(port)
    samples, declared, families = exported_names(text)

    queried = {
        "the dashboard": {name for query in dashboard_queries() for name in METRIC_NAME.findall(query)},
        "the alerts": set(METRIC_NAME.findall(ALERTS.read_text())),
    }
    for where, names in queried.items():
        assert names, where
        assert not sorted(names - declared), f"{where} queries metrics the daemon does not export"
        assert not sorted(names - samples - NOT_RECORDED_IN_THE_TEST), (
            f"{where} queries series the live daemon did not record"
        )

    readme = (ROOT / "docs" / "operating.md").read_text()
    listed = set(METRIC_NAME.findall(readme))
    # (prometheus_client shows a histogram's start time as a gauge family of its own)
    ours = {name for name in families if name.startswith("orchestrator_") and not name.endswith("_created")}
    assert not sorted(name for name in ours if not {name, name + "_total"} & listed), (
        "exported but not in docs/operating.md"
    )
