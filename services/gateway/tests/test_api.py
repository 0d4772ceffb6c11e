"""The gateway's HTTP API over loopback gRPC: streaming, sessions, origins, limits, the review API's guard.

The trainer behind it is the real TrainerService on a real store; the inference service is a
stand-in that streams a fixed answer (the browser tier runs the real one).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from flywheel_common.auth import Authenticator, load_tokens
from flywheel_common.grpc_server import GrpcServer
from flywheel_common.networks import client_network
from flywheel_common.query_ids import QueryIdSigner
from flywheel_common.redaction import Redactor
from flywheel_common.registry import ModelRegistry
from flywheel_common.settings import EvidenceSettings, GrpcSettings
from flywheel_feedback.service import FeedbackServicer
from flywheel_feedback.settings import FeedbackSettings
from flywheel_gateway.api import Gateway
from flywheel_gateway.app import GatewayApp
from flywheel_gateway.clients import ServiceClients
from flywheel_gateway.settings import GatewaySettings
from flywheel_gateway.web import address_key
from flywheel_model.prompt import NO_ANSWER
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2_grpc
from flywheel_proto.flywheel.inference.v1 import inference_pb2, inference_pb2_grpc
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2_grpc
from flywheel_trainer.launchers import JobLauncher
from flywheel_trainer.policy import ExamplePolicy, FeedbackSignal
from flywheel_trainer.service import TrainerServicer
from flywheel_trainer.settings import PolicySettings, TrainerSettings
from flywheel_trainer.store import JoinStore, signal_of
from flywheel_trainer.trainer import Trainer

SITE = "http://docs.example.test"
GATEWAY = "https://gateway.example.test"
VISITOR_TOKEN = "visitor-secret-token-1234"
PAGE = {"url": f"{SITE}/faq.html", "title": "FAQ", "text": "Flywheel was created in 2026 by a team."}


class StreamingInference(inference_pb2_grpc.InferenceServiceServicer):
    """Streams "Created in 2026." in three chunks, as the real service shapes them."""

    def __init__(self) -> None:
        self.sessions: list[str] = []
        self.networks: list[str] = []
        self.tokens: list[str] = []

    async def StreamAnswer(
        self, request: inference_pb2.AnswerRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.AnswerChunk]:
        self.sessions.append(request.session_id)
        self.networks.append(request.client_network)
        self.tokens.append(dict(context.invocation_metadata() or ()).get("authorization", ""))
        passage = inference_pb2.Passage(index=0, text=request.page.text, score=1.0)
        yield inference_pb2.AnswerChunk(query_id="qid-1", model_version="v1", passages=[passage])
        yield inference_pb2.AnswerChunk(delta="Created ")
        yield inference_pb2.AnswerChunk(delta="in 2026.", finish_reason="eos")


@pytest.fixture
async def services(
    tmp_path: Path, idle_launcher: JobLauncher
) -> AsyncIterator[tuple[dict[str, str], StreamingInference, JoinStore]]:
    """A stand-in inference and the real trainer service on loopback; nothing listens for the rest."""
    inference = StreamingInference()
    inference_server = GrpcServer(GrpcSettings(port=0), "inference")
    inference_server.add_service(
        "flywheel.inference.v1.InferenceService",
        lambda s: inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference, s),
    )
    store = JoinStore(tmp_path / "trainer.sqlite3", ExamplePolicy(PolicySettings()))
    registry = ModelRegistry(tmp_path / "artifacts")
    settings = TrainerSettings(artifact_root=registry.root, data_dir=tmp_path / "trainer")
    trainer = Trainer(settings, store, idle_launcher, registry, None)
    trainer_server = GrpcServer(GrpcSettings(port=0), "trainer")
    servicer = TrainerServicer(trainer, Authenticator(load_tokens(None)), b"test-pseudonym-key")
    trainer_server.add_service(
        "flywheel.trainer.v1.TrainerService",
        lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, s),
    )
    targets = {
        "inference": f"127.0.0.1:{await inference_server.start()}",
        "trainer": f"127.0.0.1:{await trainer_server.start()}",
        "feedback": "127.0.0.1:9",
        "evaluator": "127.0.0.1:9",
    }
    yield targets, inference, store
    await inference_server.stop(0)
    await trainer_server.stop(0)
    store.close()


Client = tuple[httpx.AsyncClient, StreamingInference, JoinStore]


def addressed_by_header(app: Any) -> Any:
    """The app, seeing a request from the address in its `x-test-client` header (from 127.0.0.1
    without one), as it would see a client through the trusted proxy."""

    async def run(scope: Any, receive: Any, send: Any) -> None:
        host = dict(scope.get("headers", ())).get(b"x-test-client")
        if host:
            scope = {**scope, "client": (host.decode(), 5000)}
        await app(scope, receive, send)

    return run


@pytest.fixture
async def make_client(
    services: tuple[dict[str, str], StreamingInference, JoinStore],
) -> AsyncIterator[Any]:
    """Builds a gateway with settings overrides; returns an HTTP client for it (as GATEWAY)."""
    targets, inference, store = services
    opened: list[tuple[httpx.AsyncClient, ServiceClients]] = []

    async def make(**overrides: Any) -> Client:
        settings = GatewaySettings(**{"services": targets, "sites": [SITE], **overrides})
        clients = ServiceClients(settings.services)
        gateway = Gateway(settings, clients, session_key=b"k" * 32, visitor_token=VISITOR_TOKEN)
        app = addressed_by_header(gateway.asgi())
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=GATEWAY)
        opened.append((client, clients))
        return client, inference, store

    yield make
    for client, clients in opened:
        await client.aclose()
        await clients.close()


def _events(body: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def _ask(client: httpx.AsyncClient, origin: str = SITE) -> httpx.Response:
    return await client.post(
        "/api/v1/answers", json={"question": "When was it created?", "page": PAGE}, headers={"origin": origin}
    )


async def _ask_from(client: httpx.AsyncClient, address: str) -> httpx.Response:
    client.cookies.clear()
    headers = {"origin": SITE, "x-test-client": address}
    return await client.post("/api/v1/answers", json={"question": "When?", "page": PAGE}, headers=headers)


async def test_an_answer_streams_as_server_sent_events_in_an_opaque_session(make_client: Any) -> None:
    client, inference, _ = await make_client()
    response = await _ask(client)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["access-control-allow-origin"] == SITE
    assert response.headers["access-control-allow-credentials"] == "true"
    events = _events(response.text)
    assert [e for e, _ in events] == ["meta", "delta", "delta", "done"]
    meta = events[0][1]
    assert meta["query_id"] == "qid-1" and meta["passages"][0]["text"] == PAGE["text"] and meta["ticket"]
    assert "".join(d["text"] for e, d in events if e == "delta") == "Created in 2026."
    # The cookie is opaque, HttpOnly, Secure and SameSite; the service got the session id behind it.
    cookie = response.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "secure" in cookie.lower() and "samesite=lax" in cookie.lower()
    session_id = inference.sessions[0]
    assert cookie.startswith(f"flywheel_session={session_id}.")
    # The same session asks again: the same id, no new cookie.
    again = await _ask(client)
    assert inference.sessions[1] == session_id and "set-cookie" not in again.headers


async def test_cookie_flags_follow_the_settings(make_client: Any) -> None:
    client, _, _ = await make_client(session={"secure_cookies": False, "same_site": "strict"})
    cookie = (await _ask(client)).headers["set-cookie"].lower()
    assert "secure" not in cookie and "samesite=strict" in cookie and "httponly" in cookie


async def test_no_token_reaches_the_browser(make_client: Any) -> None:
    client, _, _ = await make_client()
    responses = [
        await _ask(client),
        await client.get("/widget.js"),
        await client.get("/console"),
        await client.get("/console.js"),
        await client.post(
            "/api/v1/feedback",
            json={"query_id": "qid-1", "rating": 5, "ticket": "x"},
            headers={"origin": SITE},
        ),
    ]
    for response in responses:
        seen = response.text + json.dumps(dict(response.headers))
        assert VISITOR_TOKEN not in seen and "dev-user-token" not in seen and "Bearer" not in seen


async def test_a_foreign_origin_is_refused(make_client: Any) -> None:
    client, inference, _ = await make_client()
    refused = await _ask(client, origin="http://evil.example.test")
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    preflight = await client.options("/api/v1/answers", headers={"origin": "http://evil.example.test"})
    assert preflight.status_code == 403
    allowed = await client.options("/api/v1/answers", headers={"origin": SITE})
    assert allowed.status_code == 204 and allowed.headers["access-control-allow-origin"] == SITE
    no_origin = await client.post("/api/v1/answers", json={"question": "q", "page": PAGE})
    assert no_origin.status_code == 403
    assert inference.sessions == []


async def test_rate_limits_apply_per_session(make_client: Any) -> None:
    client, inference, _ = await make_client(
        rate_limit={
            "session_asks": {"per_second": 0.01, "burst": 2},
            "address": {"per_second": 0, "burst": 1},
        }
    )
    assert [(await _ask(client)).status_code for _ in range(2)] == [200, 200]
    limited = await _ask(client)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    # Another visitor (no cookie yet) is not held back by the first one's session.
    client.cookies.clear()
    assert (await _ask(client)).status_code == 200
    assert len(inference.sessions) == 3


async def test_rate_limits_apply_per_client_address(make_client: Any) -> None:
    client, _, _ = await make_client(rate_limit={"address": {"per_second": 0.01, "burst": 2}})
    codes = []
    for _ in range(3):
        client.cookies.clear()
        codes.append((await _ask(client)).status_code)
    assert codes == [200, 200, 429]


async def test_the_address_is_what_the_last_trusted_proxy_saw(
    services: tuple[dict[str, str], StreamingInference, JoinStore],
) -> None:
    """Through uvicorn on loopback, a trusted proxy: a client that writes a new X-Forwarded-For
    entry on each request is still one address; another address has its own bucket."""
    settings = GatewaySettings(
        http={"port": 0, "grace_s": 0, "forwarded_allow_ips": "127.0.0.0/8,10.0.0.0/8"},
        services=services[0],
        sites=[SITE],
        rate_limit={"address": {"per_second": 0.01, "burst": 2}},
    )
    app = GatewayApp(settings)
    await app.start()
    try:
        async with httpx.AsyncClient(base_url=app.url) as client:

            async def ask(forwarded: str) -> int:
                client.cookies.clear()
                headers = {"origin": SITE, "x-forwarded-for": forwarded}
                body = {"question": "When was it created?", "page": PAGE}
                return (await client.post("/api/v1/answers", json=body, headers=headers)).status_code

            spoofed = [await ask(f"198.51.100.{n}, 203.0.113.7, 10.1.2.3") for n in range(3)]
            assert spoofed == [200, 200, 429]
            assert await ask("203.0.113.8, 10.1.2.3") == 200
            # An IPv6 client is its /64: a new address in it on each request is still one client.
            rotated = [await ask(f"2001:db8:7:1::{n:x}, 10.1.2.3") for n in range(1, 4)]
            assert rotated == [200, 200, 429]
            assert await ask("2001:db8:7:2::1, 10.1.2.3") == 200
            # Inference is told the network each answered question was asked from, as that proxy saw
            # it, by a caller it knows: the gateway's token (never a browser's) goes with it.
            assert services[1].networks == ["203.0.113.0/24"] * 3 + ["2001:db8:7::/48"] * 3
            assert set(services[1].tokens) == {"Bearer dev-user-token"}  # no token file: the development one
    finally:
        await app.stop()


async def test_a_loopback_client_names_no_network(make_client: Any) -> None:
    client, inference, _ = await make_client()
    assert (await _ask(client)).status_code == 200
    assert inference.networks == [""]


def test_a_client_counts_in_its_address_block() -> None:
    evidence = EvidenceSettings()
    assert client_network("203.0.113.77", evidence) == "203.0.113.0/24"
    # An IPv4 address carried in IPv6 (mapped, 6to4, Teredo) is that IPv4 address.
    for carried in ("::ffff:203.0.113.77", "2002:cb00:714d::1", "2001:0:4136:e378:8000:63bf:34ff:8eb2"):
        assert client_network(carried, evidence) == "203.0.113.0/24"
    assert client_network("2001:db8:7:1:aa:bb:cc:dd", evidence) == "2001:db8:7::/48"
    assert client_network("10.1.2.3", EvidenceSettings(ipv4_prefix_length=32)) == "10.1.2.3/32"
    for host in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "unknown", ""):
        assert client_network(host, evidence) == ""
    assert client_network("203.0.113.77", EvidenceSettings(enabled=False)) == ""


async def test_a_whole_ipv6_block_shares_one_network_bucket(make_client: Any) -> None:
    # Each /64 of a /48 had a bucket of its own: 65,536 of them for one site, which evicted
    # everyone else's from the limiter. Every request of the /48 now also takes from one bucket.
    client, _, _ = await make_client(rate_limit={"network": {"per_second": 0.01, "burst": 3}})
    codes = []
    for n in range(4):  # each from another /64 of one /48
        codes.append((await _ask_from(client, f"2001:db8:7:{n:x}::1")).status_code)
    assert codes == [200, 200, 200, 429]
    assert (await _ask_from(client, "2001:db8:8::1")).status_code == 200
    # A 6to4 address is its IPv4 address, in the address bucket and the network's.
    assert address_key("2002:cb00:714d:1::1", 64) == "203.0.113.77"


def test_an_ipv6_client_is_its_network_and_an_ipv4_one_its_address() -> None:
    assert address_key("2001:db8:7:1:aa:bb:cc:dd", 64) == "2001:db8:7:1::/64"
    assert address_key("2001:db8:7:1::1", 56) == "2001:db8:7::/56"
    assert address_key("::ffff:203.0.113.9", 64) == "203.0.113.9"
    assert address_key("203.0.113.9", 64) == "203.0.113.9"
    assert address_key("unknown", 64) == "unknown"


def test_every_proxy_trusted_is_refused() -> None:
    with pytest.raises(ValueError, match="X-Forwarded-For"):
        GatewaySettings(http={"forwarded_allow_ips": "*"})


async def test_feedback_needs_the_ticket_of_an_answer_of_this_session(make_client: Any) -> None:
    client, _, _ = await make_client()
    no_session = await client.post(
        "/api/v1/feedback", json={"query_id": "qid-1", "rating": 5, "ticket": "x"}, headers={"origin": SITE}
    )
    assert no_session.status_code == 401
    await _ask(client)
    forged = await client.post(
        "/api/v1/feedback",
        json={"query_id": "qid-1", "rating": 5, "ticket": "forged"},
        headers={"origin": SITE},
    )
    assert forged.status_code == 403


async def test_a_visitor_cannot_reach_the_review_api(make_client: Any, ev_low_rated: None) -> None:
    client, _, _ = await make_client()
    await _ask(client)  # a visitor session cookie
    for path in ("/api/v1/review/items", "/api/v1/review/status"):
        assert (await client.get(path)).status_code == 401
    claim = await client.post("/api/v1/review/claim", json={"query_id": "q1"}, headers={"origin": GATEWAY})
    assert claim.status_code == 401
    action = {"query_id": "q1", "action": "correct", "answer": "x"}
    assert (
        await client.post("/api/v1/review/actions", json=action, headers={"origin": GATEWAY})
    ).status_code == 401
    # The gateway's visitor role cannot log in: the trainer refuses it the queue.
    login = await client.post("/console/login", json={"token": "dev-user-token"}, headers={"origin": GATEWAY})
    assert login.status_code == 403
    # Nor can a site's page log an expert in.
    from_site = await client.post(
        "/console/login", json={"token": "dev-expert-token"}, headers={"origin": SITE}
    )
    assert from_site.status_code == 403


@pytest.fixture
def ev_low_rated(services: tuple[dict[str, str], StreamingInference, JoinStore]) -> None:
    """One answer in the trainer's store that a visitor rated 1."""
    store = services[2]
    store.ingest(
        [
            events_pb2.Interaction(
                query_id="q1", question="Who?", answer="Nobody.", passages=["p"], model_version="v1"
            )
        ],
        [FeedbackSignal("f1", "q1", events_pb2.FEEDBACK_KIND_RATING, 1, "", events_pb2.REVIEWER_ROLE_USER)],
    )


