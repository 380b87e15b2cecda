"""Runtime compression settings: the `/config` document, its validation and its file.

The knobs are headroom's `CompressConfig` fields under their own names and defaults (as
tsheadroom exposes them), plus hookd's own: `affinity_wait`, the history policy (`history` and
its `history_*` sizes, see `hookd.history`) and overrides of the provider cache price table
(`cache_prices`, see `hookd.prices`). A change is validated whole before anything moves, written
atomically under the state directory, and read by the next request: workers get the knobs with
every job, so nothing restarts.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from hookd import history, prices

log = logging.getLogger("hookd.config")

FILE_NAME = "settings.json"
MAX_PROTECT_RECENT = 10_000
MAX_MIN_TOKENS = 10_000_000
MAX_AFFINITY_WAIT = 30.0
MAX_MODEL_NAME = 200

DEFAULTS: dict[str, Any] = {
    "compress_user_messages": False,
    "compress_system_messages": True,
    "protect_recent": 4,
    "protect_analysis_context": True,
    "target_ratio": None,
    "min_tokens_to_compress": 250,
    "kompress_model": None,
    "savings_profile": None,
    "affinity_wait": 0.5,
    "history": "auto",
    "history_batch": history.Knobs.batch,
    "history_interval": history.Knobs.interval,
    "history_keep": history.Knobs.keep,
    "cache_prices": {},
}
# Knobs that go to headroom's compress() with every job; the rest are hookd's own.
COMPRESS_KNOBS = (
    "compress_user_messages",
    "compress_system_messages",
    "protect_recent",
    "protect_analysis_context",
    "target_ratio",
    "min_tokens_to_compress",
    "kompress_model",
    "savings_profile",
)
# Settings of earlier versions, read from an old file and translated (see Store._load).
RETIRED = {"sticky": "history"}
READ_ONLY = ("headroom_version", "ml_text_compression", "ml_reason", "ml_provider", "savings_profiles", "workers")


class InvalidSettings(ValueError):
    """A settings change names an unknown field or gives a field a value it cannot take."""


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidSettings(f"{name} must be true or false")
    return value


def _int_in(low: int, high: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        # bool is an int in Python, never in a JSON document meant as a number.
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidSettings(f"{name} must be an integer from {low} to {high}")
        return value

    return check


def _target_ratio(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise InvalidSettings(f"{name} must be null or a number in (0, 1]")
    return float(value)


def _model_name(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_MODEL_NAME:
        raise InvalidSettings(f'{name} must be null, "disabled" or a model id of at most {MAX_MODEL_NAME} characters')
    return value


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_AFFINITY_WAIT:
        raise InvalidSettings(f"{name} must be a number of seconds from 0 to {MAX_AFFINITY_WAIT}")
    if math.isnan(value):
        raise InvalidSettings(f"{name} must be a number")
    return float(value)


def _history(name: str, value: Any) -> str:
    if value not in history.MODES:
        raise InvalidSettings(f"{name} must be one of {', '.join(history.MODES)}")
    return str(value)


def _prices(name: str, value: Any) -> dict[str, Any]:
    try:
        return prices.validate(value)
    except prices.InvalidPrices as exc:
        raise InvalidSettings(str(exc)) from None


CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "compress_user_messages": _bool,
    "compress_system_messages": _bool,
    "protect_recent": _int_in(0, MAX_PROTECT_RECENT),
    "protect_analysis_context": _bool,
    "target_ratio": _target_ratio,
    "min_tokens_to_compress": _int_in(0, MAX_MIN_TOKENS),
    "kompress_model": _model_name,
    "affinity_wait": _seconds,
    "history": _history,
    "history_batch": _int_in(1, 1000),
    "history_interval": _int_in(1, 10_000),
    "history_keep": _int_in(0, 10_000),
    "cache_prices": _prices,
}


def validate(change: Any, profiles: list[str] | None, saved: bool = False) -> dict[str, Any]:
    """The change with every value checked, or InvalidSettings naming the first bad field.

    `profiles` are the savings profiles the workers' headroom knows; None before any worker has
    reported, when a new profile cannot be checked and is refused. A `saved` file's profile was
    checked when it was set and is taken as it is."""
    if not isinstance(change, dict):
        raise InvalidSettings("the body must be a JSON object of settings")
    checked: dict[str, Any] = {}
    for name, value in change.items():
        if name in READ_ONLY:
            raise InvalidSettings(f"{name} is read-only")
        if name in RETIRED:
            raise InvalidSettings(f"{name} was replaced by {RETIRED[name]} ({', '.join(history.MODES)})")
        if name == "savings_profile":
            checked[name] = _profile(value, profiles, saved)
        elif name in CHECKS:
            checked[name] = CHECKS[name](name, value)
        else:
            raise InvalidSettings(f"{name} is not a setting (known: {', '.join(DEFAULTS)})")
    return checked


def _profile(value: Any, profiles: list[str] | None, saved: bool) -> str | None:
    if value is None:
        return None
    if saved and isinstance(value, str):
        return value
    if profiles is None:
        raise InvalidSettings("savings_profile cannot be checked until a worker is warm; retry shortly")
    if value not in profiles:
        raise InvalidSettings(f"savings_profile must be null or one of {', '.join(profiles)}")
    return str(value)


def _upgraded(saved: Any) -> Any:
    """A settings file from before the history policy: `"sticky": false` meant plain per-turn
    compression; `true` was the old default, which the new default (auto) replaces."""
    if isinstance(saved, dict) and "sticky" in saved:
        saved = dict(saved)
        if saved.pop("sticky") is False:
            saved.setdefault("history", "plain")
    return saved


class Store:
    """The live settings and the file that keeps them across restarts."""

    def __init__(self, state_dir: Path, affinity_wait: float) -> None:
        self.path = state_dir / FILE_NAME
        self.values = {**DEFAULTS, "affinity_wait": affinity_wait}
        self.values.update(self._load())

    def _load(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            return validate(_upgraded(orjson.loads(raw)), profiles=None, saved=True) if raw.strip() else {}
        except (orjson.JSONDecodeError, InvalidSettings) as exc:
            # A bad file must not keep hookd from starting (systemd would restart it into the
            # same failure forever): keep it aside for the operator and start from defaults.
            aside = self.path.with_name(f"{FILE_NAME}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            log.error("settings file %s is unusable (%s); moved to %s, using defaults", self.path, exc, aside)
            return {}

    def compress_knobs(self) -> dict[str, Any]:
        return {name: self.values[name] for name in COMPRESS_KNOBS}

    def history_knobs(self) -> history.Knobs:
        v = self.values
        return history.Knobs(v["history"], v["history_batch"], v["history_interval"], v["history_keep"])

    def price_table(self) -> dict[str, prices.Prices]:
        return prices.merged(self.values["cache_prices"])

    def update(self, change: Mapping[str, Any], profiles: list[str] | None) -> dict[str, Any]:
        checked = validate(change, profiles)
        merged = {**self.values, **checked}
        self._write(merged)
        self.values = merged
        return merged

    def _write(self, values: dict[str, Any]) -> None:
        """Write to a temporary file, fsync it, rename it over the old one, fsync the directory:
        a crash at any point leaves either the old settings or the new, never half of each."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".settings-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(orjson.dumps(values, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
