"""The browser tier: headless Chromium (Debian's) on a bundled page with the widget, and the review console.

Everything is real: the Kafka broker, the four services (subprocesses of a LocalStack), the gateway
(in this process), the model. A visitor asks and rates on a page served from another origin; an
expert corrects the answer in the console; the trainer's store then holds the correction.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from flywheel_cli.local.kafka_broker import LocalBroker, free_port
from flywheel_cli.local.stack import LocalStack, StackConfig
from flywheel_common.auth import Authenticator, load_tokens
from flywheel_common.files import repo_root
from flywheel_common.grpc_server import GrpcServer
from flywheel_common.query_ids import QueryIdSigner
from flywheel_common.redaction import Redactor
from flywheel_common.registry import ModelRegistry
from flywheel_common.settings import GrpcSettings, TopicSettings
from flywheel_feedback.service import FeedbackServicer
from flywheel_feedback.settings import FeedbackSettings
from flywheel_gateway.app import GatewayApp
from flywheel_gateway.settings import GatewaySettings
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2_grpc
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2_grpc
from flywheel_trainer.launchers import JobLauncher
from flywheel_trainer.policy import ExamplePolicy, FeedbackSignal
from flywheel_trainer.service import TrainerServicer
from flywheel_trainer.settings import PolicySettings, TrainerSettings
from flywheel_trainer.store import JoinStore
from flywheel_trainer.trainer import Trainer

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
PAGES = repo_root() / "datasets" / "python-faq" / "pages"
SCREENSHOTS = repo_root() / "var" / "screenshots"
TOKENS = ("dev-user-token", "dev-expert-token", "dev-admin-token", "Bearer")
QUESTION = "What is Python?"


def _page_server(gateway_url: str) -> ThreadingHTTPServer:
    """Serves the bundled pages with the widget's tag, as a site owner would add it (another origin)."""
    tag = f'<script src="{gateway_url}/widget.js" defer></script>'

    class Pages(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = PAGES / self.path.lstrip("/")
            if path.parent != PAGES or not path.is_file():
                self.send_error(404)
                return
            body = path.read_text(encoding="utf-8").replace("</body>", f"{tag}\n</body>").encode()
            self.send_response(200)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class Site:
    """The running system as a browser sees it."""

    gateway: str
    pages: str
    trainer_store: Path


@pytest.fixture(scope="module")
def stack(kafka_broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The four services on free ports, topics of their own; short answers, no training job."""
    suffix = uuid.uuid4().hex[:8]
    topics = TopicSettings(**{f: f"test.browser-{suffix}.{f}" for f in TopicSettings.model_fields})
    config = StackConfig(
        var_dir=tmp_path_factory.mktemp("browser") / "var",
        kafka_bootstrap=kafka_broker.bootstrap_servers,
        topics=topics,
        free_ports=True,
        service_env={
            "inference": {"FLYWHEEL_INFERENCE_LIMITS__DEFAULT_MAX_NEW_TOKENS": "24"},
            "trainer": {
                "FLYWHEEL_TRAINER_CONSUMER__GROUP_ID": f"trainer-{suffix}",
                "FLYWHEEL_TRAINER_BATCH__MIN_EXAMPLES": "1000",
                "FLYWHEEL_TRAINER_BATCH__MAX_EXAMPLES": "1000",
            },
            "evaluator": {"FLYWHEEL_EVALUATOR_CONSUMER_GROUP": f"evaluator-{suffix}"},
        },
    )
    with LocalStack(config, echo=print) as running:
        yield running


@pytest.fixture(scope="module")
async def site(stack: LocalStack) -> AsyncIterator[Site]:
    """The gateway in front of the stack, and a page server on another origin that it allows."""
    gateway_port = free_port("127.0.0.1")
    pages = _page_server(f"http://127.0.0.1:{gateway_port}")
    pages_url = f"http://127.0.0.1:{pages.server_address[1]}"
    settings = GatewaySettings(
        http={"port": gateway_port, "grace_s": 1},
        services=stack.targets,
        sites=[pages_url],
        # Local http: Chromium keeps no Secure cookie from http://127.0.0.1.
        session={"secure_cookies": False},
        rate_limit={"session_asks": {"per_second": 0.01, "burst": 3}},
    )
    app = GatewayApp(settings)
    await app.start()
    yield Site(app.url, pages_url, stack.config.var_dir / "trainer" / "trainer.sqlite3")
    pages.shutdown()
    await app.stop()


@pytest.fixture(scope="module")
def chromium_path() -> Path:
    if not CHROMIUM.is_file():
        pytest.skip("Debian's chromium is not installed: run scripts/setup-browser")
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser(chromium_path: Path) -> AsyncIterator[object]:
    """Debian's headless Chromium, driven by Playwright (which downloads no browser of its own)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        # --no-sandbox: the tests run as root in a container, where Chromium's sandbox cannot start.
        chromium = await playwright.chromium.launch(executable_path=str(chromium_path), args=["--no-sandbox"])
        yield chromium
        await chromium.close()


def _correction_in_store(store: Path, question: str) -> dict[str, object] | None:
    """The correction example of the answer to `question`, once the trainer stored it."""
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT payload FROM examples WHERE source = 'correction'").fetchall()
    examples = [json.loads(row[0]) for row in rows]
    return next((e for e in examples if e["question"] == question), None)


def _live_feedback(store: Path, query_id: str) -> list[tuple[int, int, str]]:
    """(kind, value, text) of the answer's feedback that no later rating replaced, in arrival order."""
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        sql = "SELECT kind, value, text FROM feedback WHERE query_id = ? AND superseded = 0 ORDER BY rowid"
        return [tuple(row) for row in db.execute(sql, (query_id,))]


async def test_a_visitor_asks_and_rates_and_an_expert_corrects(site: Site, browser: object) -> None:
    from playwright.async_api import Browser, Response, expect

    assert isinstance(browser, Browser)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    received: list[str] = []

    async def keep(response: Response) -> None:
        try:
            body = await response.text()
        except Exception:  # no body (a preflight, a 204)
            body = ""
        received.append(json.dumps(await response.all_headers()) + body)

    # --- the visitor --------------------------------------------------------------------------------
    visitor = await browser.new_context(viewport={"width": 1200, "height": 800})
    page = await visitor.new_page()
    page.on("response", keep)
    # Counts the network reads of the answer's stream that completed at least one delta event: when
    # the browser is starved of CPU, the whole answer can arrive in one read.
    await page.add_init_script(
        """(() => {
          const read = ReadableStreamDefaultReader.prototype.read;
          const decoder = new TextDecoder();
          let deltas = 0;
          window.streamed = "";
          window.deltaReads = 0;
          ReadableStreamDefaultReader.prototype.read = async function () {
            const part = await read.call(this);
            if (part.value) {
              window.streamed += decoder.decode(part.value, { stream: true });
              const text = window.streamed;
              const complete = text.slice(0, text.lastIndexOf("\\n\\n") + 1);
              const n = (complete.match(/event: delta/g) || []).length;
              if (n > deltas) { window.deltaReads += 1; deltas = n; }
            }
            return part;
          };
        })()"""
    )
    await page.goto(f"{site.pages}/general.html")
    await page.get_by_role("button", name="Ask about this page").click()
    await page.get_by_label("Your question about this page").fill(QUESTION)
    # Every text the answer shows on its way, as the page renders it.
    await page.evaluate(
        """() => {
          const answer = document.querySelector("#flywheel-widget").shadowRoot.querySelector(".answer");
          window.seen = [];
          new MutationObserver(() => window.seen.push(answer.textContent))
            .observe(answer, {childList: true, characterData: true, subtree: true});
        }"""
    )
    await page.keyboard.press("Enter")
    rate = page.get_by_role("group", name="Rate this answer")
    await expect(rate).to_be_visible(timeout=90_000)
    answer = (await page.locator("#flywheel-widget .answer").text_content() or "").strip()
    # First the wait ("Finding the answer…"), replaced by the first text that streams in.
    waiting, *seen = [text for text in await page.evaluate("window.seen") if text]
    assert waiting == "Finding the answer\u2026", waiting
    reads = await page.evaluate("window.deltaReads")
    # The service streamed the answer in pieces, and the page showed each piece as it arrived (a
    # text per read that brought one, up to two), only ever adding to what it showed. The stream is
    # read where the page read it: the browser keeps no body of a streamed response to hand back.
    streamed = await page.evaluate("window.streamed")
    assert streamed.count("event: delta") >= 2, streamed
    assert answer and seen[-1].strip() == answer and len(set(seen)) >= min(2, reads), (seen, reads)
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(seen)), seen
    # The passages it came from are listed, and highlighted on the page itself.
    passages = page.locator("#flywheel-widget .passage")
    assert await passages.count() >= 1
    assert "Python" in (await passages.first.text_content() or "")
    highlighted = await page.evaluate("CSS.highlights.get('flywheel-passage').size")
    assert highlighted >= 1
    await page.screenshot(path=SCREENSHOTS / "widget.png")
    await page.get_by_role("button", name="Rate 1 of 5").click()
    await expect(page.get_by_text("Thank you for your feedback.")).to_be_visible()
    cookies = {c["name"]: c for c in await visitor.cookies()}
    session = cookies["flywheel_session"]
    assert session["httpOnly"] and session["sameSite"] == "Lax"

    # --- the expert ---------------------------------------------------------------------------------
    expert = await browser.new_context(viewport={"width": 1400, "height": 900})
    console = await expert.new_page()
    console.on("response", keep)
    await console.goto(f"{site.gateway}/console")
    await console.get_by_label("Your reviewer token").fill("dev-expert-token")
    await console.keyboard.press("Enter")
    item = console.locator("#queue button", has_text=QUESTION)
    deadline = time.monotonic() + 60
    while not await item.count():  # the rating reaches the trainer's store through Kafka
        assert time.monotonic() < deadline, "the rated answer never reached the review queue"
        await asyncio.sleep(1)
        await console.keyboard.press("r")
    await item.first.click()
    await expect(console.locator("#question")).to_have_text(QUESTION)
    await expect(console.locator("#rollout")).to_contain_text("production")
    # The page's link says where it goes, whatever title the visitor's browser sent.
    link = console.locator("#page")
    href = await link.get_attribute("href")
    assert href and href.endswith("/general.html") and href in (await link.text_content() or ""), href
    correction = "Python is an interpreted, object-oriented programming language."
    await console.get_by_label("Correct answer").fill(correction)
    await console.screenshot(path=SCREENSHOTS / "console.png")
    await console.keyboard.press("Control+Enter")
    await expect(console.locator("#status")).to_have_text("Saved: correct.")

    # --- the trainer's store holds the correction as a training example -----------------------------
    deadline = time.monotonic() + 60
    while (example := _correction_in_store(site.trainer_store, QUESTION)) is None:
        assert time.monotonic() < deadline, "the correction never became a training example"
        await asyncio.sleep(1)
    assert example["answer"] == correction and example["model_answer"] == answer

    # Nothing the browser received carries a bearer token.
    assert received and not [r for r in received if any(t in r for t in TOKENS)]
    await visitor.close()
    await expert.close()


async def test_a_changed_rating_and_a_second_comment_both_count(site: Site, browser: object) -> None:
    """Each click is a new action, not a retry: rating 1 then 5 leaves the 5, and both comments stay."""
    from playwright.async_api import Browser, expect

    from flywheel_proto.flywheel.events.v1 import events_pb2

    assert isinstance(browser, Browser)
    visitor = await browser.new_context()
    page = await visitor.new_page()
    await page.add_init_script("delete Crypto.prototype.randomUUID")  # as on a site served over http
    await page.goto(f"{site.pages}/general.html")
    await page.get_by_role("button", name="Ask about this page").click()
    await page.get_by_label("Your question about this page").fill("Is Python free?")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("group", name="Rate this answer")).to_be_visible(timeout=90_000)
    await page.get_by_role("button", name="Comment").click()
    for text, control in (
        ("", "Rate 1 of 5"),
        ("", "Rate 5 of 5"),
        ("Too long.", "Send"),
        ("Cite it.", "Send"),
    ):
        await page.get_by_label("Your comment").fill(text)
        async with page.expect_response(f"{site.gateway}/api/v1/feedback") as response:
            await page.get_by_role("button", name=control).click()
        reply = await response.value
        assert (await reply.json())["duplicate"] is False, control
    query_id = json.loads(reply.request.post_data or "")["query_id"]
    rating, comment = events_pb2.FEEDBACK_KIND_RATING, events_pb2.FEEDBACK_KIND_COMMENT
    expected = [(rating, 5, ""), (comment, 0, "Too long."), (comment, 0, "Cite it.")]
    deadline = time.monotonic() + 60
    while (live := _live_feedback(site.trainer_store, query_id)) != expected:
        assert time.monotonic() < deadline, live  # the feedback reaches the trainer's store through Kafka
        await asyncio.sleep(1)
    await visitor.close()