async def test_an_expert_logs_in_and_claims_from_the_queue(make_client: Any, ev_low_rated: None) -> None:
    client, _, _ = await make_client()
    login = await client.post(
        "/console/login", json={"token": "dev-expert-token"}, headers={"origin": GATEWAY}
    )
    assert login.status_code == 204
    cookie = login.headers["set-cookie"].lower()
    assert cookie.startswith("flywheel_console=") and "httponly" in cookie and "samesite=strict" in cookie
    assert "dev-expert-token" not in login.headers["set-cookie"]
    queue = (await client.get("/api/v1/review/items?order=impact")).json()
    (item,) = queue["items"]
    assert (item["query_id"], item["question"], item["reasons"]) == (
        "q1",
        "Who?",
        ["REVIEW_REASON_LOW_RATING"],
    )
    claimed = await client.post("/api/v1/review/claim", json={"query_id": "q1"}, headers={"origin": GATEWAY})
    assert claimed.status_code == 200 and claimed.json()["claimed_by_caller"] is True
    # The console's API answers its own origin only.
    foreign = await client.post("/api/v1/review/claim", json={"query_id": "q1"}, headers={"origin": SITE})
    assert foreign.status_code == 403
    await client.post("/console/logout", headers={"origin": GATEWAY})
    assert (await client.get("/api/v1/review/items")).status_code == 401


