"""The shared-state flags: --state-url, --state-key-file, --state-password-file, --state-timeout,
each also as HOOKD_<FLAG>; no request content goes to Redis without a key, and no secret is shown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import exit_message, settings

URL = "redis://hookd@redis.example:6379/0"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "state.key"
    path.write_text("0123456789abcdef0123456789abcdef0123456789a=\n")
    return path


def test_without_a_state_url_records_stay_in_memory() -> None:
    s = settings()
    assert (s.state_url, s.state_key, s.state_password, s.state_timeout) == (None, None, None, 0.05)


def test_a_state_url_with_a_key_file(key_file: Path) -> None:
    s = settings("--state-url", URL, "--state-key-file", str(key_file), "--state-timeout", "0.02")
    assert s.state_url == URL
    assert s.state_key == b"0123456789abcdef0123456789abcdef0123456789a="
    assert s.state_timeout == 0.02


def test_the_state_flags_come_from_the_environment(key_file: Path, tmp_path: Path) -> None:
    (tmp_path / "password").write_text("pw\n")
    s = settings(
        HOOKD_STATE_URL=URL,
        HOOKD_STATE_KEY_FILE=str(key_file),
        HOOKD_STATE_PASSWORD_FILE=str(tmp_path / "password"),
        HOOKD_STATE_TIMEOUT="0.1",
    )
    assert (s.state_url, s.state_password, s.state_timeout) == (URL, "pw", 0.1)


def test_no_key_file_no_shared_state(capsys: pytest.CaptureFixture[str]) -> None:
    message = exit_message(capsys, "--state-url", URL)
    assert "refusing --state-url without --state-key-file" in message


def test_hookd_refuses_to_start_without_a_key_file() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hookd", "--state-url", URL], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "--state-key-file" in done.stderr


@pytest.mark.parametrize(
    ("content", "said"), [(None, "cannot read key file"), ("short", "needs at least 32"), ("", "needs at least 32")]
)
def test_a_key_file_that_is_no_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str | None, said: str
) -> None:
    path = tmp_path / "state.key"
    if content is not None:
        path.write_text(content)
    message = exit_message(capsys, "--state-url", URL, "--state-key-file", str(path))
    assert said in message and str(path) in message


@pytest.mark.parametrize("url", ["http://redis.example:6379", "redis.example:6379", "memcached://x"])
def test_only_redis_urls(capsys: pytest.CaptureFixture[str], key_file: Path, url: str) -> None:
    message = exit_message(capsys, "--state-url", url, "--state-key-file", str(key_file))
    assert "redis://" in message


def test_a_password_in_one_place_only(capsys: pytest.CaptureFixture[str], key_file: Path, tmp_path: Path) -> None:
    (tmp_path / "password").write_text("pw")
    message = exit_message(
        capsys,
        "--state-url",
        "redis://hookd:other@redis.example/0",
        "--state-key-file",
        str(key_file),
        "--state-password-file",
        str(tmp_path / "password"),
    )
    assert "not both" in message


def test_key_and_password_files_need_a_url(capsys: pytest.CaptureFixture[str], key_file: Path) -> None:
    assert "need --state-url" in exit_message(capsys, "--state-key-file", str(key_file))


def test_no_secret_in_the_settings_repr(key_file: Path) -> None:
    s = settings("--state-url", "redis://hookd:hunter2hunter2@redis.example/0", "--state-key-file", str(key_file))
    text = repr(s)
    assert "hunter2" not in text and "0123456789abcdef" not in text


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_the_state_timeout_is_a_positive_number(capsys: pytest.CaptureFixture[str], value: str) -> None:
    assert "--state-timeout" in exit_message(capsys, "--state-timeout", value)
