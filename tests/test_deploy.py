"""The Prometheus rules and the Grafana dashboard under deploy/: promtool accepts the rules and
their unit tests (one firing case per alert), every query of the dashboard runs on a Prometheus
that scrapes a hookd, and every series they name is one hookd exports or a rule records."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from hookd import server
from hookd.config import Store
from hookd.metrics import Metrics
from hookd.settings import Settings
from tests.corpus import REPO
from tests.fakes import FakeCompressor
from tests.hookd_process import free_port

RULES = REPO / "deploy" / "prometheus" / "hookd-rules.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "hookd-rules.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "hookd.json"
# What Grafana puts in place of its variables before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$job": ".*", "$user": ".*", "$model": ".*"}
# Series Prometheus makes itself.
PROMETHEUS_OWN = {"up"}
SERIES_NAME = re.compile(r"\b(?:(?:hookd|headroom|process)_\w+|up\b)|\b\w+:\w+:\w+")
QUOTED = re.compile(r'"[^"]*"')


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(REPO / ".venv" / "bin"))
    if found is None:
        pytest.skip(f"{name} not installed (Debian package prometheus; scripts/test installs it)")
    return found


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    """Every PromQL query the dashboard sends, with Grafana's variables filled in as it would."""
    document = orjson.loads(DASHBOARD.read_bytes())
    queries = [t["expr"] for p in document["panels"] for t in p.get("targets", [])]
    for variable in document["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(SELECTOR, LABEL) is Grafana's; the selector is PromQL.
            queries.append(re.fullmatch(r"label_values\((.*), \w+\)", variable["query"]["query"]).group(1))
    for name, value in GRAFANA_VARIABLES.items():
        queries = [q.replace(name, value) for q in queries]
    return queries


def test_the_rules_pass_promtool_check() -> None:
    result = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_unit_tests_pass_and_every_alert_fires_in_one() -> None:
    result = subprocess.run(
        [tool("promtool"), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    fired = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert alerts and alerts == fired


def test_every_series_named_is_one_hookd_exports_or_a_rule_records(tmp_path: Path) -> None:
    metrics = Metrics()
    server.build_app(Settings(), FakeCompressor(), metrics, Store(tmp_path, 0.5))
    exported = set()
    for line in metrics.render().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            exported |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    texts = [rule["expr"] for rule in rules()] + dashboard_queries()
    named = {name for text in texts for name in SERIES_NAME.findall(QUOTED.sub('""', text))}
    assert named - exported - recorded - PROMETHEUS_OWN == set()
    assert recorded <= named, "a recording rule nothing reads"


@dataclasses.dataclass
class Scraped:
    url: str  # Prometheus


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    """Prometheus with hookd's rules, scraping a hookd (the app with a fake compressor)."""
    binary = tool("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    settings = Settings(port=free_port())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = server.build_app(settings, FakeCompressor(), Metrics(), Store(folder / "state", 0.5))
    runner = asyncio.run_coroutine_threadsafe(server.start_site(app, settings), loop).result(10)
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "hookd", "static_configs": [{"targets": [f"127.0.0.1:{settings.port}"]}]}],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _query(url, 'up{job="hookd"} == 1')["data"]["result"], process)
        yield Scraped(url)
    finally:
        process.terminate()
        process.wait(30)
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _query(url: str, expr: str) -> dict[str, Any]:
    address = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(address, timeout=10) as response:
            return dict(orjson.loads(response.read()))
    except urllib.error.HTTPError as exc:
        return dict(orjson.loads(exc.read()))


def _wait_for(ready: Any, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {process.stderr.read().decode()[-2000:] if process.stderr else ''}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("prometheus did not scrape hookd in time")


@pytest.mark.parametrize("expr", dashboard_queries())
def test_each_dashboard_query_runs_on_prometheus(prometheus: Scraped, expr: str) -> None:
    answer = _query(prometheus.url, expr)
    assert answer["status"] == "success", answer


def test_prometheus_loaded_the_rules(prometheus: Scraped) -> None:
    with urllib.request.urlopen(prometheus.url + "/api/v1/rules", timeout=10) as response:
        groups = orjson.loads(response.read())["data"]["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert loaded == {rule.get("record") or rule["alert"] for rule in rules()}
    assert all(rule["health"] != "err" for group in groups for rule in group["rules"])