async def test_pages_get_a_strict_content_security_policy(make_client: Any, tmp_path: Path) -> None:
    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / "a.html").write_text("<html><body><p>Text</p></body></html>")
    client, _, _ = await make_client(demo_pages_dir=tmp_path / "pages")
    console = await client.get("/console")
    csp = console.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert "<script>" not in console.text and "style=" not in console.text
    page = await client.get("/demo/a.html")
    assert '<script src="/widget.js" defer></script>\n</body>' in page.text
    assert (await client.get("/demo/..%2Fsecret.html")).status_code == 404
    assert "a.html" in (await client.get("/demo/")).text


async def test_malformed_input_is_a_client_error(make_client: Any, ev_low_rated: None) -> None:
    """Bytes no honest browser sends get a 4xx with a message, never a 500."""
    client, _, _ = await make_client()
    odd_cookie = {"origin": SITE, "cookie": "flywheel_session=abc.\u00e9".encode("latin-1")}
    assert (
        await client.post("/api/v1/answers", json={"question": "q?", "page": PAGE}, headers=odd_cookie)
    ).status_code == 200
    ticket = {"query_id": "qid-1", "rating": 5, "ticket": "\u00e9"}
    assert (await client.post("/api/v1/feedback", json=ticket, headers={"origin": SITE})).status_code == 403
    json_headers = {"origin": SITE, "content-type": "application/json"}
    deep = await client.post("/api/v1/feedback", content=b"[" * 100_000, headers=json_headers)
    assert deep.status_code == 400 and "JSON" in deep.json()["error"]
    for surrogate in (
        b'{"question": "\\ud800?", "page": {"text": "x"}}',
        # In the page's content too, which went to the service unchecked: a 500.
        b'{"question": "q?", "page": {"text": "Lamp \\ud800"}}',
        b'{"question": "q?", "page": {"html": "<p>Lamp \\udfff</p>"}}',
    ):
        lone = await client.post("/api/v1/answers", content=surrogate, headers=json_headers)
        assert lone.status_code == 400 and "Unicode" in lone.json()["error"]
        assert lone.headers["access-control-allow-origin"] == SITE
    for token in ("dev-expert-token\nx", "dev-expert-t\u00f6ken"):
        login = await client.post("/console/login", json={"token": token}, headers={"origin": GATEWAY})
        assert login.status_code == 400 and "printable ASCII" in login.json()["error"]
    await client.post("/console/login", json={"token": "dev-expert-token"}, headers={"origin": GATEWAY})
    huge = await client.get("/api/v1/review/items?limit=99999999999")
    assert huge.status_code == 400 and "limit" in huge.json()["error"]


