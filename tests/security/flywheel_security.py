"""What the security tier's fixtures and tests share: tokens, the inference limits, a running service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from flywheel_inference.settings import LimitSettings

ADMIN = (("authorization", "Bearer dev-admin-token"),)
EXPERT = (("authorization", "Bearer dev-expert-token"),)
USER = (("authorization", "Bearer dev-user-token"),)
QUERY_ID_KEY = b"security-tier-query-id-key"
# Small limits keep each hostile value cheap to send and to refuse; the checks are relative to them.
INFERENCE_LIMITS = LimitSettings(
    max_question_chars=200,
    max_page_bytes=2048,
    # Short prompts: each call that passes validation prefills on a shared 2-core machine.
    context_token_budget=48,
    passage_max_words=16,
    max_url_chars=300,
    max_title_chars=100,
    max_session_id_chars=64,
    max_new_tokens=8,
    default_max_new_tokens=2,
)


@dataclass
class Service:
    """A running service: its channel, and a healthy call that must keep succeeding."""

    name: str
    channel: grpc.aio.Channel
    stub: Any
    healthy: Callable[[], Awaitable[Any]]
