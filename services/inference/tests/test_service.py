"""The servicer in-process: streams closed early, and pages that give retrieval nothing to index."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bm25s
import pytest

from flywheel_common.auth import Authenticator
from flywheel_common.errors import DeadlineExceeded, InvalidArgument, Unauthenticated
from flywheel_common.pseudonym import pseudonymise
from flywheel_common.query_ids import QueryIdSigner, query_id_network
from flywheel_inference.router import ModelRouter
from flywheel_inference.service import InferenceServicer
from flywheel_inference.settings import LimitSettings
from flywheel_model.engine import EngineSettings, PreparedPrompt
from flywheel_model.generation import SamplingParams, Sequence
from flywheel_model.retrieval import Retriever
from flywheel_model.runtime import OrtSettings
from flywheel_proto.flywheel.inference.v1 import inference_pb2

CONTEXT: Any = SimpleNamespace(
    time_remaining=lambda: None, invocation_metadata=lambda: (), peer=lambda: "ipv4:127.0.0.1:5000"
)
# Page texts in which BM25 finds no word: single letters, stopwords, punctuation, emoji.
NO_INDEXABLE_WORD = ["x", "é", "a b c d", "the of and", "!!! ???", "😀 😀"]


def request(text: str = "Kafka stores records in topics.") -> inference_pb2.AnswerRequest:
    return inference_pb2.AnswerRequest(
        page=inference_pb2.Page(text=text), question="What does Kafka store?", session_id="s"
    )


class HeldGenerator:
    """Takes sequences and never runs them: a request stays where the test leaves it."""

    def __init__(self) -> None:
        self.submitted: list[Sequence] = []

    def submit(self, seq: Sequence) -> None:
        self.submitted.append(seq)


class RetrievingEngine:
    """An engine without a model: the real retriever (a word a token), and held generation."""

    def __init__(self) -> None:
        self.generator = HeldGenerator()
        self.encoder = None
        self.retriever = Retriever(lambda text: len(text.split()))

    def prepare(self, page_text: str, title: str, question: str, max_new_tokens: int = 0) -> PreparedPrompt:
        passages = self.retriever.select(page_text, question, token_budget=400)
        return PreparedPrompt(passages, [1, 2, 3], page_text, 0.0)

    def sequence(
        self,
        prepared: PreparedPrompt,
        question: str,
        params: SamplingParams,
        on_token: Callable[[int], None],
        on_finish: Callable[[str, BaseException | None], None],
        deadline: float | None = None,
    ) -> Sequence:
        return Sequence(prepared.token_ids, params, on_token, on_finish, deadline=deadline)


def servicer_over(engine: RetrievingEngine) -> InferenceServicer:
    loaded = SimpleNamespace(version="v1", engine=engine)
    router: Any = SimpleNamespace(route=lambda session_id: loaded)
    return InferenceServicer(
        router,
        LimitSettings(),
        QueryIdSigner(b"k" * 16),
        b"p" * 16,
        None,
        authenticator=Authenticator({"gateway-token": "user"}),
    )


def context_of(peer: str, token: str | None = None) -> Any:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return SimpleNamespace(
        time_remaining=lambda: None, invocation_metadata=lambda: metadata, peer=lambda: peer
    )


@pytest.mark.parametrize(
    ("peer", "token", "named", "counted_in"),
    [
        # An anonymous caller counts in its own address's block; on loopback (the local stack) in none.
        ("ipv4:203.0.113.7:5000", None, "", "203.0.113.0/24"),
        ("ipv6:[2001:db8:7:1::9]:5000", None, "", "2001:db8:7::/48"),
        ("ipv6:[::ffff:203.0.113.7]:5000", None, "", "203.0.113.0/24"),
        ("ipv4:127.0.0.1:5000", None, "", ""),
        # The gateway (a caller with a token) names its visitor's network, or none.
        ("ipv4:10.0.0.5:5000", "gateway-token", "198.51.100.0/24", "198.51.100.0/24"),
        ("ipv4:10.0.0.5:5000", "gateway-token", "", ""),
    ],
)
async def test_the_asker_counts_in_the_network_the_gateway_names_or_its_own(
    peer: str, token: str | None, named: str, counted_in: str
) -> None:
    servicer = servicer_over(RetrievingEngine())
    ask = request()
    ask.client_network = named
    stream = servicer.StreamAnswer(ask, context_of(peer, token))
    header = await anext(stream)
    await stream.aclose()
    assert query_id_network(header.query_id) == pseudonymise(b"p" * 16, counted_in, domain="network")


async def test_only_a_caller_with_a_known_token_may_name_a_network() -> None:
    servicer = servicer_over(RetrievingEngine())
    ask = request()
    ask.client_network = "198.51.100.0/24"
    # Anonymous, a network of its choice on each call would make each call a voter of its own.
    with pytest.raises(Unauthenticated, match="client_network is taken only from a caller with a token"):
        await servicer.Answer(ask, context_of("ipv4:203.0.113.7:5000"))
    with pytest.raises(Unauthenticated, match="unknown"):
        await servicer.Answer(ask, context_of("ipv4:203.0.113.7:5000", "guessed-token"))
    assert servicer._in_flight == 0


async def test_a_stream_closed_at_its_header_cancels_its_sequence_and_frees_its_slot() -> None:
    engine = RetrievingEngine()
    servicer = servicer_over(engine)
    stream = servicer.StreamAnswer(request(), CONTEXT)
    assert isinstance(stream, AsyncGenerator)
    header = await anext(stream)
    assert header.query_id and header.passages and servicer._in_flight == 1
    # What grpc.aio and asyncio do with a stream whose client went away.
    await stream.aclose()
    (seq,) = engine.generator.submitted
    assert seq.cancelled.is_set(), "the sequence would generate on to max_new_tokens"
    assert servicer._in_flight == 0


class ExpiringGenerator:
    """Ends every sequence as the engine does once its deadline has passed."""

    def submit(self, seq: Sequence) -> None:
        seq.on_finish("deadline", None)


class Sink:
    """Keeps the interactions the servicer logs."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def publish(self, key: str, event: Any) -> None:
        self.events.append(event)


