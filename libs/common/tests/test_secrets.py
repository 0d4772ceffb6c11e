"""Production mode refuses to start without its secrets; development keeps the development defaults."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel_common.auth import Authenticator, Role, load_tokens
from flywheel_common.secrets import MODE_ENV, MissingSecret, read_secret


def test_development_mode_falls_back_to_the_development_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODE_ENV, raising=False)
    assert read_secret(None, name="query id key", dev_default=b"dev-key") == b"dev-key"
    assert load_tokens(None)
    monkeypatch.setenv(MODE_ENV, "Development")
    assert read_secret(None, name="query id key", dev_default=b"dev-key") == b"dev-key"


def test_production_mode_refuses_a_missing_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(MODE_ENV, "production")
    with pytest.raises(MissingSecret, match=r"no query id key configured .*FLYWHEEL_MODE is production"):
        read_secret(None, name="query id key", dev_default=b"dev-key")
    with pytest.raises(MissingSecret, match="tokens file"):
        load_tokens(None)
    (tmp_path / "key").write_bytes(b"a-real-key-of-enough-bytes\n")
    assert (
        read_secret(tmp_path / "key", name="query id key", dev_default=b"dev-key")
        == b"a-real-key-of-enough-bytes"
    )
    (tmp_path / "empty").write_bytes(b"\n")
    with pytest.raises(MissingSecret, match="empty"):
        read_secret(tmp_path / "empty", name="query id key")


def test_an_unknown_mode_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODE_ENV, "prod")
    with pytest.raises(MissingSecret, match="production or development"):
        read_secret(None, name="query id key", dev_default=b"dev-key")


def test_a_tokens_file_may_hold_hashes_only(tmp_path: Path) -> None:
    token = "a-long-admin-token-0123"
    (tmp_path / "hashes.yaml").write_text(f"sha256:{hashlib.sha256(token.encode()).hexdigest()}: admin\n")
    auth = Authenticator(load_tokens(tmp_path / "hashes.yaml"))
    assert auth.authenticate({"authorization": f"Bearer {token}"}).role is Role.ADMIN
    with pytest.raises(ValueError, match="64 lower-case hex"):
        Authenticator({"sha256:abc": "admin"})


@pytest.mark.parametrize("service", ["flywheel_feedback", "flywheel_inference"])
def test_a_service_in_production_mode_stops_at_once_without_its_secrets(service: str, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", MODE_ENV: "production", "HOME": str(tmp_path)}
    env[f"{service.upper()}_KAFKA__BOOTSTRAP_SERVERS"] = "127.0.0.1:1"
    env[f"{service.upper()}_METRICS__PORT"] = "0"
    env[f"{service.upper()}_GRPC__PORT"] = "0"
    env[f"{service.upper()}_ARTIFACT_ROOT"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", service], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode != 0
    assert "MissingSecret" in done.stderr and "FLYWHEEL_MODE is production" in done.stderr, done.stderr[
        -2000:
    ]