async def test_every_call_counts_against_its_address(make_client: Any) -> None:
    client, _, _ = await make_client(rate_limit={"address": {"per_second": 0.01, "burst": 2}})
    codes = [(await client.get("/api/v1/review/items")).status_code for _ in range(3)]
    assert codes == [401, 401, 429]


async def test_readiness_is_checked_once_a_second_however_often_it_is_asked(
    services: tuple[dict[str, str], StreamingInference, JoinStore],
) -> None:
    settings = GatewaySettings(services=services[0], sites=[SITE])
    clients = ServiceClients(settings.services)
    gateway = Gateway(settings, clients, session_key=b"k" * 32, visitor_token=VISITOR_TOKEN)
    checks: list[str] = []
    real = clients.serving

    async def counted(name: str, timeout_s: float = 2.0) -> bool:
        checks.append(name)
        return await real(name, timeout_s)

    clients.serving = counted  # type: ignore[method-assign]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway.asgi()), base_url=GATEWAY
    ) as client:
        replies = [await client.get("/readyz") for _ in range(20)]
    await clients.close()
    # Nothing listens for feedback here.
    assert {r.status_code for r in replies} == {503}
    assert replies[0].json()["feedback"] is False
    assert checks == ["inference", "feedback"]


def test_unanswerable_is_the_models_own_no_answer() -> None:
    assert GatewaySettings().unanswerable_answer == NO_ANSWER


