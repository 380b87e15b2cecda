"""The `hookd` command: flags and `HOOKD_<FLAG>` environment variables into one `Settings`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hookd.auth import TokenFileError, is_loopback_host, read_token
from hookd.seal import KeyFileError, read_key
from hookd.settings import Settings, default_pool_size
from worker.ml import MODES as ML_MODES

ENV_PREFIX = "HOOKD_"
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}
# A key for --hash-users shorter than this could be guessed along with the names it hides.
MIN_HASH_KEY_CHARS = 16
STATE_SCHEMES = ("redis", "rediss", "unix")


class StateError(Exception):
    """The shared-state flags do not make a usable, private setup."""


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or :PORT (all interfaces) into (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"wants HOST:PORT, got {value!r}")
    if ":" in host and not host.startswith("["):
        raise argparse.ArgumentTypeError(f"wants [ADDRESS]:PORT for IPv6, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {port}")
    return host, port


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def ml_mode(value: str) -> str:
    if value not in ML_MODES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(ML_MODES)}, got {value!r}")
    return value


def env_flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(ENV_PREFIX + name, "").strip().lower()
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    raise SystemExit(f"hookd: {ENV_PREFIX}{name} must be one of 1/0, true/false, yes/no; got {raw!r}")


def env_value(env: Mapping[str, str], name: str, convert: Callable[[str], Any], default: Any) -> Any:
    raw = env.get(ENV_PREFIX + name)
    if raw is None:
        return default
    try:
        return convert(raw)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise SystemExit(f"hookd: {ENV_PREFIX}{name}={raw!r}: {exc}") from None


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hookd",
        description="Aperture pre_request hook that compresses LLM conversations with headroom-ai. "
        "Every flag can also be set as HOOKD_<FLAG> in the environment (HOOKD_POOL_SIZE=4, "
        "HOOKD_NO_AFFINITY=1); a flag on the command line wins.",
    )
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=env_value(env, "LISTEN", parse_listen, ("127.0.0.1", 8080)),
        metavar="HOST:PORT",
        help="address to serve on (default 127.0.0.1:8080). Loopback by default because a hook "
        "sees whole conversations; expose it only on a network you trust.",
    )
    parser.add_argument(
        "--events-listen",
        type=parse_listen,
        default=env_value(env, "EVENTS_LISTEN", parse_listen, None),
        metavar="HOST:PORT",
        help="take Aperture's entire_request events on this address, in a process of their own at a "
        "lower CPU priority than the hook's, instead of on --listen's /events; worth it past a few "
        "events a second (default: --listen's /events)",
    )
    parser.add_argument(
        "--pool-size",
        type=positive_int,
        default=env_value(env, "POOL_SIZE", positive_int, default_pool_size()),
        metavar="N",
        help="worker processes, each compressing one request at a time (default: CPU count, %(default)s here)",
    )
    parser.add_argument(
        "--max-compress",
        type=positive_float,
        default=env_value(env, "MAX_COMPRESS", positive_float, 60.0),
        metavar="SECONDS",
        help="hard cap on one compression; a worker past it is killed and respawned and the "
        "request is answered allow (default %(default)s)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=env_value(env, "STATE_DIR", Path, Path(env.get("STATE_DIRECTORY") or "hookd-state")),
        metavar="DIR",
        help="where hookd keeps its own settings, never request content "
        "(default $STATE_DIRECTORY under systemd, else ./hookd-state)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=env_flag(env, "VERBOSE"),
        help="print one summary line per request on stdout (sizes, timings, outcome; never content)",
    )
    parser.add_argument(
        "--no-affinity",
        action="store_true",
        default=env_flag(env, "NO_AFFINITY"),
        help="send each request to any free worker instead of its session's worker "
        "(loses headroom's warm per-process cache; for comparison)",
    )
    parser.add_argument(
        "--no-accept-compressed",
        action="store_true",
        default=env_flag(env, "NO_ACCEPT_COMPRESSED"),
        help="do not advertise Accept-Encoding: zstd, br, gzip on responses (RFC 7694); "
        "compressed request bodies are still decoded",
    )
    parser.add_argument(
        "--no-compress-response",
        action="store_true",
        default=env_flag(env, "NO_COMPRESS_RESPONSE"),
        help="never encode answers, even when the caller's Accept-Encoding allows it",
    )
    parser.add_argument(
        "--affinity-wait",
        type=non_negative_float,
        default=env_value(env, "AFFINITY_WAIT", non_negative_float, 0.5),
        metavar="SECONDS",
        help="how long a request waits for its session's busy worker before spilling to a free "
        "one (default %(default)s)",
    )
    parser.add_argument(
        "--queue-timeout",
        type=positive_float,
        default=env_value(env, "QUEUE_TIMEOUT", positive_float, 2.0),
        metavar="SECONDS",
        help="longest wait for any free worker before answering allow(overload) "
        "(default %(default)s, well under Aperture's 5 s hook timeout)",
    )
    parser.add_argument(
        "--queue-per-worker",
        type=positive_int,
        default=env_value(env, "QUEUE_PER_WORKER", positive_int, 8),
        metavar="N",
        help="requests that may wait for a worker at once, per worker; more are answered "
        "allow(overload) at once (default %(default)s)",
    )
    parser.add_argument(
        "--read-timeout",
        type=positive_float,
        default=env_value(env, "READ_TIMEOUT", positive_float, 30.0),
        metavar="SECONDS",
        help="longest time to receive a request body before answering allow(read-error) (default %(default)s)",
    )
    parser.add_argument(
        "--sticky-max-mb",
        type=non_negative_int,
        default=env_value(env, "STICKY_MAX_MB", non_negative_int, 256),
        metavar="MB",
        help="memory for what each conversation was sent before (every history mode but plain); least "
        "recently used conversations go first; rewrite candidates take up to half as much again "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--sticky-ttl",
        type=positive_float,
        default=env_value(env, "STICKY_TTL", positive_float, 7200.0),
        metavar="SECONDS",
        help="forget a conversation idle this long; longer than the longest provider cache (1 h), so "
        "a conversation that comes back after its cache expired gets a cold turn (default %(default)s)",
    )
    parser.add_argument(
        "--worker-max-rss",
        type=non_negative_int,
        default=env_value(env, "WORKER_MAX_RSS", non_negative_int, 1536),
        metavar="MB",
        help="replace a worker, between requests, once its resident memory passes this (default %(default)s; 0 never)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=positive_float,
        default=env_value(env, "DRAIN_TIMEOUT", positive_float, 20.0),
        metavar="SECONDS",
        help="on SIGTERM or SIGINT, how long requests in flight may take to finish before they are "
        "answered allow (default %(default)s); a second signal exits at once",
    )
    parser.add_argument(
        "--ml",
        choices=ML_MODES,
        default=env_value(env, "ML", ml_mode, "auto"),
        help="ML text compression (Kompress): auto turns it on when hookd[ml] is installed and the "
        "model is in the cache, on refuses to start workers without it, off never loads it "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--ml-threads",
        type=non_negative_int,
        default=env_value(env, "ML_THREADS", non_negative_int, 0),
        metavar="N",
        help="ONNX Runtime threads per worker (default 0: CPUs divided by --pool-size, at least 1)",
    )
    parser.add_argument(
        "--ml-budget",
        type=positive_float,
        default=env_value(env, "ML_BUDGET", positive_float, 2.0),
        metavar="SECONDS",
        help="longest ML text compression per request; text left when it runs out is sent as it is "
        "(default %(default)s, well inside Aperture's 5 s hook timeout)",
    )
    parser.add_argument(
        "--model-cache",
        type=Path,
        default=env_value(env, "MODEL_CACHE", Path, None),
        metavar="DIR",
        help="HuggingFace hub cache holding the Kompress model (default: huggingface_hub's, "
        "$HF_HUB_CACHE or ~/.cache/huggingface/hub); fill it with `hookd models pull`",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        default=env_value(env, "TOKEN_FILE", Path, None),
        metavar="PATH",
        help="require this token on the hook, as 'Authorization: Bearer <token>' or "
        "'X-Api-Key: <token>' (what Aperture sends for a hook with an apikey)",
    )
    parser.add_argument(
        "--admin-token-file",
        type=Path,
        default=env_value(env, "ADMIN_TOKEN_FILE", Path, None),
        metavar="PATH",
        help="token required to change settings with PUT /config; without it, only loopback callers may change them",
    )
    parser.add_argument(
        "--hash-users",
        action="store_true",
        default=env_flag(env, "HASH_USERS"),
        help="label usage metrics with a keyed hash (HMAC-SHA256) of each login name instead of the name; "
        "needs --user-hash-key-file",
    )
    parser.add_argument(
        "--user-hash-key-file",
        type=Path,
        default=env_value(env, "USER_HASH_KEY_FILE", Path, None),
        metavar="PATH",
        help=f"the key for --hash-users, at least {MIN_HASH_KEY_CHARS} characters (openssl rand -base64 32); "
        "the same file gives the same labels on every replica and after restarts",
    )
    parser.add_argument(
        "--max-user-labels",
        type=positive_int,
        default=env_value(env, "MAX_USER_LABELS", positive_int, 200),
        metavar="N",
        help='users with their own usage series; later ones are counted as "other" (default %(default)s)',
    )
    parser.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        default=env_flag(env, "ALLOW_UNAUTHENTICATED"),
        help="allow listening on a non-loopback address without --token-file",
    )
    parser.add_argument(
        "--state-url",
        type=state_url,
        default=env_value(env, "STATE_URL", state_url, None),
        metavar="URL",
        help="share conversation records between replicas in Redis: redis://[USER[:PASSWORD]@]HOST:PORT/DB, "
        "rediss:// for TLS, or unix:///PATH (default: this process's memory only); needs --state-key-file",
    )
    parser.add_argument(
        "--state-key-file",
        type=Path,
        default=env_value(env, "STATE_KEY_FILE", Path, None),
        metavar="PATH",
        help="at least 32 random bytes (openssl rand -base64 32) sealing every value hookd puts in Redis; "
        "the same file on every replica",
    )
    parser.add_argument(
        "--state-password-file",
        type=Path,
        default=env_value(env, "STATE_PASSWORD_FILE", Path, None),
        metavar="PATH",
        help="Redis password (for the URL's user, or the default user), instead of one in --state-url",
    )
    parser.add_argument(
        "--state-timeout",
        type=positive_float,
        default=env_value(env, "STATE_TIMEOUT", positive_float, 0.05),
        metavar="SECONDS",
        help="longest one request waits on Redis, all its calls together; past it the turn is served "
        "from this replica's memory (default %(default)s)",
    )
    return parser


def state_url(value: str) -> str:
    scheme = urlsplit(value).scheme
    if scheme not in STATE_SCHEMES:
        raise argparse.ArgumentTypeError(f"must be a {', '.join(s + '://' for s in STATE_SCHEMES)} URL")
    return value


def shared_state(args: argparse.Namespace) -> dict[str, Any]:
    """The shared-state settings, or why they cannot be used (StateError)."""
    if args.state_url is None:
        if args.state_key_file or args.state_password_file:
            raise StateError("--state-key-file and --state-password-file need --state-url")
        return {}
    if args.state_key_file is None:
        raise StateError(
            "refusing --state-url without --state-key-file: conversation records hold request content, "
            "and go to Redis only sealed with a key (make one with: openssl rand -base64 32 > FILE)"
        )
    try:
        key = read_key(args.state_key_file)
        password = read_token(args.state_password_file)
    except (KeyFileError, TokenFileError) as exc:
        raise StateError(str(exc)) from None
    if password is not None and urlsplit(args.state_url).password is not None:
        raise StateError("give the Redis password in --state-url or in --state-password-file, not both")
    return {"state_url": args.state_url, "state_key": key, "state_password": password}


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    environment = os.environ if env is None else env
    parser = build_parser(environment)
    args = parser.parse_args(argv)
    host, port = args.listen
    try:
        hook_token = read_token(args.token_file)
        admin_token = read_token(args.admin_token_file)
    except TokenFileError as exc:
        parser.error(str(exc))
    try:
        state = shared_state(args)
    except StateError as exc:
        parser.error(str(exc))
    if args.hash_users != (args.user_hash_key_file is not None):
        parser.error("--hash-users and --user-hash-key-file go together: the hash is keyed, so names cannot be guessed")
    try:
        user_hash_key = read_token(args.user_hash_key_file)
    except TokenFileError as exc:
        parser.error(str(exc))
    if user_hash_key is not None and len(user_hash_key) < MIN_HASH_KEY_CHARS:
        parser.error(f"{args.user_hash_key_file} holds fewer than {MIN_HASH_KEY_CHARS} characters; too short a key")
    if args.events_listen == args.listen and port != 0:
        parser.error("--events-listen must differ from --listen; leave it out for events at /events on --listen")
    for address in (host, args.events_listen[0] if args.events_listen else "127.0.0.1"):
        if not is_loopback_host(address) and hook_token is None and not args.allow_unauthenticated:
            parser.error(
                f"refusing to listen on {address}, which is not loopback, without --token-file: a hook "
                "sees whole conversations. Give a token file, or --allow-unauthenticated if the "
                "network is yours alone."
            )
    return Settings(
        host=host,
        port=port,
        events_listen=args.events_listen,
        pool_size=args.pool_size,
        max_compress=args.max_compress,
        state_dir=args.state_dir,
        verbose=args.verbose,
        affinity=not args.no_affinity,
        accept_compressed=not args.no_accept_compressed,
        compress_response=not args.no_compress_response,
        affinity_wait=args.affinity_wait,
        queue_timeout=args.queue_timeout,
        queue_per_worker=args.queue_per_worker,
        read_timeout=args.read_timeout,
        drain_timeout=args.drain_timeout,
        ml=args.ml,
        ml_threads=args.ml_threads,
        ml_budget=args.ml_budget,
        model_cache=args.model_cache,
        worker_max_rss_mb=args.worker_max_rss,
        sticky_max_mb=args.sticky_max_mb,
        sticky_ttl=args.sticky_ttl,
        hook_token=hook_token,
        admin_token=admin_token,
        allow_unauthenticated=args.allow_unauthenticated,
        max_user_labels=args.max_user_labels,
        user_hash_key=user_hash_key.encode() if user_hash_key else None,
        state_timeout=args.state_timeout,
        **state,
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["models"]:
        from hookd import models

        return models.main(arguments[1:])
    if arguments[:1] == ["savings"]:
        from hookd import savings

        return savings.main(arguments[1:])
    settings = parse_settings(arguments)
    from hookd.server import serve

    return serve(settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