async def test_the_gateway_refuses_what_a_browser_must_not_do(site: Site) -> None:
    async with httpx.AsyncClient(base_url=site.gateway, timeout=120) as client:
        ask = {
            "question": QUESTION,
            "page": {"url": f"{site.pages}/general.html", "text": "Python is a language."},
        }
        foreign = await client.post("/api/v1/answers", json=ask, headers={"origin": "http://evil.example"})
        assert foreign.status_code == 403 and "access-control-allow-origin" not in foreign.headers
        # A visitor session: one real answer, then the session's questions run out (burst 3).
        first = await client.post("/api/v1/answers", json=ask, headers={"origin": site.pages})
        assert first.status_code == 200 and "event: done" in first.text
        seen = first.text + json.dumps(dict(first.headers))
        assert not [t for t in TOKENS if t in seen]
        assert client.cookies.get("flywheel_session")
        codes = [
            (
                await client.post("/api/v1/answers", json={"question": ""}, headers={"origin": site.pages})
            ).status_code
            for _ in range(3)
        ]
        assert codes == [400, 400, 429]
        # The visitor cannot reach the review API, nor log in with the gateway's user-role token.
        assert (await client.get("/api/v1/review/items")).status_code == 401
        login = await client.post(
            "/console/login", json={"token": "dev-user-token"}, headers={"origin": site.gateway}
        )
        assert login.status_code == 403


