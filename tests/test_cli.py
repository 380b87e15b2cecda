"""The `hookd` command line: defaults, flags, HOOKD_<FLAG> variables and clear errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from hookd.cli import build_parser, parse_settings
from hookd.settings import Settings

FLAGS = [
    "--listen",
    "--events-listen",
    "--pool-size",
    "--max-compress",
    "--state-dir",
    "--verbose",
    "--no-affinity",
    "--no-accept-compressed",
    "--no-compress-response",
    "--affinity-wait",
    "--queue-timeout",
    "--read-timeout",
    "--queue-per-worker",
    "--drain-timeout",
    "--worker-max-rss",
    "--sticky-max-mb",
    "--sticky-ttl",
    "--token-file",
    "--admin-token-file",
    "--allow-unauthenticated",
    "--ml",
    "--ml-threads",
    "--ml-budget",
    "--model-cache",
    "--state-url",
    "--state-key-file",
    "--state-password-file",
    "--state-timeout",
    # usage metrics' user labels; tested in test_events.py
    "--hash-users",
    "--user-hash-key-file",
    "--max-user-labels",
]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def settings(*argv: str, **env: str) -> Settings:
    """parse_settings with a clean environment: only the HOOKD_ variables given here."""
    return parse_settings(list(argv), env=env)


def exit_message(capsys: pytest.CaptureFixture[str], *argv: str, **env: str) -> str:
    """What the user reads when hookd refuses to start (argparse prints, env errors carry it)."""
    with pytest.raises(SystemExit) as exited:
        settings(*argv, **env)
    assert exited.value.code not in (0, None)
    code = exited.value.code
    return (code if isinstance(code, str) else "") + capsys.readouterr().err


# --- defaults ---------------------------------------------------------------------------------------


def test_defaults() -> None:
    s = settings()
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.pool_size == cpu_count()
    assert s.max_compress == 60.0
    assert s.state_dir == Path("hookd-state")
    assert s.verbose is False
    assert s.affinity is True
    assert s.accept_compressed is True
    assert s.compress_response is True
    assert s.affinity_wait == 0.5
    assert s.queue_timeout == 2.0
    assert s.read_timeout == 30.0
    assert (s.ml, s.ml_threads, s.model_cache) == ("auto", 0, None)


def test_state_dir_follows_systemd_state_directory() -> None:
    assert parse_settings([], env={"STATE_DIRECTORY": "/var/lib/hookd"}).state_dir == Path("/var/lib/hookd")


def test_defaults_ignore_unrelated_environment() -> None:
    assert settings(PORT="9999", HOOKD="1", hookd_pool_size="3") == settings()


def test_process_environment_is_read_when_env_is_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOKD_POOL_SIZE", "3")
    assert parse_settings([]).pool_size == 3


# --- every flag -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "field", "expected"),
    [
        (["--listen", "0.0.0.0:9000"], "port", 9000),
        (["--listen", "0.0.0.0:9000"], "host", "0.0.0.0"),
        (["--listen", "hookd.example.ts.net:80"], "host", "hookd.example.ts.net"),
        (["--listen", ":7000"], "host", "0.0.0.0"),
        (["--listen=10.0.0.1:0"], "port", 0),
        (["--events-listen", "127.0.0.1:8081"], "events_listen", ("127.0.0.1", 8081)),
        (["--pool-size", "3"], "pool_size", 3),
        (["--max-compress", "12.5"], "max_compress", 12.5),
        (["--state-dir", "/var/lib/hookd"], "state_dir", Path("/var/lib/hookd")),
        (["-v"], "verbose", True),
        (["--verbose"], "verbose", True),
        (["--no-affinity"], "affinity", False),
        (["--no-accept-compressed"], "accept_compressed", False),
        (["--no-compress-response"], "compress_response", False),
        (["--affinity-wait", "0"], "affinity_wait", 0.0),
        (["--affinity-wait", "1.5"], "affinity_wait", 1.5),
        (["--queue-timeout", "0.25"], "queue_timeout", 0.25),
        (["--read-timeout", "5"], "read_timeout", 5.0),
        (["--queue-per-worker", "3"], "queue_per_worker", 3),
        (["--drain-timeout", "7"], "drain_timeout", 7.0),
        (["--worker-max-rss", "512"], "worker_max_rss_mb", 512),
        (["--sticky-max-mb", "64"], "sticky_max_mb", 64),
        (["--sticky-ttl", "300"], "sticky_ttl", 300.0),
        (["--ml", "off"], "ml", "off"),
        (["--ml", "on"], "ml", "on"),
        (["--ml-threads", "3"], "ml_threads", 3),
        (["--ml-budget", "4.5"], "ml_budget", 4.5),
        (["--model-cache", "/opt/hookd/models"], "model_cache", Path("/opt/hookd/models")),
    ],
)
def test_each_flag_sets_its_setting(argv: list[str], field: str, expected: Any) -> None:
    assert getattr(settings(*argv, "--allow-unauthenticated"), field) == expected


def test_a_flag_changes_only_its_own_setting() -> None:
    default, changed = settings(), settings("--queue-timeout", "1")
    assert {f: getattr(changed, f) for f in vars(changed) if getattr(changed, f) != getattr(default, f)} == {
        "queue_timeout": 1.0
    }


@pytest.mark.parametrize(("listen", "host", "port"), [("[::1]:9000", "::1", 9000), ("[::]:8080", "::", 8080)])
def test_ipv6_listen_address(listen: str, host: str, port: int) -> None:
    s = settings("--listen", listen, "--allow-unauthenticated")
    assert (s.host, s.port) == (host, port)


# --- HOOKD_<FLAG> environment variables -------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        ({"HOOKD_LISTEN": "[::1]:9001"}, "host", "::1"),
        ({"HOOKD_LISTEN": "[::1]:9001"}, "port", 9001),
        ({"HOOKD_EVENTS_LISTEN": "127.0.0.1:8081"}, "events_listen", ("127.0.0.1", 8081)),
        ({"HOOKD_POOL_SIZE": "5"}, "pool_size", 5),
        ({"HOOKD_MAX_COMPRESS": "30"}, "max_compress", 30.0),
        ({"HOOKD_STATE_DIR": "/tmp/state"}, "state_dir", Path("/tmp/state")),
        ({"HOOKD_VERBOSE": "1"}, "verbose", True),
        ({"HOOKD_NO_AFFINITY": "true"}, "affinity", False),
        ({"HOOKD_NO_ACCEPT_COMPRESSED": "yes"}, "accept_compressed", False),
        ({"HOOKD_NO_COMPRESS_RESPONSE": "on"}, "compress_response", False),
        ({"HOOKD_AFFINITY_WAIT": "0.1"}, "affinity_wait", 0.1),
        ({"HOOKD_QUEUE_TIMEOUT": "3"}, "queue_timeout", 3.0),
        ({"HOOKD_READ_TIMEOUT": "10"}, "read_timeout", 10.0),
        ({"HOOKD_ML": "off"}, "ml", "off"),
        ({"HOOKD_ML_THREADS": "2"}, "ml_threads", 2),
        ({"HOOKD_MODEL_CACHE": "/srv/models"}, "model_cache", Path("/srv/models")),
    ],
)
def test_each_environment_variable_sets_its_setting(env: dict[str, str], field: str, expected: Any) -> None:
    assert getattr(settings(**env), field) == expected


@pytest.mark.parametrize("word", ["0", "false", "no", "off", "", "FALSE", " No "])
def test_false_words_leave_switches_off(word: str) -> None:
    s = settings(HOOKD_NO_AFFINITY=word, HOOKD_VERBOSE=word)
    assert s.affinity is True
    assert s.verbose is False


@pytest.mark.parametrize("word", ["1", "true", "yes", "on", "TRUE", " Yes "])
def test_true_words_turn_switches_on(word: str) -> None:
    assert settings(HOOKD_NO_AFFINITY=word).affinity is False


@pytest.mark.parametrize(
    ("argv", "env", "field", "expected"),
    [
        (["--pool-size", "2"], {"HOOKD_POOL_SIZE": "6"}, "pool_size", 2),
        (["--listen", "127.0.0.1:1"], {"HOOKD_LISTEN": "0.0.0.0:2"}, "port", 1),
        (["--max-compress", "5"], {"HOOKD_MAX_COMPRESS": "50"}, "max_compress", 5.0),
        (["--state-dir", "flag"], {"HOOKD_STATE_DIR": "env"}, "state_dir", Path("flag")),
        (["--affinity-wait", "0"], {"HOOKD_AFFINITY_WAIT": "2"}, "affinity_wait", 0.0),
        (["--queue-timeout", "1"], {"HOOKD_QUEUE_TIMEOUT": "4"}, "queue_timeout", 1.0),
        (["--read-timeout", "7"], {"HOOKD_READ_TIMEOUT": "70"}, "read_timeout", 7.0),
        (["--verbose"], {"HOOKD_VERBOSE": "0"}, "verbose", True),
        (["--no-affinity"], {"HOOKD_NO_AFFINITY": "0"}, "affinity", False),
    ],
)
def test_a_flag_beats_the_environment(argv: list[str], env: dict[str, str], field: str, expected: Any) -> None:
    assert getattr(settings(*argv, **env), field) == expected


# --- bad values exit with a clear message -----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--listen", "127.0.0.1:70000"], "0-65535"),
        (["--listen", "127.0.0.1:-1"], "0-65535"),
        (["--listen", "localhost"], "HOST:PORT"),
        (["--listen", "localhost:http"], "number"),
        (["--events-listen", "8081"], "--events-listen"),
        (["--events-listen", "127.0.0.1:80000"], "0-65535"),
        (["--pool-size", "0"], "at least 1"),
        (["--pool-size", "-2"], "at least 1"),
        (["--pool-size", "two"], "--pool-size"),
        (["--max-compress", "0"], "greater than 0"),
        (["--max-compress", "-1"], "greater than 0"),
        (["--max-compress", "nan"], "greater than 0"),
        (["--affinity-wait", "-0.5"], "0 or more"),
        (["--queue-timeout", "-1"], "greater than 0"),
        (["--read-timeout", "-30"], "greater than 0"),
        (["--read-timeout", "soon"], "--read-timeout"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--ml", "maybe"], "choose from 'auto', 'on', 'off'"),
        (["--ml-threads", "-1"], "0 or more"),
        (["--ml-budget", "0"], "greater than 0"),
    ],
)
def test_bad_flag_values_exit_with_a_clear_message(
    capsys: pytest.CaptureFixture[str], argv: list[str], mentions: str
) -> None:
    assert mentions in exit_message(capsys, *argv)


@pytest.mark.parametrize(
    ("env", "mentions"),
    [
        ({"HOOKD_LISTEN": "127.0.0.1:70000"}, "HOOKD_LISTEN"),
        ({"HOOKD_POOL_SIZE": "0"}, "HOOKD_POOL_SIZE"),
        ({"HOOKD_POOL_SIZE": "many"}, "HOOKD_POOL_SIZE"),
        ({"HOOKD_MAX_COMPRESS": "-5"}, "HOOKD_MAX_COMPRESS"),
        ({"HOOKD_AFFINITY_WAIT": "-1"}, "HOOKD_AFFINITY_WAIT"),
        ({"HOOKD_QUEUE_TIMEOUT": "0"}, "HOOKD_QUEUE_TIMEOUT"),
        ({"HOOKD_READ_TIMEOUT": "-1"}, "HOOKD_READ_TIMEOUT"),
        ({"HOOKD_NO_AFFINITY": "maybe"}, "HOOKD_NO_AFFINITY"),
        ({"HOOKD_VERBOSE": "2"}, "HOOKD_VERBOSE"),
        ({"HOOKD_ML": "sometimes"}, "HOOKD_ML"),
    ],
)
def test_bad_environment_values_exit_naming_the_variable(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], mentions: str
) -> None:
    message = exit_message(capsys, **env)
    assert mentions in message
    assert message.startswith("hookd:")


def test_bad_switch_value_lists_the_accepted_words(capsys: pytest.CaptureFixture[str]) -> None:
    message = exit_message(capsys, HOOKD_NO_AFFINITY="maybe")
    assert "'maybe'" in message
    assert "true/false" in message


# --- help -------------------------------------------------------------------------------------------


def test_help_mentions_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        settings("--help")
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for flag in FLAGS:
        assert flag in text
    assert "HOOKD_" in text


def test_help_shows_the_environment_defaults() -> None:
    text = build_parser({"HOOKD_POOL_SIZE": "7"}).format_help()
    assert "7 here" in " ".join(text.split())


def test_every_flag_in_the_parser_is_tested() -> None:
    options = {opt for action in build_parser({})._actions for opt in action.option_strings if opt.startswith("--")}
    assert options - {"--help"} == set(FLAGS)


# --- tokens and exposure ----------------------------------------------------------------------------


def test_non_loopback_without_a_token_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    message = exit_message(capsys, "--listen", "0.0.0.0:8080")
    assert "not loopback" in message and "--token-file" in message


def test_events_on_a_non_loopback_address_without_a_token_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    message = exit_message(capsys, "--events-listen", "0.0.0.0:8081")
    assert "0.0.0.0" in message and "--token-file" in message


def test_events_on_the_hooks_own_address_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    message = exit_message(capsys, "--listen", "127.0.0.1:8080", "--events-listen", "127.0.0.1:8080")
    assert "--events-listen must differ from --listen" in message


def test_non_loopback_with_a_token_is_allowed(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    s = settings("--listen", "0.0.0.0:8080", "--token-file", str(token))
    assert s.hook_token == "s3cret"
    assert "s3cret" not in repr(s)


def test_tokens_come_from_files_named_in_the_environment(tmp_path: Path) -> None:
    (tmp_path / "hook").write_text("hook-token")
    (tmp_path / "admin").write_text("admin-token")
    s = settings(HOOKD_TOKEN_FILE=str(tmp_path / "hook"), HOOKD_ADMIN_TOKEN_FILE=str(tmp_path / "admin"))
    assert (s.hook_token, s.admin_token) == ("hook-token", "admin-token")


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_missing_or_empty_token_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None
) -> None:
    token = tmp_path / "token"
    if content is not None:
        token.write_text(content)
    message = exit_message(capsys, "--token-file", str(token))
    assert str(token) in message