@pytest.mark.parametrize(
    ("remaining", "token", "logged"),
    [
        # An anonymous caller's own short deadline: its answer is not the service's failure.
        (0.05, None, "client_deadline"),
        # The service's own limit (no deadline, or one past the limit), and the gateway's deadline
        # (the limit its visitors see): failed answers, which live evidence counts.
        (None, None, "deadline"),
        (LimitSettings().default_timeout_s + 1, None, "deadline"),
        (0.05, "gateway-token", "deadline"),
    ],
)
async def test_a_callers_own_deadline_is_logged_apart_from_the_services(
    remaining: float | None, token: str | None, logged: str
) -> None:
    engine = RetrievingEngine()
    engine.generator = ExpiringGenerator()  # type: ignore[assignment]
    engine.encoder = SimpleNamespace(decode=lambda ids, **kwargs: "x" * len(ids))
    servicer = servicer_over(engine)
    sink = Sink()
    servicer._sink = sink
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    context = SimpleNamespace(
        time_remaining=lambda: remaining,
        invocation_metadata=lambda: metadata,
        peer=lambda: "ipv4:203.0.113.7:5000",
    )
    with pytest.raises(DeadlineExceeded):
        await servicer.Answer(request(), context)
    assert [event.finish_reason for event in sink.events] == [logged]


async def test_a_page_retrieval_cannot_index_is_an_invalid_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: bm25s.BM25, *args: object, **kwargs: object) -> None:
        raise ValueError("max() arg is an empty sequence")

    monkeypatch.setattr(bm25s.BM25, "index", refuse)
    servicer = servicer_over(RetrievingEngine())
    with pytest.raises(InvalidArgument, match="could not be indexed"):
        await servicer.Answer(request(), CONTEXT)
    assert servicer._in_flight == 0


@pytest.fixture(scope="module")
async def model_servicer(onnx_model_dir: Path) -> AsyncIterator[InferenceServicer]:
    router = ModelRouter(
        None, OrtSettings(), EngineSettings(), canary_key=b"c" * 16, local_model_dir=onnx_model_dir
    )
    await router.refresh()
    limits = LimitSettings(default_max_new_tokens=8)
    yield InferenceServicer(router, limits, QueryIdSigner(b"k" * 16), b"p" * 16, None)
    await router.close()


@pytest.mark.integration
@pytest.mark.parametrize("text", NO_INDEXABLE_WORD)
async def test_a_page_without_an_indexable_word_is_answered(
    text: str, model_servicer: InferenceServicer
) -> None:
    # bm25s raised ValueError on these pages, which the service returned as INTERNAL.
    response = await model_servicer.Answer(request(text), CONTEXT)
    assert response.finish_reason in ("eos", "max_tokens")
    assert [p.text for p in response.passages] == [text]
