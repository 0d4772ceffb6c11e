"""Sampling, batch cache bookkeeping, and generation on the real ONNX model."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flywheel_model.engine import AnswerEngine, EngineSettings
from flywheel_model.generation import BatchGenerator, Sampler, SamplingParams, Sequence, draft
from flywheel_model.prompt import PromptTooLong, build_messages
from flywheel_model.retrieval import Passage
from flywheel_model.runtime import Decoder, OrtSettings, SharedCache, release_memory, select_rows, stack_kv

Generate = Callable[[BatchGenerator, list[list[int]], int], list[list[int]]]


def test_greedy_sampler_takes_the_argmax() -> None:
    assert Sampler(SamplingParams())(np.array([0.1, 3.0, -1.0])) == 1


def test_seeded_sampling_is_reproducible_and_top_p_truncates() -> None:
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05]))
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=7)
    draws = [Sampler(params)(logits) for _ in range(5)]
    assert draws == [draws[0]] * 5  # a fresh sampler with the same seed draws the same
    sampler = Sampler(params)
    assert {sampler(logits) for _ in range(50)} == {0}  # top-p 0.5 keeps only the 0.6 token


def test_a_draft_copies_what_followed_the_last_tokens_latest_earlier_occurrence() -> None:
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 6, 7, 1, 2, 6, 7]
    assert draft(tokens, 3) == [1, 2, 6]  # "6 7" last occurred at 5, "8 9" followed it at 1
    assert draft(tokens, 1) == [1]
    assert draft([*tokens[:-1], 3, 9], 4) == [6, 7, 1, 2]  # only "9" occurs earlier
    assert draft([5, 6, 7, 3], 4) == []  # nothing earlier ends like it
    assert draft([4, 4], 4) == [4] and draft([4], 4) == []
    # Longer runs count first: "1 2 3" once said "9", though "2 3" later said "8".
    assert draft([1, 2, 3, 9, 2, 3, 8, 1, 2, 3], 1) == [9]


def test_stack_and_select_rows_keep_each_sequence_intact() -> None:
    a = {"k": np.arange(1 * 2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4)}
    b = {"k": np.ones((1, 2, 5, 4), np.float32)}
    stacked = stack_kv([(a, 3), (b, 5)])
    assert stacked["k"].shape == (2, 2, 5, 4)
    np.testing.assert_array_equal(stacked["k"][0, :, :3], a["k"][0])
    assert not stacked["k"][0, :, 3:].any()
    kept = select_rows(stacked, [0], 3)
    np.testing.assert_array_equal(kept["k"], a["k"])


def test_the_shared_cache_moves_the_last_rows_into_the_gaps_and_grows_keeping_every_row() -> None:
    cache = SharedCache(["k"], (2, 4), np.float32, max_rows=4, context_length=300)
    rows = [np.full((1, 2, n, 4), i + 1, np.float32) for i, n in enumerate((3, 5, 2, 4))]
    for row in rows:
        cache.append({"k": row}, row.shape[2])
    assert (cache.rows, cache.capacity) == (4, SharedCache.GROW)
    order = cache.keep([1, 2], [3, 5, 2, 4])  # rows 0 and 3 end: row 2 moves into row 0
    assert order == [2, 1]
    kept = cache.views()["k"]
    assert kept.shape == (2, 2, SharedCache.GROW, 4) and kept.flags.c_contiguous
    np.testing.assert_array_equal(kept[0, :, :2], rows[2][0])
    np.testing.assert_array_equal(kept[1, :, :5], rows[1][0])
    cache.reserve(SharedCache.GROW + 1)
    assert cache.capacity == 2 * SharedCache.GROW
    np.testing.assert_array_equal(cache.views()["k"][1, :, :5], rows[1][0])
    with pytest.raises(ValueError, match="context"):
        cache.reserve(301)
    assert cache.keep([], [2, 5]) == [] and (cache.rows, cache.capacity) == (0, 0)


@pytest.mark.integration
def test_batched_decoding_equals_one_at_a_time(onnx_model_dir: Path, generate: Generate) -> None:
    decoder = Decoder(onnx_model_dir, OrtSettings())
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(100, 40000, n)) for n in (30, 75, 12)]
    one = BatchGenerator(decoder, max_batch=1)
    sequential = [generate(one, [p], 12)[0] for p in prompts]
    one.close()
    batched_generator = BatchGenerator(decoder, max_batch=8)
    batched = generate(batched_generator, prompts, 12)
    batched_generator.close()
    assert batched == sequential
    assert all(len(tokens) == 12 for tokens in batched)


@pytest.mark.integration
def test_drafted_tokens_checked_in_one_step_give_the_greedy_answer(
    onnx_model_dir: Path, generate: Generate
) -> None:
    drafting = Decoder(onnx_model_dir, OrtSettings())
    plain = Decoder(onnx_model_dir, OrtSettings(drafts=False))
    assert drafting.drafts == 7 and plain.drafts == 0
    steps = {"check": 0, "checked": 0}
    check = drafting.check

    def counted(tokens: list[int], length: int, cache: Any) -> np.ndarray:
        steps["check"] += 1
        steps["checked"] += len(tokens)
        return check(tokens, length, cache)

    drafting.check = counted  # type: ignore[method-assign]
    rng = np.random.default_rng(5)
    # A run of tokens said three times (the model goes on copying it: drafts hold), and prompts with
    # little to copy; bounds that end a sequence inside a step's drafts.
    repeated = list(rng.integers(100, 40000, 25)) * 3
    prompts = [repeated, list(rng.integers(100, 40000, 60)), repeated[:40]]
    bounds = [30, 12, 3]
    reports: list[tuple[int, int]] = []
    outputs = []
    for decoder in (plain, drafting):
        alone = BatchGenerator(
            decoder, max_batch=1, on_check=lambda drafted, agreed: reports.append((drafted, agreed))
        )
        outputs.append([generate(alone, [p], b)[0] for p, b in zip(prompts, bounds, strict=True)])
        alone.close()
    assert outputs[1] == outputs[0]
    assert [len(tokens) for tokens in outputs[1]] == bounds
    # The repeated run was answered in fewer steps than tokens, and every such step was reported.
    assert steps["check"] and steps["checked"] > 2 * steps["check"]
    assert (
        len(reports) == steps["check"]
        and sum(drafted for drafted, _ in reports) == steps["checked"] - steps["check"]
    )
    assert (
        all(0 <= agreed <= drafted for drafted, agreed in reports)
        and sum(a for _, a in reports) > steps["check"]
    )
    # Together, sequences decode a token a step; a sequence left alone drafts again.
    together = BatchGenerator(drafting, max_batch=4)
    assert generate(together, prompts, bounds) == outputs[0]
    together.close()
    cache = drafting.new_cache(2)
    with pytest.raises(ValueError, match="1 to 8 tokens of one sequence"):
        check([1] * 9, 0, cache)


@pytest.mark.integration
def test_io_bound_decoding_equals_unbound_token_for_token(onnx_model_dir: Path, generate: Generate) -> None:
    # The stacked cache's path (the one CUDA takes), bound and unbound, on the CPU.
    bound_decoder = Decoder(onnx_model_dir, OrtSettings(io_binding="on", shared_cache=False))
    unbound_decoder = Decoder(onnx_model_dir, OrtSettings(io_binding="off", shared_cache=False))
    assert bound_decoder.io_bound and not unbound_decoder.io_bound
    rng = np.random.default_rng(2)
    # Different lengths, so the batch changes (a cache stacked and rows dropped) while decoding.
    prompts = [list(rng.integers(100, 40000, n)) for n in (40, 9, 66)]
    outputs = []
    for decoder in (unbound_decoder, bound_decoder):
        generator = BatchGenerator(decoder, max_batch=8)
        outputs.append([*generate(generator, prompts, 12), generate(generator, prompts[:1], 20)[0]])
        generator.close()
    assert outputs[1] == outputs[0]


@pytest.mark.integration
def test_decoding_in_a_shared_past_present_buffer_equals_the_stacked_cache(
    onnx_model_dir: Path, generate: Generate
) -> None:
    shared = Decoder(onnx_model_dir, OrtSettings())
    stacked = Decoder(onnx_model_dir, OrtSettings(shared_cache=False))
    assert shared.shares_cache and not stacked.shares_cache
    rng = np.random.default_rng(3)
    # Rows of different lengths that end at different steps while others go on, a join into a
    # running batch, and a row that crosses the buffer's first capacity (a grow while decoding).
    prompts = [list(rng.integers(100, 40000, n)) for n in (40, 9, 120, 66)]
    bounds = [6, 20, 14, 3]
    outputs = []
    for decoder in (stacked, shared):
        generator = BatchGenerator(decoder, max_batch=3)
        outputs.append(generate(generator, prompts, bounds))
        generator.close()
    assert outputs[1] == outputs[0]
    assert [len(tokens) for tokens in outputs[1]] == bounds


@pytest.mark.integration
def test_prompts_prefilled_after_the_cached_prefix_answer_as_prefilled_whole(
    onnx_model_dir: Path, generate: Generate
) -> None:
    engine = AnswerEngine(onnx_model_dir, OrtSettings(), EngineSettings(context_token_budget=200))
    whole = Decoder(onnx_model_dir, OrtSettings(prefix_cache=False))
    whole.cache_prefix(engine.encoder.shared_prefix())
    try:
        prefix = engine.encoder.shared_prefix()
        assert engine.decoder.prefix_length == len(prefix) > 20 and whole.prefix_length == 0
        colours = ["red", "blue"] * 20
        page = "\n".join(f"Section {i}: the lamp in room {i} is {c}." for i, c in enumerate(colours))
        asked = [("Lamps", "What colour is the lamp in room 7?"), ("", "Which room is red?")]
        prompts = [engine.prepare(page, title, question).token_ids for title, question in asked]
        assert all(p[: len(prefix)] == prefix for p in prompts)
        # Not after the prefix: the prefix alone (nothing left to run) and a prompt that differs early.
        prompts += [prefix, [prefix[0], *reversed(prompts[0][1:])]]
        for prompt in prompts:
            cached_logits, cached_kv = engine.decoder.prefill(prompt)
            whole_logits, whole_kv = whole.prefill(prompt)
            np.testing.assert_allclose(cached_logits, whole_logits, atol=1e-4)
            assert {k: v.shape for k, v in cached_kv.items()} == {k: v.shape for k, v in whole_kv.items()}
        # The prefix's cache is only read: the first prompt again gives the same logits.
        again = [engine.decoder.prefill(prompts[0])[0] for _ in range(2)]
        np.testing.assert_array_equal(again[0], again[1])
        outputs = []
        for decoder in (whole, engine.decoder):
            generator = BatchGenerator(decoder, max_batch=4)
            outputs.append(generate(generator, prompts, 10))
            generator.close()
        assert outputs[1] == outputs[0]
    finally:
        engine.close()


@pytest.mark.integration
def test_a_poisoned_request_ends_alone_and_the_healthy_one_beside_it_answers(onnx_model_dir: Path) -> None:
    generator = BatchGenerator(Decoder(onnx_model_dir, OrtSettings()), max_batch=4)
    events: list[tuple[str, object]] = []
    outcomes: dict[str, tuple[str, BaseException | None]] = {}
    first_token, done = threading.Event(), threading.Semaphore(0)

    def finish(name: str) -> Callable[[str, BaseException | None], None]:
        def on_finish(reason: str, error: BaseException | None) -> None:
            outcomes[name] = (reason, error)
            events.append((name, "finish"))
            done.release()

        return on_finish

    def on_healthy_token(token: int) -> None:
        events.append(("healthy", token))
        first_token.set()

    prompt = list(np.random.default_rng(1).integers(100, 40000, 20))
    try:
        generator.submit(
            Sequence(prompt, SamplingParams(max_new_tokens=48), on_healthy_token, finish("healthy"))
        )
        assert first_token.wait(60)
        # A token id far outside the vocabulary: the decoder's prefill fails on it.
        generator.submit(Sequence([10**9], SamplingParams(), lambda t: None, finish("poisoned")))
        assert done.acquire(timeout=120) and done.acquire(timeout=120)
    finally:
        generator.close()
    reason, error = outcomes["poisoned"]
    assert reason == "error" and error is not None
    assert outcomes["healthy"] in (("max_tokens", None), ("eos", None))
    poisoned_at = events.index(("poisoned", "finish"))
    assert any(name == "healthy" for name, _ in events[poisoned_at:]), "the healthy one kept decoding"


@pytest.mark.integration
def test_the_prompt_fits_the_context_whatever_the_title_and_page(onnx_model_dir: Path) -> None:
    engine = AnswerEngine(onnx_model_dir, OrtSettings(), EngineSettings(context_token_budget=10**6))
    try:
        context = engine.decoder.spec.context_length
        page = "\n".join(f"Paragraph {i} says the lamp is number {i} and it is blue." for i in range(3000))
        prepared = engine.prepare(page, "Title " * 100_000, "What colour is the lamp?", 256)
        assert len(prepared.token_ids) + 256 <= context
        assert prepared.passages, "the passages were cut to fit, not all dropped"
        assert engine.encoder.count_tokens(engine.encoder.decode(prepared.token_ids)) > context // 2
        with pytest.raises(PromptTooLong, match="question takes"):
            engine.prepare(page, "", "why " * context, 256)
    finally:
        engine.close()


@pytest.mark.integration
def test_a_page_of_one_long_word_gets_a_prompt_within_the_passage_budget(
    onnx_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = AnswerEngine(onnx_model_dir, OrtSettings(), EngineSettings(context_token_budget=400))
    try:
        question = "What is Kafka?"
        fixed = len(engine.encoder.encode(build_messages("", [], question)))
        # One space-free run of 30,000 characters (a base64 blob, minified code): 7,583 tokens before.
        prepared = engine.prepare("Kafka" + "x" * 30_000 + " Kafka is here", "", question, 64)
        assert prepared.passages
        assert sum(engine.encoder.count_tokens(p.text) for p in prepared.passages) <= 400
        assert len(prepared.token_ids) - fixed <= 400 + 2 * len(prepared.passages)
        # Whatever the retriever chooses, the prompt's passages keep to the budget, not only to the context.
        blob = [Passage(0, "x" * 30_000, 1.0)]  # 7,500 tokens: within the context, over the budget
        monkeypatch.setattr(engine.retriever, "select", lambda *args, **kwargs: list(blob))
        prepared = engine.prepare("any page", "", question, 64)
        assert prepared.passages == [] and len(prepared.token_ids) == fixed
    finally:
        engine.close()


@pytest.mark.integration
def test_candidate_answers_start_with_the_likeliest_first_tokens_and_the_chosen_one_is_given(
    onnx_model_dir: Path, generate: Generate
) -> None:
    decoder = Decoder(onnx_model_dir, OrtSettings())
    rng = np.random.default_rng(4)
    prompts = [list(rng.integers(100, 40000, n)) for n in (25, 60)]
    plain = BatchGenerator(decoder, max_batch=8)
    greedy = generate(plain, prompts, 8)
    plain.close()
    firsts = [np.argsort(-decoder.prefill(p)[0], kind="stable")[:3].tolist() for p in prompts]

    seen: list[list[list[int]]] = []
    given: list[list[int]] = [[] for _ in prompts]
    outcomes: list[tuple[str, BaseException | None]] = []
    done = threading.Semaphore(0)

    def choose(candidates: list[list[int]]) -> int:
        seen.append(candidates)
        if len(seen) == 2:
            raise RuntimeError("a failing choice keeps the greedy answer")
        return 2

    def finish(reason: str, error: BaseException | None) -> None:
        outcomes.append((reason, error))
        done.release()

    # 3 rows a sequence in a batch of 4: the second waits for the first to end.
    generator = BatchGenerator(decoder, max_batch=4)
    try:
        for i, prompt in enumerate(prompts):
            generator.submit(
                Sequence(
                    prompt,
                    SamplingParams(max_new_tokens=8),
                    given[i].append,
                    finish,
                    candidates=3,
                    choose=choose,
                )
            )
        assert done.acquire(timeout=300) and done.acquire(timeout=300)
    finally:
        generator.close()
    assert outcomes == [("max_tokens", None)] * 2
    assert [[c[0] for c in candidates] for candidates in seen] == firsts
    assert [candidates[0] for candidates in seen] == greedy  # row 0 is the greedy answer
    assert given == [seen[0][2], greedy[1]]
    # Each candidate goes on greedily from its first token: as the prompt with that token appended.
    alone = BatchGenerator(decoder, max_batch=1)
    continued = generate(alone, [prompts[0] + [seen[0][1][0]]], 7)[0]
    alone.close()
    assert seen[0][1][1:] == continued


@pytest.mark.integration
def test_candidates_the_passages_stop_saying_end_early_and_cannot_be_chosen(
    onnx_model_dir: Path, generate: Generate
) -> None:
    decoder = Decoder(onnx_model_dir, OrtSettings())
    prompt = list(np.random.default_rng(5).integers(100, 40000, 30))
    plain = BatchGenerator(decoder, max_batch=1)
    greedy = generate(plain, [prompt], 10)[0]
    plain.close()
    followed: list[list[int]] = []
    chosen: list[list[list[int]]] = []
    given: list[int] = []
    finished: list[str] = []
    done = threading.Event()

    def follows(ids: list[int]) -> bool:
        followed.append(list(ids))
        return len(ids) < 3

    def finish(reason: str, error: BaseException | None) -> None:
        finished.append(reason)
        done.set()

    generator = BatchGenerator(decoder, max_batch=4)
    try:
        generator.submit(
            Sequence(
                prompt,
                SamplingParams(max_new_tokens=10),
                given.append,
                finish,
                candidates=3,
                choose=lambda answers: chosen.append(answers) or 1,
                follows=follows,
            )
        )
        assert done.wait(300)
    finally:
        generator.close()
    # Rows 1 and 2 stopped at 3 tokens; the greedy row ran on unasked, and stood alone.
    assert given == greedy and finished == ["max_tokens"] and not chosen
    assert max(len(ids) for ids in followed) == 3 and greedy[:3] not in followed


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads Linux's /proc")
def test_a_closed_engine_gives_its_memory_back_to_the_system(onnx_model_dir: Path) -> None:
    release_memory()  # what earlier tests' models left in this process's heap
    before = _resident_mb()
    engine = AnswerEngine(onnx_model_dir, OrtSettings(), EngineSettings(context_token_budget=200))
    engine.answer("The lamp in room 7 is red. " * 60, "Lamps", "What colour is the lamp?", SamplingParams())
    loaded = _resident_mb()
    engine.close(30.0)
    after = _resident_mb()
    # The model's sessions took hundreds of MB; at least half of what loading took is given back.
    assert loaded - before > 200, (before, loaded)
    assert after - before < (loaded - before) / 2, (before, loaded, after)
    with pytest.raises(AttributeError):
        engine.decoder.prefill([1, 2, 3])