def test_sites_must_be_origins() -> None:
    with pytest.raises(ValueError, match="not an origin"):
        GatewaySettings(sites=["https://example.com/path"])
    assert GatewaySettings(sites=["HTTPS://Example.com"]).sites == ["https://example.com"]


def test_one_field_of_a_limit_from_the_environment_keeps_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_GATEWAY_RATE_LIMIT__SESSION_ASKS__PER_SECOND", "0.5")
    monkeypatch.setenv("FLYWHEEL_GATEWAY_SITES", '["https://docs.example.com"]')
    settings = GatewaySettings()
    assert (settings.rate_limit.session_asks.per_second, settings.rate_limit.session_asks.burst) == (0.5, 5)
    assert settings.sites == ["https://docs.example.com"]


QUERY_ID_KEY = b"test-query-id-key-0123"


class RecordingProducer:
    """What the feedback service would put on Kafka."""

    def __init__(self) -> None:
        self.events: list[events_pb2.Feedback] = []

    async def produce(self, topic: str, key: str, message: Any, headers: Any = None) -> None:
        self.events.append(message)


@pytest.fixture
async def review(
    services: tuple[dict[str, str], StreamingInference, JoinStore], make_client: Any
) -> AsyncIterator[Any]:
    """The real feedback service too (its events recorded): builds a logged-in console client for a
    token, and puts a low-rated answer with a signed query id in the trainer's store."""
    targets, _, store = services
    producer = RecordingProducer()
    servicer = FeedbackServicer(
        FeedbackSettings(),
        producer=producer,  # type: ignore[arg-type]
        authenticator=Authenticator(load_tokens(None)),
        redactor=Redactor(presidio=False),
        signer=QueryIdSigner(QUERY_ID_KEY),
        pseudonym_key=b"test-pseudonym-key-0123",
    )
    server = GrpcServer(GrpcSettings(port=0), "feedback")
    server.add_service(
        "flywheel.feedback.v1.FeedbackService",
        lambda s: feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(servicer, s),
    )
    feedback_target = f"127.0.0.1:{await server.start()}"

    class Review:
        events = producer.events

        @staticmethod
        async def login(token: str) -> httpx.AsyncClient:
            client, _, _ = await make_client(services={**targets, "feedback": feedback_target})
            login = await client.post("/console/login", json={"token": token}, headers={"origin": GATEWAY})
            assert login.status_code == 204
            return client

        @staticmethod
        def answer() -> str:
            query_id = QueryIdSigner(QUERY_ID_KEY).issue("v1")
            interaction = events_pb2.Interaction(
                query_id=query_id, question="Who?", answer="Nobody.", passages=["p"], model_version="v1"
            )
            rating, user = events_pb2.FEEDBACK_KIND_RATING, events_pb2.REVIEWER_ROLE_USER
            low = FeedbackSignal("f-" + query_id[-8:], query_id, rating, 1, "", user)
            store.ingest([interaction], [low])
            return query_id

        @staticmethod
        def deliver() -> None:
            """The feedback topic's round trip to the trainer."""
            store.ingest([], [signal_of(e) for e in producer.events])

    yield Review
    await server.stop(0)


