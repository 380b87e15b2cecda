"""Prompt-cache safety, measured on small recorded sessions with bench/cache.py's cost model:
sticky mode sends history byte for byte whatever serves the turn, and costs no more than plain
per-turn compression; the oracle bound (each message compressed as in the session's final
request) is cache-stable and no worse than sticky. Skipped, saying why, when the corpus is absent."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bench import cache
from tests import corpus

pytestmark = [pytest.mark.corpus, pytest.mark.slow]
SESSIONS = {"cc-reliability-python-to-rust-port", "local-cc-agentlogs-jq"}


@pytest.fixture(scope="module")
def results(corpus_sessions: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    sessions = [s for s in corpus_sessions if s["name"] in SESSIONS]
    assert len(sessions) == len(SESSIONS), "the corpus no longer has the sessions this test replays"
    return asyncio.run(cache.measure(sessions, Path(tmp_path_factory.mktemp("cache"))))


@pytest.mark.parametrize("run", ["c_sticky", "c_sticky_no_affinity", "c_sticky_worker_killed"])
def test_sticky_history_is_byte_identical_every_turn(results: dict[str, Any], run: str) -> None:
    assert results[run].turns > 50
    assert results[run].stability == 1.0, results[run].per_session


def test_after_a_restart_at_most_one_turn_is_unstable(results: dict[str, Any]) -> None:
    for name, figures in results["c_sticky_hookd_restarted"].per_session.items():
        assert figures["unstable_turns"] <= 1, name


def test_sticky_costs_no_more_than_plain_compression(results: dict[str, Any]) -> None:
    assert results["c_sticky"].billed <= results["b_plain"].billed
    assert results["c_sticky"].billed <= results["a_no_hook"].billed


def test_the_oracle_bound_is_stable_and_no_worse_than_sticky(results: dict[str, Any]) -> None:
    oracle = results["d_oracle"]
    assert oracle.stability == 1.0, oracle.per_session
    assert all(figures["not_prefix_turns"] == 0 for figures in oracle.per_session.values()), oracle.per_session
    # Not exact: some of headroom's choices depend on the rest of the conversation (a search result
    # is ranked against the newest question), so sticky mode may now and then leave a message a
    # little smaller than the final request's compression does.
    assert oracle.billed <= 1.01 * results["c_sticky"].billed
    assert oracle.billed <= results["a_no_hook"].billed


def test_corpus_module_is_what_the_bench_uses() -> None:
    assert cache.corpus is corpus
