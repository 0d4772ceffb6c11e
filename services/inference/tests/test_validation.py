"""Request validation and canary routing, without a model."""

import hashlib
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flywheel_common.errors import InvalidArgument, ResourceExhausted, Unavailable
from flywheel_common.query_ids import QueryIdSigner
from flywheel_inference import service
from flywheel_inference.router import ModelRouter, in_canary
from flywheel_inference.service import ValidRequest, read_page, validate
from flywheel_inference.settings import InferenceSettings, LimitSettings
from flywheel_model.engine import EngineSettings
from flywheel_model.retrieval import html_to_text
from flywheel_model.runtime import OrtSettings
from flywheel_proto.flywheel.inference.v1 import inference_pb2

LIMITS = LimitSettings(
    max_question_chars=50,
    max_page_bytes=1000,
    max_new_tokens=100,
    default_max_new_tokens=20,
    max_title_chars=40,
    max_session_id_chars=30,
)


def check(request: inference_pb2.AnswerRequest, limits: LimitSettings = LIMITS) -> ValidRequest:
    """Both steps of the service's checks: the cheap one before admission, the page after."""
    return read_page(validate(request, limits), limits)


def req(**kwargs: object) -> inference_pb2.AnswerRequest:
    page = kwargs.pop("page", inference_pb2.Page(title="T", html="<p>Some text.</p>"))
    return inference_pb2.AnswerRequest(page=page, question=kwargs.pop("question", "What?"), **kwargs)  # type: ignore[arg-type]


def test_defaults_are_applied_and_html_is_cleaned() -> None:
    valid = check(req())
    assert valid.page_text == "Some text."
    assert valid.title == "T"
    assert (valid.params.max_new_tokens, valid.params.temperature, valid.params.top_p) == (20, 0.0, 1.0)
    assert valid.params.seed is None