async def _act(client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    return await client.post("/api/v1/review/actions", json=body, headers={"origin": GATEWAY})


async def test_only_the_expert_holding_the_claim_can_act(review: Any) -> None:
    query_id = review.answer()
    expert, admin = await review.login("dev-expert-token"), await review.login("dev-admin-token")
    claimed = await expert.post(
        "/api/v1/review/claim", json={"query_id": query_id}, headers={"origin": GATEWAY}
    )
    assert claimed.status_code == 200
    # Another reviewer who had the item on screen before the claim cannot answer it.
    other = await _act(admin, {"query_id": query_id, "action": "correct", "answer": "Ada."})
    assert other.status_code == 409 and "another expert" in other.json()["error"]
    assert review.events == []
    done = await _act(
        expert, {"query_id": query_id, "action": "correct", "answer": "Grace.", "idempotency_key": "k1"}
    )
    assert done.status_code == 200 and done.json()["claimed_until"]
    # A retry of the same action (the same key) is stored once.
    again = await _act(
        expert, {"query_id": query_id, "action": "correct", "answer": "Grace.", "idempotency_key": "k1"}
    )
    assert again.json() == {**done.json(), "duplicate": True, "claimed_until": again.json()["claimed_until"]}
    assert [e.redacted_text for e in review.events] == ["Grace."]
    # Once the correction is kept, the item is reviewed: no one acts on it again.
    review.deliver()
    late = await _act(expert, {"query_id": query_id, "action": "accept"})
    assert late.status_code == 409 and "already reviewed" in late.json()["error"]
    # An answer the trainer has not stored yet has no claim to hold: the action goes through.
    unseen = QueryIdSigner(QUERY_ID_KEY).issue("v1")
    early = await _act(admin, {"query_id": unseen, "action": "correct", "answer": "Ada."})
    assert early.status_code == 200 and early.json()["claimed_until"] == ""


async def test_a_correction_is_at_most_what_the_trainer_can_train_on(review: Any) -> None:
    assert GatewaySettings().limits.max_correction_chars == PolicySettings().max_target_chars == 2000
    query_id = review.answer()
    expert = await review.login("dev-expert-token")
    too_long = await _act(expert, {"query_id": query_id, "action": "correct", "answer": "x" * 2001})
    assert too_long.status_code == 400 and "2000" in too_long.json()["error"]
    assert review.events == []
    fits = await _act(expert, {"query_id": query_id, "action": "correct", "answer": "x" * 2000})
    assert fits.status_code == 200


async def test_a_note_on_an_accept_is_kept_as_the_experts_comment(review: Any) -> None:
    query_id = review.answer()
    expert = await review.login("dev-expert-token")
    body = {
        "query_id": query_id,
        "action": "accept",
        "note": "Cites the wrong passage.",
        "idempotency_key": "a1",
    }
    assert (await _act(expert, body)).status_code == 200
    assert (await _act(expert, body)).json()["duplicate"] is True
    assert [(e.kind, e.value, e.redacted_text) for e in review.events] == [
        (events_pb2.FEEDBACK_KIND_RATING, 5, ""),
        (events_pb2.FEEDBACK_KIND_COMMENT, 0, "Cites the wrong passage."),
    ]
    assert {e.reviewer_role for e in review.events} == {events_pb2.REVIEWER_ROLE_EXPERT}


async def test_a_new_login_ends_the_one_it_replaces(make_client: Any, ev_low_rated: None) -> None:
    client, _, _ = await make_client()
    cookies = []
    for _ in range(2):
        login = await client.post(
            "/console/login", json={"token": "dev-expert-token"}, headers={"origin": GATEWAY}
        )
        assert login.status_code == 204
        cookies.append(login.cookies["flywheel_console"])
    assert cookies[0] != cookies[1]
    assert (await client.get("/api/v1/review/items")).status_code == 200
    client.cookies.set("flywheel_console", cookies[0])
    assert (await client.get("/api/v1/review/items")).status_code == 401