async def test_simulated_visitors_through_the_gateway(site: Site, stack: LocalStack) -> None:
    """The simulation's `--via-gateway` visitor: asks and rates over HTTP; the overhead is measured."""
    import grpc

    from flywheel_cli.simulation.via_gateway import GatewayVisitor, measure_overhead
    from flywheel_proto.flywheel.inference.v1 import inference_pb2, inference_pb2_grpc

    visitor = GatewayVisitor(site.gateway, timeout_s=120)
    page = inference_pb2.Page(
        url=f"{site.pages}/general.html", title="FAQ", text="Guido van Rossum created Python."
    )
    try:
        # Two answers, two sessions: neither is held back by the other's question limit.
        first, second = [await visitor.ask(page, "Who created Python?") for _ in range(2)]
        assert first.answer and first.query_id and first.model_version == "v1"
        assert first.cookie != second.cookie
        await visitor.rate(first, rating=2, key="sim-test-rating")
        await visitor.rate(second, rating=None, key="sim-test-ignored")
        async with grpc.aio.insecure_channel(stack.targets["inference"]) as channel:
            request = inference_pb2.AnswerRequest(page=page, question="Who created Python?")
            measured = await measure_overhead(
                visitor, inference_pb2_grpc.InferenceServiceStub(channel), [request], timeout_s=120
            )
    finally:
        await visitor.close()
    assert measured["answers"] == 1 and measured["grpc_median_ms"] > 0 and measured["gateway_median_ms"] > 0


