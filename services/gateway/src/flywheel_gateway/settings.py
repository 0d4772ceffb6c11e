"""Typed settings of the gateway (env prefix FLYWHEEL_GATEWAY_, nested with __)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings

from flywheel_common.settings import (
    EvidenceSettings,
    LoggingSettings,
    MetricsSettings,
    TracingSettings,
    env_config,
)


class HttpSettings(BaseModel):
    """Where the gateway listens for browsers."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Proxies whose X-Forwarded-For / -Proto are believed (comma-separated addresses or networks):
    # behind an ingress, the client address that rate limits key on is the header's last entry
    # that is not one of them, the one the last trusted proxy saw. "*" is refused: it would take
    # the first entry, which the client writes itself.
    forwarded_allow_ips: str = "127.0.0.1"
    # Seconds open requests (streams included) get to finish on shutdown.
    grace_s: float = Field(default=20.0, ge=0)

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _no_wildcard(cls, value: str) -> str:
        if "*" in value:
            raise ValueError(
                "forwarded_allow_ips must list the proxies' addresses or networks: with '*' the "
                "client's own X-Forwarded-For entry would be believed, and rate limits per address "
                "could be dodged by writing a new one on each request"
            )
        return value


class ServiceTargets(BaseModel):
    """The gRPC services behind the gateway, and how long a call may take."""

    inference: str = "127.0.0.1:50051"
    feedback: str = "127.0.0.1:50052"
    trainer: str = "127.0.0.1:50053"
    evaluator: str = "127.0.0.1:50054"
    call_timeout_s: float = Field(default=10.0, gt=0)
    # A streamed answer may take this long in all (generation on CPUs under load is slow).
    answer_timeout_s: float = Field(default=180.0, gt=0)


class SessionSettings(BaseModel):
    """Visitors' and experts' sessions: opaque cookies, the secrets behind them stay here."""

    # HMAC key that signs visitor session cookies and feedback tickets (shared by every replica);
    # the development key when unset.
    key_file: Path | None = None
    cookie_name: str = "flywheel_session"
    console_cookie_name: str = "flywheel_console"
    # Off only for local http (browsers drop Secure cookies on plain http except on localhost).
    secure_cookies: bool = True
    # The widget's cookie: "lax" or "strict" work where the gateway is on the same site as the pages
    # (e.g. ask.example.com for docs.example.com); "none" (needs secure_cookies) for another site.
    same_site: Literal["strict", "lax", "none"] = "lax"
    max_age_s: int = Field(default=30 * 24 * 3600, ge=60)
    # Expert sessions are held in memory (they keep the expert's token): a login lasts this long.
    console_ttl_s: float = Field(default=8 * 3600, gt=0)
    max_console_sessions: int = Field(default=1000, ge=1)


class AuthSettings(BaseModel):
    """The gateway's own bearer token for visitors' feedback (the user role); never sent to browsers."""

    # A file holding the token; the development user token when unset.
    visitor_token_file: Path | None = None


class Bucket(BaseModel):
    """A token bucket: `per_second` sustained, `burst` at once; per_second 0 disables it."""

    per_second: float = Field(default=1.0, ge=0)
    burst: int = Field(default=20, ge=1)


# One class per bucket, so that setting one field from the environment keeps the other's default.
class SessionAsks(Bucket):
    """Questions are what costs: one every 5 s per visitor session, 5 at once."""

    per_second: float = Field(default=0.2, ge=0)
    burst: int = Field(default=5, ge=1)


class SessionFeedback(Bucket):
    """Ratings, thumbs, comments per visitor session."""


class AddressRequests(Bucket):
    """Every API request from one client address (a NAT may hide many visitors behind it)."""

    per_second: float = Field(default=5.0, ge=0)
    burst: int = Field(default=100, ge=1)


class NetworkRequests(Bucket):
    """Every API request from one network (the /24 or IPv6 /48 live evidence counts in): a holder of
    a whole block, whose addresses would each get an address bucket of their own, shares this one."""

    per_second: float = Field(default=50.0, ge=0)
    burst: int = Field(default=1000, ge=1)


class ConsoleRequests(Bucket):
    """Review calls per expert session."""

    per_second: float = Field(default=5.0, ge=0)
    burst: int = Field(default=50, ge=1)


class RateLimitSettings(BaseModel):
    """Limits per visitor session, per client address and its network, and per expert session."""

    session_asks: SessionAsks = SessionAsks()
    session_feedback: SessionFeedback = SessionFeedback()
    address: AddressRequests = AddressRequests()
    network: NetworkRequests = NetworkRequests()
    console: ConsoleRequests = ConsoleRequests()
    max_keys: int = Field(default=100_000, ge=1)
    # An IPv6 client is its network of this prefix length: one host commonly holds a whole /64, and
    # a bucket per address would give it as many buckets as it likes (and evict everyone else's).
    ipv6_prefix_length: int = Field(default=64, ge=32, le=128)


class LimitSettings(BaseModel):
    """Bounds on what a browser may send."""

    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_page_chars: int = Field(default=300_000, ge=100)
    max_question_chars: int = Field(default=1000, ge=1)
    max_comment_chars: int = Field(default=2000, ge=1)
    # What the trainer can train on (its policy.max_target_chars, 2,000): a longer correction would be
    # accepted here and dropped there, so the console refuses it while the expert can still edit it.
    max_correction_chars: int = Field(default=2000, ge=1)
    max_note_chars: int = Field(default=2000, ge=1)


class GatewaySettings(BaseSettings):
    """Everything the gateway reads from its environment."""

    model_config = env_config("FLYWHEEL_GATEWAY_")

    http: HttpSettings = HttpSettings()
    metrics: MetricsSettings = MetricsSettings(port=9105)
    tracing: TracingSettings = TracingSettings()
    logging: LoggingSettings = LoggingSettings()
    services: ServiceTargets = ServiceTargets()
    session: SessionSettings = SessionSettings()
    auth: AuthSettings = AuthSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    # The visitor's network, named to inference with each question (docs/security.md); a loopback
    # client (the local stack) names none.
    evidence: EvidenceSettings = EvidenceSettings()
    limits: LimitSettings = LimitSettings()
    # Origins of the sites whose pages carry the widget (scheme://host[:port]); requests from any
    # other origin are refused. The gateway's own origin (the console) is always allowed.
    sites: list[str] = []
    # A folder of HTML pages served under /demo/ with the widget added (local trials); off when unset.
    demo_pages_dir: Path | None = None
    # What "unanswerable from the page" stores as the corrected answer: the model's own words for it.
    unanswerable_answer: str = "The page does not say."

    @field_validator("sites")
    @classmethod
    def _origins(cls, sites: list[str]) -> list[str]:
        sites = [site.lower() for site in sites]
        for site in sites:
            scheme, _, rest = site.partition("://")
            if scheme not in ("http", "https") or not rest or "/" in rest:
                raise ValueError(f"{site!r} is not an origin (scheme://host[:port], no path)")
        return sites
