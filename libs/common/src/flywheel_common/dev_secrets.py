"""The development HMAC keys, one copy for every service and tool that signs or checks with them."""

from __future__ import annotations

# Used only when no secret file is configured (read_secret logs a loud warning): inference signs query
# ids and pseudonymises sessions with these, feedback checks and pseudonymises with the same ones.
DEV_QUERY_ID_KEY = b"flywheel-dev-query-id-key"
DEV_PSEUDONYM_KEY = b"flywheel-dev-pseudonym-key"
