"""The usage benchmarks' quick modes: `bench.events` (events on top of hook traffic, against a real
hookd) and `bench.savings` (the corpus through hookd with the billing model's usage as events).
Timing is what the full runs measure; here only what holds on any machine is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import events, savings
from tests import corpus


@pytest.mark.slow
def test_events_on_top_of_hook_traffic_are_all_answered_and_counted(tmp_path: Path) -> None:
    events.main(["--quick", "--out", str(tmp_path)])
    document = json.loads((tmp_path / "results.json").read_text())
    without, with_events = document["runs"]
    assert with_events["events_sent"] > 500 and with_events["events_failed"] == 0
    # Every event answered is counted; at most one a connection was cut off mid-answer at the end.
    sent = with_events["events_sent"]
    assert sent <= with_events["events_counted"] <= sent + events.CONNECTIONS
    assert without["events_counted"] == 0
    assert without["hook_errors"] == with_events["hook_errors"] == 0
    assert with_events["hook_requests"] == without["hook_requests"] > 0
    # The front end holds no more for the events than allocator noise; a leak of a few KB an
    # event would show here as tens of MB.
    assert document["verdict"]["rss_growth_mb"] < 32
    # Every hook call waits for its event at most; the events run matches its own as they come.
    assert document["verdict"]["pending_max"] <= without["hook_requests"] + with_events["hook_requests"] + 100


@pytest.mark.slow
@pytest.mark.corpus
def test_hookd_savings_agrees_with_the_billing_model(tmp_path: Path) -> None:
    if not corpus.available():
        pytest.skip(corpus.why_missing())
    savings.main(["--quick", "--clocks", "warm", "--out", str(tmp_path)])
    document = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["user"], r["model"]): r for r in document["rows"]}
    replayed = sum(len(s["turn_ends"]) for s in corpus.sessions(savings.QUICK_SESSIONS))
    whole = rows[("all", "all")]
    assert whole["requests"] == replayed
    printed = document["printed"]["warm"]
    assert printed["observed_total"]["requests"] == replayed
    assert {(r["user"], r["model"]) for r in printed["observed"]} == {key for key in rows if "all" not in key}
    # With the provider's own count of the tokens hookd removed, the estimator's arithmetic
    # (which kind each removed token would have been billed as) reproduces the true savings, up
    # to where automatic caches put their 128-token steps.
    for row in document["rows"]:
        bound = max(savings.AGREEMENT * row["bench_saved"], row["rounding"])
        assert abs(row["structure_error"]) <= bound, row
