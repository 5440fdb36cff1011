from __future__ import annotations

from pathlib import Path

import pytest

from gateway.auth import ApiKeys, bearer_token
from gateway.errors import Unauthorized
from gateway.settings import Settings, SettingsError
from tests.test_cli import canarygate


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.max_body_bytes == 10 * 1024 * 1024
    assert settings.api_keys == frozenset()
    assert settings.watch_policies is True


def test_api_keys_from_env_and_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nfile-key-1\n\n  file-key-2  \n")
    settings = Settings.from_env(
        {"CANARYGATE_API_KEYS": "env-a, env-b,", "CANARYGATE_API_KEYS_FILE": str(keys)}
    )
    assert settings.api_keys == {"env-a", "env-b", "file-key-1", "file-key-2"}
    assert "file-key" not in repr(settings)  # keys never show up in a repr or a log line


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"CANARYGATE_MAX_BODY_BYTES": "ten"}, "expected a whole number"),
        ({"CANARYGATE_MAX_BODY_BYTES": "0"}, "must be positive"),
        ({"CANARYGATE_WATCH_POLICIES": "maybe"}, "expected true or false"),
        ({"CANARYGATE_READYZ_PROBE_TIMEOUT_S": "x"}, "expected a number"),
        ({"CANARYGATE_API_KEYS_FILE": "/nonexistent/keys"}, "cannot read"),
    ],
)
def test_bad_settings_say_what_to_fix(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        Settings.from_env(env)


def test_authentication_fails_closed_on_a_keys_setting_that_names_no_key(tmp_path: Path) -> None:
    empty = tmp_path / "keys"
    empty.write_text("# the keys go here\n\n   \n")
    with pytest.raises(SettingsError, match=f"{empty} holds no keys"):
        Settings.from_env({"CANARYGATE_API_KEYS_FILE": str(empty)})
    with pytest.raises(SettingsError, match="names no key"):
        Settings.from_env({"CANARYGATE_API_KEYS": " , ,"})
    result = canarygate("serve", "--port", "1", env={"CANARYGATE_API_KEYS_FILE": str(empty)})
    assert result.returncode == 2  # refuses to start rather than serve with authentication off
    assert "holds no keys" in result.stderr and "would turn authentication off" in result.stderr


def test_serve_exits_2_on_bad_settings() -> None:
    result = canarygate("serve", "--port", "1", env={"CANARYGATE_MAX_BODY_BYTES": "lots"})
    assert result.returncode == 2
    assert "CANARYGATE_MAX_BODY_BYTES: expected a whole number" in result.stderr


def test_bearer_parsing_and_key_check() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    keys = ApiKeys(frozenset({"k1"}))
    keys.authenticate("k1")
    with pytest.raises(Unauthorized):
        keys.authenticate("k2")
    ApiKeys(frozenset()).authenticate(None)  # no keys configured: open
