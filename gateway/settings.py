"""Process settings, read from CANARYGATE_* environment variables (secrets never come from flags)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from gateway.logs import FORMATS, LEVELS

N = TypeVar("N", int, float)


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    policy_dir: Path = Path("policies")
    max_body_bytes: int = 10 * 1024 * 1024
    client_timeout_s: float = 30.0  # for a client to send its whole request body
    schema_check_timeout_s: float = 2.0  # a schema check in a worker process gives up after this
    api_keys: frozenset[str] = field(default_factory=frozenset, repr=False)
    api_key_groups: Mapping[str, str] = field(default_factory=dict, repr=False)  # key -> group (cohorts)
    api_keys_file: Path | None = None  # read again on SIGHUP and when it changes
    env_api_keys: frozenset[str] = field(default_factory=frozenset, repr=False)  # CANARYGATE_API_KEYS's
    watch_policies: bool = True
    readyz_probe_timeout_s: float = 1.0
    log_level: str = "info"
    log_format: str = "text"  # or json: one object a line, for log pipelines
    metrics: bool = True
    redis_url: str | None = field(default=None, repr=False)  # may carry a password
    redis_prefix: str = "canarygate:"
    admin_token: str | None = field(default=None, repr=False)
    feedback_ttl_s: float = 86400.0  # how long an answer takes feedback
    memory_records: int = 200_000  # without Redis: assignment records kept for feedback (~220 B each)
    redis_records: int = 2_000_000  # with Redis: request records kept for feedback, newest first
    max_open_traces: int = 100_000  # open traces kept (memory or Redis); beyond, the least recent end
    shutdown_timeout_s: int = 30  # SIGTERM: in-flight requests get this long to finish

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        keys_file = env.get("CANARYGATE_API_KEYS_FILE") or None
        return cls(
            policy_dir=Path(env.get("CANARYGATE_POLICY_DIR", "policies")),
            max_body_bytes=_int(env, "CANARYGATE_MAX_BODY_BYTES", 10 * 1024 * 1024),
            client_timeout_s=_float(env, "CANARYGATE_CLIENT_TIMEOUT_S", 30.0),
            schema_check_timeout_s=_float(env, "CANARYGATE_SCHEMA_CHECK_TIMEOUT_S", 2.0),
            api_keys=frozenset(_api_keys(env)),
            api_key_groups={k: g for k, g in _api_keys(env).items() if g is not None},
            api_keys_file=Path(keys_file) if keys_file else None,
            env_api_keys=frozenset(_env_keys(env)),
            watch_policies=_bool(env, "CANARYGATE_WATCH_POLICIES", True),
            readyz_probe_timeout_s=_float(env, "CANARYGATE_READYZ_PROBE_TIMEOUT_S", 1.0),
            log_level=_choice(env, "CANARYGATE_LOG_LEVEL", "info", LEVELS),
            log_format=_choice(env, "CANARYGATE_LOG_FORMAT", "text", FORMATS),
            metrics=_bool(env, "CANARYGATE_METRICS", True),
            redis_url=env.get("CANARYGATE_REDIS_URL") or None,
            redis_prefix=env.get("CANARYGATE_REDIS_PREFIX", "canarygate:"),
            admin_token=env.get("CANARYGATE_ADMIN_TOKEN") or None,
            feedback_ttl_s=_float(env, "CANARYGATE_FEEDBACK_TTL_S", 86400.0),
            memory_records=_int(env, "CANARYGATE_MEMORY_RECORDS", 200_000),
            redis_records=_int(env, "CANARYGATE_REDIS_RECORDS", 2_000_000),
            max_open_traces=_int(env, "CANARYGATE_MAX_OPEN_TRACES", 100_000),
            shutdown_timeout_s=_int(env, "CANARYGATE_SHUTDOWN_TIMEOUT_S", 30),
        )


def _api_keys(env: Mapping[str, str]) -> dict[str, str | None]:
    """key -> its group (a cohort source; keys from CANARYGATE_API_KEYS have none)."""
    keys: dict[str, str | None] = dict.fromkeys(_env_keys(env))
    path = env.get("CANARYGATE_API_KEYS_FILE")
    if path:
        keys.update(read_keys_file(Path(path)))
    return keys


def _env_keys(env: Mapping[str, str]) -> list[str]:
    listed = env.get("CANARYGATE_API_KEYS", "")
    keys = [k.strip() for k in listed.split(",") if k.strip()]
    if listed.strip() and not keys:  # authentication fails closed: a setting that names no key is a mistake
        raise SettingsError("CANARYGATE_API_KEYS is set but names no key; list keys separated by commas")
    return keys


def read_keys_file(path: Path) -> dict[str, str | None]:
    """The file's lines are `KEY` or `KEY GROUP`; blank lines and # comments are skipped. A file that
    cannot be read or holds no keys is an error: authentication fails closed."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SettingsError(f"CANARYGATE_API_KEYS_FILE: cannot read {path}: {why}") from None
    keys: dict[str, str | None] = {}
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, group = line.strip().partition(" ")
            keys[key] = group.strip() or None
    if not keys:
        raise SettingsError(
            f"CANARYGATE_API_KEYS_FILE: {path} holds no keys (only blank lines or comments), which would "
            "turn authentication off; put one key per line (KEY or KEY GROUP), or unset the variable"
        )
    return keys


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    return _positive(env, name, default, int, "a whole number")


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    return _positive(env, name, default, float, "a number")


def _positive(env: Mapping[str, str], name: str, default: N, parse: Callable[[str], N], what: str) -> N:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise SettingsError(f"{name}: expected {what}, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name}: must be positive, got {value}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = (env.get(name) or default).lower()
    if raw not in allowed:
        raise SettingsError(f"{name}: expected one of {', '.join(allowed)}, got {raw!r}")
    return raw


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}: expected true or false, got {raw!r}")
