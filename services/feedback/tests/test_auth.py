"""Bearer tokens map to roles; missing or unknown tokens and missing roles are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel_common.auth import DEV_TOKENS_FILE, Authenticator, Role, load_tokens
from flywheel_common.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from flywheel_feedback.ratelimit import RateLimiter


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator({"user-token-123": "user", "expert-token-123": "Expert"})


def test_known_token_has_its_role(auth: Authenticator) -> None:
    assert auth.authenticate({"authorization": "Bearer user-token-123"}).role is Role.USER
    assert auth.authenticate({"authorization": "bearer expert-token-123"}).role is Role.EXPERT


@pytest.mark.parametrize(
    "metadata",
    [{}, {"authorization": ""}, {"authorization": "Basic dXNlcg=="}, {"authorization": "Bearer "}],
)
def test_missing_token(auth: Authenticator, metadata: dict[str, str]) -> None:
    with pytest.raises(Unauthenticated, match="missing bearer token"):
        auth.authenticate(metadata)


def test_unknown_token(auth: Authenticator) -> None:
    with pytest.raises(Unauthenticated, match="unknown"):
        auth.authenticate({"authorization": "Bearer nope-nope-nope"})


def test_roles(auth: Authenticator) -> None:
    user = auth.authenticate({"authorization": "Bearer user-token-123"})
    with pytest.raises(PermissionDenied, match="expert"):
        user.require(Role.EXPERT, Role.ADMIN)
    auth.authenticate({"authorization": "Bearer expert-token-123"}).require(Role.EXPERT, Role.ADMIN)


def test_principal_does_not_keep_the_token(auth: Authenticator) -> None:
    principal = auth.authenticate({"authorization": "Bearer user-token-123"})
    assert "user-token-123" not in repr(principal)


def test_tokens_file_json_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text(json.dumps({"abcdefgh1": "admin"}))
    (tmp_path / "t.yaml").write_text("abcdefgh2: expert\n")
    assert load_tokens(tmp_path / "t.json") == {"abcdefgh1": "admin"}
    assert load_tokens(tmp_path / "t.yaml") == {"abcdefgh2": "expert"}


def test_dev_tokens_file_is_the_default() -> None:
    assert load_tokens(None) == json.loads(DEV_TOKENS_FILE.read_text())
    Authenticator(load_tokens(None))


@pytest.mark.parametrize("tokens", [{"short": "user"}, {"long-enough-token": "superuser"}])
def test_bad_tokens_files_are_refused(tokens: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Authenticator(tokens)


def test_rate_limit_per_key() -> None:
    now = [0.0]
    limiter = RateLimiter(per_second=2, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(ResourceExhausted, match=r"retry in 0\.5 s"):
        limiter.check("a")
    limiter.check("b")  # another caller has its own bucket
    now[0] += 0.5
    limiter.check("a")  # one token refilled
    with pytest.raises(ResourceExhausted):
        limiter.check("a")


def test_rate_limit_zero_disables() -> None:
    limiter = RateLimiter(per_second=0, burst=1)
    for _ in range(100):
        limiter.check("a")