def test_plain_text_pages_and_html_titles() -> None:
    assert check(req(page=inference_pb2.Page(text="  a   b \n\n c "))).page_text == "a b\nc"
    html = "<html><head><title>From HTML</title></head><body>x</body></html>"
    assert check(req(page=inference_pb2.Page(html=html))).title == "From HTML"


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (req(question=""), "question is empty"),
        (req(question="x" * 51), "longer than 50"),
        (req(page=inference_pb2.Page(text="")), "no content"),
        (req(page=inference_pb2.Page(text="x" * 1001)), "larger than 1000"),
        (req(page=inference_pb2.Page(url="u" * 5000, text="x")), "page.url is longer than 4096"),
        (req(page=inference_pb2.Page(title="t" * 41, text="x")), "page.title is longer than 40"),
        (req(session_id="s" * 31), "session_id is longer than 30"),
        (req(question="\x00\x1b[0m\u202e "), "question is empty"),
        (req(page=inference_pb2.Page(url="https://a.example/\x00", text="x")), "page.url must not"),
        (req(page=inference_pb2.Page(url="https://a.example/ x", text="x")), "page.url must not"),
        (req(session_id="s\x1b1"), "session_id must not contain control"),
        (req(options=inference_pb2.GenerationOptions(max_new_tokens=101)), "max_new_tokens"),
        (req(options=inference_pb2.GenerationOptions(temperature=3)), "temperature"),
        (req(options=inference_pb2.GenerationOptions(top_p=-0.1)), "top_p"),
        (req(client_network="203.0.113.7"), "client_network must be an address block"),
        (req(client_network="not-a-network/24"), "client_network must be an address block"),
        (req(client_network="203.0.113.0/33"), "client_network must be an address block"),
        (req(client_network="2001:db8::/48" + " " * 60), "client_network must be an address block"),
    ],
)
def test_invalid_requests_say_what_is_wrong(request_: inference_pb2.AnswerRequest, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check(request_)


def test_a_client_network_is_read_as_its_address_block() -> None:
    assert check(req()).client_network == ""
    assert check(req(client_network="203.0.113.77/24")).client_network == "203.0.113.0/24"
    assert check(req(client_network="2001:DB8:0:1::/48")).client_network == "2001:db8::/48"


def test_limits_are_inclusive_and_an_html_title_is_cut_not_refused() -> None:
    at_limit = req(page=inference_pb2.Page(title="t" * 40, url="u" * 4096, text="x"), session_id="s" * 30)
    assert check(at_limit).title == "t" * 40
    html = f"<html><head><title>{'h' * 100}</title></head><body>x</body></html>"
    assert check(req(page=inference_pb2.Page(html=html))).title == "h" * 40


def test_control_escape_and_bidi_characters_are_stripped_from_free_text() -> None:
    hostile = req(
        question="Wh\x00at \x1b[2Jis\u202e it?",
        page=inference_pb2.Page(title="Ti\x07tle\u2066", text="Pa\x00ge \x1b[31mtext\u202e."),
    )
    valid = check(hostile, LIMITS)
    assert (valid.question, valid.title, valid.page_text) == ("What is it?", "Title", "Page text.")


def test_canary_assignment_is_stable_and_close_to_the_fraction() -> None:
    key = b"k" * 16
    sessions = [f"session-{i}" for i in range(4000)]
    share = sum(in_canary(key, s, 0.1) for s in sessions) / len(sessions)
    assert 0.08 < share < 0.12
    first = [in_canary(key, s, 0.1) for s in sessions[:50]]
    assert first == [in_canary(key, s, 0.1) for s in sessions[:50]]
    assert not in_canary(key, "", 0.5) and not in_canary(key, "x", 0.0)
    assert all(in_canary(key, s, 1.0) for s in sessions[:20])


def test_the_canary_split_is_keyed_so_a_client_cannot_compute_its_arm() -> None:
    # The unkeyed split let a client pick session ids that land on the canary offline.
    sessions = [f"session-{i}" for i in range(400)]
    unkeyed = [int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big") / 2**64 < 0.5 for s in sessions]
    one = [in_canary(b"a" * 16, s, 0.5) for s in sessions]
    other = [in_canary(b"b" * 16, s, 0.5) for s in sessions]
    assert one != unkeyed and one != other
    # About half agree by chance, as for any independent split.
    assert 120 < sum(a == b for a, b in zip(one, other, strict=True)) < 280


def test_settings_read_nested_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_INFERENCE_GRPC__PORT", "6000")
    monkeypatch.setenv("FLYWHEEL_INFERENCE_ORT__GPU_MEM_LIMIT", "2147483648")
    monkeypatch.setenv("FLYWHEEL_INFERENCE_LIMITS__MAX_IN_FLIGHT", "7")
    settings = InferenceSettings()
    assert settings.grpc.port == 6000
    assert settings.ort.gpu_mem_limit == 2 * 1024**3
    assert settings.limits.max_in_flight == 7


async def test_pages_are_parsed_after_admission_and_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed_on: list[threading.Thread] = []

    def spy(html: str) -> tuple[str, str]:
        parsed_on.append(threading.current_thread())
        return html_to_text(html)

    monkeypatch.setattr(service, "html_to_text", spy)
    router = ModelRouter(
        None, OrtSettings(), EngineSettings(), canary_key=b"c" * 16, local_model_dir=Path("unused")
    )
    servicer = service.InferenceServicer(
        router, LimitSettings(max_in_flight=1), QueryIdSigner(b"k" * 16), b"p" * 16, None
    )
    context: Any = SimpleNamespace(
        time_remaining=lambda: None, invocation_metadata=lambda: (), peer=lambda: "unix:/run/x"
    )
    with pytest.raises(Unavailable, match="no model"):  # parsed, then no model is loaded yet
        await servicer.Answer(req(), context)
    assert parsed_on and parsed_on[0] is not threading.main_thread()
    servicer._in_flight = 1  # at its limit: refused before the page is parsed
    with pytest.raises(ResourceExhausted):
        await servicer.Answer(req(), context)
    assert len(parsed_on) == 1