class _Recorder:
    """The feedback service's producer: keeps the events instead of sending them to Kafka."""

    def __init__(self) -> None:
        self.events: list[events_pb2.Feedback] = []

    async def produce(self, topic: str, key: str, message: Any, headers: Any = None) -> None:
        self.events.append(message)


@dataclass
class Console:
    """The console alone: the gateway before the real trainer and feedback services, the evaluator down."""

    url: str
    store: JoinStore
    events: list[events_pb2.Feedback]
    questions: list[str]

    def claimed(self) -> set[str]:
        """The questions of the answers someone holds a claim on."""
        rows = self.store._query(
            "SELECT i.question FROM review_claims c JOIN interactions i USING (query_id) WHERE c.until > ?",
            (time.time(),),
        )
        return {r["question"] for r in rows}


@pytest.fixture
async def console(tmp_path: Path, idle_launcher: JobLauncher) -> AsyncIterator[Console]:
    """Four low-rated answers in the trainer's store; no model, no Kafka (the feedback service's
    events are recorded), so this tier's console checks take seconds."""
    signer = QueryIdSigner(b"test-query-id-key-0123")
    store = JoinStore(tmp_path / "trainer.sqlite3", ExamplePolicy(PolicySettings()))
    questions = [f"Question {n}?" for n in range(4)]
    for n, question in enumerate(questions):
        query_id = signer.issue("v1")
        interaction = events_pb2.Interaction(
            query_id=query_id, question=question, answer=f"Answer {n}.", passages=["p"], model_version="v1"
        )
        low = FeedbackSignal(
            f"f{n}", query_id, events_pb2.FEEDBACK_KIND_RATING, 1, "", events_pb2.REVIEWER_ROLE_USER
        )
        store.ingest([interaction], [low])
    registry = ModelRegistry(tmp_path / "artifacts")
    trainer = Trainer(
        TrainerSettings(artifact_root=registry.root, data_dir=tmp_path / "trainer"),
        store,
        idle_launcher,
        registry,
        None,
    )
    tokens = Authenticator(load_tokens(None))
    trainer_server = GrpcServer(GrpcSettings(port=0), "trainer")
    trainer_servicer = TrainerServicer(trainer, tokens, b"test-pseudonym-key")
    trainer_server.add_service(
        "flywheel.trainer.v1.TrainerService",
        lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(trainer_servicer, s),
    )
    recorder = _Recorder()
    feedback_servicer = FeedbackServicer(
        FeedbackSettings(),
        producer=recorder,  # type: ignore[arg-type]
        authenticator=tokens,
        redactor=Redactor(presidio=False),
        signer=signer,
        pseudonym_key=b"test-pseudonym-key-0123",
    )
    feedback_server = GrpcServer(GrpcSettings(port=0), "feedback")
    feedback_server.add_service(
        "flywheel.feedback.v1.FeedbackService",
        lambda s: feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(feedback_servicer, s),
    )
    targets = {
        "inference": "127.0.0.1:9",
        "trainer": f"127.0.0.1:{await trainer_server.start()}",
        "feedback": f"127.0.0.1:{await feedback_server.start()}",
        "evaluator": "127.0.0.1:9",
    }
    app = GatewayApp(
        GatewaySettings(http={"port": 0, "grace_s": 1}, services=targets, session={"secure_cookies": False})
    )
    await app.start()
    yield Console(app.url, store, recorder.events, questions)
    await app.stop()
    await trainer_server.stop(0)
    await feedback_server.stop(0)
    store.close()


