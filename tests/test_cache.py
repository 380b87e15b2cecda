"""The history policy against the provider's bill, on small recorded sessions (bench/cache.py's quick
run): the default never costs more than leaving history alone (sticky) or than no hook, history
changes only when the policy says so, and what the agent used stays visible. Skipped, saying why,
when the corpus is absent."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench import cache, quality
from tests import corpus

pytestmark = [pytest.mark.corpus, pytest.mark.slow]


@pytest.fixture(scope="module")
def results(corpus_sessions: list[dict[str, Any]]) -> cache.Results:
    sessions = [s for s in corpus_sessions if s["name"] in cache.QUICK_SESSIONS]
    assert len(sessions) == len(cache.QUICK_SESSIONS), "the corpus no longer has the sessions this test replays"
    return asyncio.run(cache.measure(sessions))


@pytest.mark.parametrize("clock", cache.CLOCKS)
def test_the_default_costs_no_more_than_sticky_or_no_hook_on_any_session(results: cache.Results, clock: str) -> None:
    for name, none in results["none"][clock].items():
        auto = results["auto"][clock][name].total
        assert auto <= results["sticky"][clock][name].total + 0.01 * none.total, name
        assert auto <= none.total, name


@pytest.mark.parametrize("run", ["sticky", "auto", "clear", "oracle"])
@pytest.mark.parametrize("clock", cache.CLOCKS)
def test_history_changes_only_when_the_policy_says_so(results: cache.Results, run: str, clock: str) -> None:
    for name, result in results[run][clock].items():
        assert result.changes.get("unexplained", 0) == 0, (name, result.changes)
        assert result.changes.get("fresh record", 0) == 0, (name, result.changes)


def test_the_default_keeps_what_the_agent_used_visible(results: cache.Results) -> None:
    score = quality.Score()
    for result in results["auto"]["warm"].values():
        score.merge(result.score)
    assert score.total > 1000
    assert score.share >= 0.99
    assert score.old_strings and score.old_strings_visible == score.old_strings


def test_clearing_saves_more_and_charges_its_re_reads(results: cache.Results) -> None:
    names = list(results["none"]["warm"])
    assert cache.total(results, "clear", "warm", names) <= cache.total(results, "auto", "warm", names)
    for result in results["clear"]["warm"].values():
        assert result.total >= result.billed


def test_the_report_names_every_run(results: cache.Results, corpus_sessions: list[dict[str, Any]]) -> None:
    sessions = [s for s in corpus_sessions if s["name"] in cache.QUICK_SESSIONS]
    text = cache.report(results, sessions, "python -m bench.cache --quick", 1.0)
    for run in ("sticky", "plain", "auto", "clear", "oracle"):
        assert run in text
    assert "evidence visible" in text


def test_corpus_module_is_what_the_bench_uses() -> None:
    assert cache.corpus is corpus
