"""Session affinity: a conversation keeps the same key across turns, restarts and processes."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from hookd.affinity import session_key, slot_for

REPO = Path(__file__).resolve().parent.parent

# blake2b(b"session\0sess_xyz789", digest_size=16): fixed forever, or every deploy reshuffles sessions.
SESSION_KEY_HEX = "18beabeb741c99b673e9c320fef0548b"

FIRST_TWO: list[dict[str, Any]] = [
    {"role": "user", "content": [{"type": "text", "text": "fix the failing test"}]},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "pytest -q", "timeout": 60}},
        ],
    },
]


def conversation(*later: dict[str, Any]) -> list[dict[str, Any]]:
    return copy.deepcopy(FIRST_TWO) + list(later)


def key_in_fresh_process(session_id: str, messages: list[Any], hash_seed: str) -> str:
    """session_key computed by another interpreter with a different str-hash seed."""
    code = (
        "import json, sys; from hookd.affinity import session_key; "
        "print(session_key(sys.argv[1], json.loads(sys.argv[2])).hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    result = subprocess.run(
        [sys.executable, "-c", code, session_id, json.dumps(messages)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )
    return result.stdout.strip()


# --- with a session id ------------------------------------------------------------------------------


def test_session_id_gives_a_known_stable_key() -> None:
    assert session_key("sess_xyz789", []).hex() == SESSION_KEY_HEX


def test_session_id_key_ignores_the_messages() -> None:
    assert session_key("sess_xyz789", conversation()) == session_key("sess_xyz789", [])


def test_different_session_ids_get_different_keys() -> None:
    assert session_key("sess_a", FIRST_TWO) != session_key("sess_b", FIRST_TWO)


def test_key_is_16_bytes() -> None:
    assert len(session_key("s", [])) == 16
    assert len(session_key("", FIRST_TWO)) == 16


@pytest.mark.parametrize("hash_seed", ["1", "12345"])
def test_key_is_the_same_in_another_process(hash_seed: str) -> None:
    assert key_in_fresh_process("sess_xyz789", [], hash_seed) == SESSION_KEY_HEX
    assert key_in_fresh_process("", FIRST_TWO, hash_seed) == session_key("", FIRST_TWO).hex()


# --- without a session id ---------------------------------------------------------------------------


def test_without_session_id_later_messages_do_not_change_the_key() -> None:
    turn_1 = conversation()
    turn_2 = conversation({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]})
    turn_3 = conversation(*turn_2[2:], {"role": "assistant", "content": "done"}, {"role": "user", "content": "thanks"})
    assert session_key("", turn_1) == session_key("", turn_2) == session_key("", turn_3)


def test_without_session_id_object_key_order_does_not_matter() -> None:
    reordered = [
        {"content": [{"text": "fix the failing test", "type": "text"}], "role": "user"},
        {
            "content": [
                {"text": "Let me look.", "type": "text"},
                {"input": {"timeout": 60, "command": "pytest -q"}, "name": "Bash", "id": "toolu_1", "type": "tool_use"},
            ],
            "role": "assistant",
        },
    ]
    assert session_key("", reordered) == session_key("", FIRST_TWO)


def test_without_session_id_cache_control_anywhere_is_ignored() -> None:
    marked = conversation()
    marked[0]["content"][0]["cache_control"] = {"type": "ephemeral"}
    marked[1]["content"][1]["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
    marked[1]["cache_control"] = {"type": "ephemeral"}
    marked[1]["content"][1]["input"]["cache_control"] = "nested too"
    assert session_key("", marked) == session_key("", FIRST_TWO)


def test_cache_control_on_a_later_turn_moving_does_not_change_the_key() -> None:
    turn_1 = conversation({"role": "user", "content": [{"type": "text", "text": "go", "cache_control": {}}]})
    turn_2 = conversation({"role": "user", "content": [{"type": "text", "text": "go"}]})
    assert session_key("", turn_1) == session_key("", turn_2)


def test_without_session_id_different_first_messages_get_different_keys() -> None:
    other = conversation()
    other[0]["content"][0]["text"] = "fix the failing build"
    assert session_key("", other) != session_key("", FIRST_TWO)


def test_without_session_id_a_different_second_message_changes_the_key() -> None:
    other = conversation()
    other[1]["content"][0]["text"] = "Looking now."
    assert session_key("", other) != session_key("", FIRST_TWO)


def test_session_id_and_messages_keys_do_not_collide() -> None:
    assert session_key("[]", []) != session_key("", [])


def test_key_does_not_mutate_the_messages() -> None:
    marked = conversation()
    marked[0]["content"][0]["cache_control"] = {"type": "ephemeral"}
    before = copy.deepcopy(marked)
    session_key("", marked)
    assert marked == before


# --- slot_for ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_size", [1, 2, 3, 4, 7, 8, 64])
def test_slot_is_within_the_pool(pool_size: int) -> None:
    rng = random.Random(pool_size)
    for _ in range(200):
        assert 0 <= slot_for(session_key(f"sess-{rng.getrandbits(64):x}", []), pool_size) < pool_size


def test_same_key_same_slot() -> None:
    key = session_key("sess_xyz789", [])
    assert len({slot_for(key, 4) for _ in range(10)}) == 1


def test_slots_spread_roughly_evenly() -> None:
    rng = random.Random(20240601)
    ids = [f"sess-{rng.getrandbits(64):016x}" for _ in range(1000)]
    counts = Counter(slot_for(session_key(session_id, []), 4) for session_id in ids)
    assert sorted(counts) == [0, 1, 2, 3]
    assert all(150 <= count <= 350 for count in counts.values()), counts


def test_conversations_without_session_id_spread_too() -> None:
    keys = [session_key("", [{"role": "user", "content": f"task number {i}"}]) for i in range(1000)]
    counts = Counter(slot_for(key, 4) for key in keys)
    assert all(150 <= count <= 350 for count in counts.values()), counts