async def _eventually(check: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "never came true"
        await asyncio.sleep(0.1)


async def test_the_console_acts_once_gives_back_claims_and_keeps_drafts(
    console: Console, browser: object
) -> None:
    """One action per press and key, claims released when the expert moves on, skips or leaves,
    drafts kept through j/k, a reload and a lapsed login (the action is sent after logging in again),
    and the queue shown while the evaluator is down."""
    from playwright.async_api import Browser, Route, expect

    assert isinstance(browser, Browser)
    context = await browser.new_context()
    page = await context.new_page()
    posts: list[dict[str, Any]] = []
    refuse_next = {"correct": 1}

    async def actions(route: Route) -> None:
        body = json.loads(route.request.post_data or "{}")
        posts.append(body)
        if refuse_next.get(body["action"]):
            refuse_next[body["action"]] -= 1
            await route.fulfill(status=503, json={"error": "The service is busy."})
            return
        await asyncio.sleep(0.8)  # a slow feedback service: long enough to press twice
        await route.continue_()

    await page.route("**/api/v1/review/actions", actions)
    question = page.locator("#question")
    await page.goto(f"{console.url}/console")
    await expect(page.locator("#login-view")).to_be_visible()
    await page.get_by_label("Your reviewer token").fill("dev-expert-token")
    await page.keyboard.press("Enter")
    await expect(page.locator("#queue button")).to_have_count(4)
    order = "bs => bs.map(b => b.firstChild.textContent)"
    a, b, c, d = await page.eval_on_selector_all("#queue button", order)
    await expect(question).to_have_text(a)
    # The evaluator is down: the rollout panel says so, the queue works.
    await expect(page.locator("#rollout")).to_contain_text("unavailable")

    # Pressed twice while the first is on its way: one action, the next item shown, none lost.
    await page.keyboard.press("a")
    await page.keyboard.press("a")
    await expect(page.locator("#status")).to_have_text("Saved: accept.")
    assert [p["action"] for p in posts] == ["accept"] and posts[0]["idempotency_key"]
    await expect(question).to_have_text(b)
    await expect(page.locator("#queue button")).to_have_count(3)
    await _eventually(lambda: console.claimed() == {a, b})
    # Moving on gives the claim back; skipping the last item shows the one before, unclaimed no more.
    await page.keyboard.press("j")
    await _eventually(lambda: console.claimed() == {a, c})
    await page.keyboard.press("j")
    await expect(question).to_have_text(d)
    await page.keyboard.press("s")
    await expect(question).to_have_text(c)
    await _eventually(lambda: console.claimed() == {a, c})

    # A draft stays through j / k and a reload (which gives back the claim too).
    draft = "A careful correction that took ten minutes to write."
    await page.get_by_label("Correct answer").fill(draft)
    await page.keyboard.press("Escape")
    await page.keyboard.press("j")
    await expect(page.get_by_label("Correct answer")).to_have_value(
        d.replace("Question", "Answer").replace("?", ".")
    )
    await page.keyboard.press("k")
    await expect(page.get_by_label("Correct answer")).to_have_value(draft)
    await page.reload()
    await expect(question).to_have_text(b)  # logged in still, though the evaluator is down
    await _eventually(lambda: console.claimed() == {a, b})
    await page.keyboard.press("j")
    await expect(page.get_by_label("Correct answer")).to_have_value(draft)

    # Refused once (503), then the login lapses: the same action, with the same key, is sent once
    # the expert logs in again, and stored once.
    await page.get_by_label("Correct answer").press("Control+Enter")
    await expect(page.locator("#status")).to_contain_text("Press again to retry")
    await page.request.post(f"{console.url}/console/logout", headers={"origin": console.url})
    await page.get_by_label("Correct answer").press("Control+Enter")
    await expect(page.locator("#login-error")).to_contain_text("log in again", ignore_case=True)
    await page.get_by_label("Your reviewer token").fill("dev-expert-token")
    await page.keyboard.press("Enter")
    await expect(page.locator("#status")).to_have_text("Saved: correct.")
    corrections = [p for p in posts if p["action"] == "correct"]
    assert len(corrections) == 3 and len({p["idempotency_key"] for p in corrections}) == 1
    assert [e.redacted_text for e in console.events if e.kind == events_pb2.FEEDBACK_KIND_CORRECTION] == [
        draft
    ]

    # Logging out gives back the claim of the item shown; the acted-on ones wait for the trainer.
    await expect(question).to_have_text(d)
    await _eventually(lambda: console.claimed() == {a, c, d})
    await page.get_by_role("button", name="Log out").click()
    await expect(page.locator("#login-view")).to_be_visible()
    await _eventually(lambda: console.claimed() == {a, c})
    await context.close()


# --- the widget's look and failure modes, on the real gateway with the answers API stood in ---------


@dataclass
class WidgetSite:
    """The gateway (serving the widget; no services behind it) and a page on another origin."""

    gateway: str
    pages: str


@pytest.fixture(scope="module")
async def widget_site() -> AsyncIterator[WidgetSite]:
    """The real gateway's widget files, fast: each test stands in for the answers API itself."""
    gateway_port = free_port("127.0.0.1")
    pages = _page_server(f"http://127.0.0.1:{gateway_port}")
    pages_url = f"http://127.0.0.1:{pages.server_address[1]}"
    down = {name: "127.0.0.1:9" for name in ("inference", "feedback", "trainer", "evaluator")}
    settings = GatewaySettings(
        http={"port": gateway_port, "grace_s": 1},
        services=down,
        sites=[pages_url],
        session={"secure_cookies": False},
    )
    app = GatewayApp(settings)
    await app.start()
    yield WidgetSite(app.url, pages_url)
    pages.shutdown()
    await app.stop()


def _sse(*events: tuple[str, dict[str, Any]]) -> str:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)


