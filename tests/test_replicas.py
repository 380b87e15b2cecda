"""Two real hookd replicas (real workers) sharing one real redis-server, behind haproxy in round
robin, started as an operator would from `examples/`: what reaches the provider is the same as
from one hookd, nothing readable lands in Redis, a dying replica or a failing Redis loses no
request. The full-length version of these checks is `python -m bench.replicas`.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bench.replicas import BILLED_TOLERANCE, Target, compare, faults, kill_mid_session, replay_sessions
from tests import client, corpus, deployment
from tests.test_sticky_hook import call, conversation

pytestmark = pytest.mark.slow
CANARY = "canary-7f3a9c1e-do-not-leak"
ALLOWANCE_S = 0.25
# hookd's own time per request may exceed the Redis allowance by 50 ms; the median must meet that
# on any machine (most requests are not asked to wait at all), and none may come near the length
# of a fault.
OWN_BOUND_MS = ALLOWANCE_S * 1000 + 50
FAULT_S = 3.0
QUICK_SESSIONS = {"cc-reliability-coverage-test-fix", "mini-deepseek-django-14752"}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[deployment.Deployment]:
    why = deployment.missing()
    if why:
        pytest.skip(why)
    # A patient allowance: a busy machine must not make a Redis call late, here; bench.replicas
    # measures the default one.
    home = tmp_path_factory.mktemp("replicas")
    deployed = deployment.Deployment(home, count=2, pool_size=1, flags=("--state-timeout", str(ALLOWANCE_S)))
    yield deployed
    deployed.stop()


def calls(session: str, turns: range) -> list[dict[str, Any]]:
    return [call(conversation(turn), session) for turn in turns]


async def test_nothing_readable_in_redis(deployed: deployment.Deployment, tmp_path: Path) -> None:
    monitor_file = tmp_path / "monitor.txt"
    monitor = deployed.redis.monitor(monitor_file)
    try:
        log = "".join(f"2024-05-01 12:00:{i % 60:02d} INFO worker {i} heartbeat ok\n" for i in range(400))
        planted = log + f"2024-05-01 12:01:00 ERROR {CANARY} failed to open /etc/secret\n" + log
        async with aiohttp.ClientSession() as http:
            for turn in range(2, 6):
                messages = conversation(turn)
                messages[2]["content"][0]["content"] = planted
                _, _, answer = await client.post(http, deployed.url, call(messages, f"session-{CANARY}"))
                assert answer["action"] == "modify"
        sent = orjson.dumps(answer["request_body"]["messages"]).decode()
        assert CANARY in sent and len(sent) < len(orjson.dumps(messages))  # it went upstream, compressed
        time.sleep(0.5)
    finally:
        monitor.terminate()
        monitor.wait()
    keys = deployed.redis.cli("--scan").stdout.split()
    assert any(k.endswith(":b") for k in keys), "the compressed history should be in Redis"
    seen = [monitor_file.read_text(errors="replace"), *keys]
    for key in keys:
        kind = deployed.redis.cli("TYPE", key).stdout.strip()
        if kind == "hash":
            seen.append(deployed.redis.cli("--no-raw", "HGETALL", key).stdout)
        seen.append(deployed.redis.cli("--no-raw", "DUMP", key).stdout)
    everything = "\n".join(seen)
    assert "hookd" in everything and "EVALSHA" in everything.upper()  # we did look at real traffic
    for secret in (CANARY, "secret", "heartbeat", "session-"):
        assert secret not in everything


@pytest.mark.corpus
async def test_corpus_through_two_replicas_is_billed_as_through_one(deployed: deployment.Deployment) -> None:
    if not corpus.available():
        pytest.skip(corpus.why_missing())
    sessions = corpus.sessions(QUICK_SESSIONS)
    one = deployed.replicas["hookd1"]
    single = await replay_sessions(Target(one.url, {"hookd1": one}), sessions, "single")
    shared = await replay_sessions(Target(deployed.url, deployed.replicas), sessions, "replicas")
    result = compare(single, shared)
    # Every change to history already sent was the history policy's, as with one replica.
    assert result.unexplained == 0, result.changes
    assert abs(result.ratio - 1) <= BILLED_TOLERANCE, result.as_json()


async def test_redis_failing_never_fails_a_request(deployed: deployment.Deployment) -> None:
    conversations = [calls("faults-a", range(2, 12)), calls("faults-b", range(1, 9))]
    phases = [p.as_json() for p in await faults(deployed, conversations, seconds=FAULT_S)]
    names = [p["name"] for p in phases]
    assert {"stopped", "paused", "slowed", "flooded"} <= set(names)
    for phase in phases:
        assert set(phase["statuses"]) == {"200"}, phase
        assert phase["own_ms_p50"] <= OWN_BOUND_MS, phase
        assert phase["own_ms_max"] < FAULT_S * 1000 / 3, phase
        if phase["name"].endswith(": after"):
            # Both replicas share again within seconds of Redis's return (the breaker's open time).
            assert phase["shared_again_s"] is not None and phase["shared_again_s"] <= 5, phase
    errors = 0.0
    async with aiohttp.ClientSession() as http:
        for hookd in deployed.replicas.values():
            async with http.get(hookd.url + "metrics") as response:
                text = await response.text()
            errors += sum(float(v) for v in re.findall(r"^hookd_state_errors_total\{.*\} (\S+)$", text, re.M))
            async with http.get(hookd.url + "readyz") as response:
                assert response.status == 200
    assert errors > 0
    for hookd in deployed.replicas.values():
        log = "".join(hookd.stderr)
        # Said once per fault, not per request.
        assert 0 < log.count("is failing") <= 4
        assert log.count("answering again") == log.count("is failing")


async def test_a_replica_killed_mid_session_loses_no_request_and_no_history(
    deployed: deployment.Deployment,
) -> None:
    conversations = [calls("kill-a", range(2, 14)), calls("kill-b", range(1, 13))]
    try:
        result = await kill_mid_session(deployed, conversations, "hookd1", after=8, tag="kill")
    finally:
        await asyncio.to_thread(deployed.restart, "hookd1")
    assert result.requests == sum(len(c) for c in conversations)
    assert result.after_kill >= 8
    assert result.failed == [] and result.unstable == []


def test_the_example_haproxy_configuration_is_valid_as_shipped() -> None:
    why = deployment.missing()
    if why:
        pytest.skip(why)
    checked = subprocess.run(
        ["haproxy", "-c", "-f", str(deployment.EXAMPLES / "haproxy.cfg")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