_PASSAGE = "Python is an interpreted, interactive, object-oriented"  # on general.html
_META = ("meta", {"query_id": "q1", "ticket": "t1", "passages": [{"text": _PASSAGE}]})
_IN_WIDGET = "sel => document.querySelector('#flywheel-widget').shadowRoot.querySelector(sel)"


async def _widget_page(browser: object, site: WidgetSite, width: int, answers: Any) -> Any:
    """A page with the widget whose answers come from `answers(route)`; host elements named like
    the widget's own (`.panel`, `.close`, a button) are added before the widget loads."""
    from playwright.async_api import Browser, Route

    assert isinstance(browser, Browser)
    context = await browser.new_context(viewport={"width": width, "height": 700})
    page = await context.new_page()
    await page.add_init_script(
        """document.addEventListener("DOMContentLoaded", () => {
          document.body.insertAdjacentHTML("afterbegin",
            '<div class="panel" id="host-panel">The site panel</div>' +
            '<button class="close" id="host-close">Site close</button>');
        })"""
    )

    async def route(route: Route) -> None:
        if route.request.method == "OPTIONS":
            await route.fulfill(
                status=204,
                headers={
                    "access-control-allow-origin": site.pages,
                    "access-control-allow-credentials": "true",
                    "access-control-allow-methods": "POST",
                    "access-control-allow-headers": "content-type",
                },
            )
            return
        await answers(route)

    await page.route(f"{site.gateway}/api/v1/answers", route)
    await page.goto(f"{site.pages}/general.html")
    await page.get_by_role("button", name="Ask about this page").wait_for()
    return page


async def _fulfil(route: Any, site: WidgetSite, body: str) -> None:
    headers = {
        "content-type": "text/event-stream",
        "access-control-allow-origin": site.pages,
        "access-control-allow-credentials": "true",
    }
    await route.fulfill(status=200, headers=headers, body=body)


async def test_the_widget_leaves_the_pages_own_styles_alone(widget_site: WidgetSite, browser: object) -> None:
    """Only the passage highlight reaches the page: its own .panel, .close and buttons look as before."""
    from playwright.async_api import expect

    async def answers(route: Any) -> None:
        await _fulfil(route, widget_site, _sse(_META, ("delta", {"text": "Yes."}), ("done", {})))

    page = await _widget_page(browser, widget_site, 1200, answers)
    await page.get_by_role("button", name="Ask about this page").click()
    await page.get_by_label("Your question about this page").fill(QUESTION)
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("group", name="Rate this answer")).to_be_visible()
    host = await page.evaluate(
        """() => {
          const panel = getComputedStyle(document.querySelector("#host-panel"));
          const close = getComputedStyle(document.querySelector("#host-close"));
          const rules = [...document.styleSheets, ...document.adoptedStyleSheets]
            .flatMap(s => { try { return [...s.cssRules].map(r => r.cssText); } catch { return [s.href]; } });
          return {position: panel.position, padding: panel.paddingTop, float: close.float,
                  background: close.backgroundColor, font: close.fontFamily, rules};
        }"""
    )
    assert host["position"] == "static" and host["padding"] == "0px", host
    assert host["float"] == "none" and "system-ui" not in host["font"], host
    assert host["background"] != "rgba(0, 0, 0, 0)", host  # the browser's own button, not the widget's close
    # The one rule the page gets is the highlight's, and the passage is highlighted.
    assert [r for r in host["rules"] if "flywheel" in r] == host["rules"] and len(host["rules"]) == 1, host
    assert await page.evaluate("CSS.highlights.get('flywheel-passage').size") == 1
    await page.context.close()


async def test_the_widget_fits_a_320_px_window(widget_site: WidgetSite, browser: object) -> None:
    """At 320 px the panel lies inside the window and a long word wraps inside the answer."""
    from playwright.async_api import expect

    word = "https://example.com/" + "averyveryverylongpathsegment" * 8

    async def answers(route: Any) -> None:
        await _fulfil(route, widget_site, _sse(_META, ("delta", {"text": f"See {word}."}), ("done", {})))

    page = await _widget_page(browser, widget_site, 320, answers)
    await page.get_by_role("button", name="Ask about this page").click()
    await page.get_by_label("Your question about this page").fill(QUESTION)
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("group", name="Rate this answer")).to_be_visible()
    box = await page.evaluate(
        f"""() => {{
          const find = {_IN_WIDGET};
          const panel = find(".panel").getBoundingClientRect(), answer = find(".answer");
          return {{left: panel.left, right: panel.right,
                   scroll: answer.scrollWidth, client: answer.clientWidth}};
        }}"""
    )
    assert box["left"] >= 0 and box["right"] <= 320, box
    assert box["scroll"] <= box["client"], box
    await page.context.close()


async def test_a_stream_cut_short_says_so(widget_site: WidgetSite, browser: object) -> None:
    """An answer whose stream ends without `done` is marked interrupted, not shown as finished."""
    from playwright.async_api import expect

    async def answers(route: Any) -> None:
        await _fulfil(route, widget_site, _sse(_META, ("delta", {"text": "Python is"})))

    page = await _widget_page(browser, widget_site, 1200, answers)
    await page.get_by_role("button", name="Ask about this page").click()
    await page.get_by_label("Your question about this page").fill(QUESTION)
    await page.keyboard.press("Enter")
    answer = page.locator("#flywheel-widget .answer")
    await expect(answer).to_have_text("The answer was interrupted. Try again.")
    await expect(answer).to_have_class("answer error")
    await expect(page.get_by_role("group", name="Rate this answer")).to_be_hidden()
    await expect(page.get_by_role("button", name="Ask", exact=True)).to_be_enabled()
    await page.context.close()


async def test_asking_by_keyboard_keeps_focus_in_the_widget(widget_site: WidgetSite, browser: object) -> None:
    """Ask pressed with the keyboard: the wait is shown, focus stays in the widget, Escape closes it."""
    from playwright.async_api import expect

    release = asyncio.Event()

    async def answers(route: Any) -> None:
        await release.wait()  # a slow model: the visitor waits
        await _fulfil(route, widget_site, _sse(_META, ("delta", {"text": "Yes."}), ("done", {})))

    page = await _widget_page(browser, widget_site, 1200, answers)
    await page.get_by_role("button", name="Ask about this page").focus()
    await page.keyboard.press("Enter")
    await page.keyboard.type(QUESTION)
    await page.keyboard.press("Tab")
    await page.keyboard.press("Enter")  # on Ask, which is disabled while the answer comes
    focused = "() => [document.activeElement.id, document.activeElement.shadowRoot?.activeElement?.id]"
    assert await page.evaluate(focused) == ["flywheel-widget", "fw-q"]
    await expect(page.locator("#flywheel-widget .answer")).to_have_text("Finding the answer\u2026")
    await page.keyboard.press("Escape")
    await expect(page.get_by_role("dialog", name="Ask about this page")).to_be_hidden()
    assert (await page.evaluate(focused))[0] == "flywheel-widget"
    release.set()
    await page.context.close()


async def test_the_console_shortcuts_can_be_turned_off_and_focus_stays_on_the_item(
    console: Console, browser: object
) -> None:
    """With single-key shortcuts off, Escape out of the note then `a` does nothing; Escape lands on
    the item's heading, an action moves focus to the next item's, and the choice survives a reload.
    At 320 px the console is one column."""
    from playwright.async_api import Browser, expect

    assert isinstance(browser, Browser)
    context = await browser.new_context(viewport={"width": 320, "height": 700})
    page = await context.new_page()
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.url.endswith("/review/actions") else None)
    await page.goto(f"{console.url}/console")
    await page.get_by_label("Your reviewer token").fill("dev-expert-token")
    await page.keyboard.press("Enter")
    await expect(page.locator("#queue button")).to_have_count(4)
    assert await page.evaluate("document.documentElement.scrollWidth") <= 320
    order = "bs => bs.map(b => b.firstChild.textContent)"
    first, second = (await page.eval_on_selector_all("#queue button", order))[:2]
    await expect(page.locator("#announce")).to_have_text(f"Item 1 of 4: {first}")
    assert await page.locator("main[aria-live]").count() == 0

    focused = "() => document.activeElement.id"
    shortcuts = page.get_by_label("Single-key shortcuts")
    await shortcuts.uncheck()
    await page.reload()
    await expect(page.locator("#question")).to_have_text(first)
    await expect(shortcuts).not_to_be_checked()
    await page.get_by_label("Note (optional; sent with any action)").fill("checked twice")
    await page.keyboard.press("Escape")
    assert await page.evaluate(focused) == "question"
    await page.keyboard.press("a")
    await page.wait_for_timeout(300)
    assert posts == [] and await page.locator("#question").text_content() == first

    # On again: the same keys act, and focus moves to the next item's heading, not the page's body.
    await shortcuts.check()
    await page.locator("#question").focus()
    await page.keyboard.press("a")
    await expect(page.locator("#status")).to_have_text("Saved: accept.")
    await expect(page.locator("#question")).to_have_text(second)
    assert posts and await page.evaluate(focused) == "question"
    await context.close()
