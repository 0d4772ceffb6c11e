"""Inference benchmark: time to first token, decode speed, peak memory and answer quality of
(a) transformers + PyTorch eager, (b) our ONNX Runtime path in fp32, (c) our path with int4
weights (re-quantized), (d) our path with the GGUF's own blocks (Q4_1, Q5_0, Q8_0, Q4_K, Q6_K),
with fp32 activations (`gguf`) and with activations quantized to 8 bits as llama.cpp does
(`gguf_a8`), (e) llama.cpp on the original GGUF; then throughput of the running gRPC service at several
concurrencies. On a GPU machine (onnxruntime-gpu) the variants `onnx-fp32-cuda` and
`onnx-fp16-cuda` run our path on the CUDA execution provider, with the KV cache bound to the
device (`-unbound`, e.g. `onnx-fp16-cuda-unbound`, round-trips it through host memory every step
instead), and `--service-variant` picks the model the service is measured with (several, comma-separated,
are measured one after the other). A `-stacked` variant (e.g. `onnx-fp32-stacked`) decodes with the
cache stacked and copied into a new present every step instead of shared in place
(`ORT__SHARED_CACHE=false`); a `-noprefix` variant prefills every prompt from its start instead of
after the prefix all prompts share (`ORT__PREFIX_CACHE=false`); a `-nodrafts` variant decodes one
token a step instead of checking tokens drafted from the prompt (`ORT__DRAFTS=false`); a `-greedy`
service variant answers with one candidate instead of choosing among `LIMITS__ANSWER_CANDIDATES`
(docs/quality.md). Suffixes combine (`onnx-fp32-nodrafts-greedy`). `llamacpp-lookup` is llama.cpp
with llama-cpp-python's own drafts from the prompt (LlamaPromptLookupDecoding).
`--batches 1,4,16` adds each ONNX variant's decode speed with that many sequences decoding together.

    uv run python bench/inference.py [--split gate] [--questions 50] [--new-tokens 48] [--json out.json]
    python bench/inference.py --variants onnx-fp16-cuda-unbound,onnx-fp16-cuda --batches 1,4,16 \
        --service-variant onnx-fp16-cuda

Every variant runs in its own process (so peak memory is its own) on the same prompts: real page
passages of about 400 tokens and a question from a split of the bundled dataset (`gate` by
default), greedy, batch 1, after one warm-up answer. Tokens are compared with onnx-fp32's (eager's
when fp32 is not run); accuracy counts the questions that have reference answers. llama.cpp is
measured when `--llama-python` names a Python that has llama-cpp-python (it compiles from source:
see docs/inference.md, "Benchmark"). A prompt whose answer fails is counted in `errors` (the row is
marked FAILED; its timings and accuracy are over the rest); a failed warm-up or batched decode fails
the variant. The reference row shows `ref` (it is not compared with itself). A service variant is
measured only on the execution provider it names (its `flywheel_inference_model_info` metric says).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("eager", "onnx-fp32-nodrafts", "onnx-fp32", "onnx-int4", "onnx-gguf", "onnx-gguf_a8", "llamacpp")


# Prompts and scoring (parent process)


def build_prompts(dataset: Path, split: str, n: int, onnx_dir: Path) -> list[dict[str, Any]]:
    from flywheel_eval.dataset import load_dataset
    from flywheel_model.prompt import PromptEncoder, build_messages
    from flywheel_model.retrieval import Retriever, html_to_text

    data = load_dataset(dataset)
    encoder = PromptEncoder(onnx_dir)
    retriever = Retriever(encoder.count_tokens)
    items = data.split(split)[:n]
    prompts = []
    for item in items:
        text, title = html_to_text(data.pages[item.page])
        passages = retriever.select(text, item.question, token_budget=400)
        ids = encoder.encode(build_messages(title, passages, item.question))
        prompts.append(
            {
                "id": item.id,
                "ids": ids,
                "answers": list(item.answers),
                "page": text,
                "title": title,
                "question": item.question,
            }
        )
    return prompts


def run_variant(
    variant: str, prompts_file: Path, args: argparse.Namespace, python: str
) -> dict[str, Any] | None:
    out = prompts_file.with_name(f"{variant}.out.json")  # in the caller's temporary folder
    cmd = [
        python,
        __file__,
        "--worker",
        variant,
        "--prompts",
        str(prompts_file),
        "--out",
        str(out),
        "--new-tokens",
        str(args.new_tokens),
        "--threads",
        str(args.threads),
        "--gguf",
        args.gguf,
        "--batches",
        args.batches,
        *(["--base-model", args.base_model] if args.base_model else []),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "bench"), os.environ.get("PYTHONPATH")])),
    }
    started = time.perf_counter()
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(f"{variant}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
            return None
        data = json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
    errors = sum("error" in r for r in data["results"])
    if errors:
        print(
            f"{variant}: {errors} of {len(data['results'])} answers failed\n{result.stderr[-2000:]}",
            file=sys.stderr,
        )
    data["wall_s"] = time.perf_counter() - started
    return dict(data)


# Workers (one process per variant)


def _timed_decode(step_first: Any, step_next: Any, new_tokens: int, eos: set[int]) -> dict[str, Any]:
    started = time.perf_counter()
    token = step_first()
    first = time.perf_counter()
    tokens = [token]
    while len(tokens) < new_tokens and token not in eos:
        token = step_next(token)
        tokens.append(token)
    done = time.perf_counter()
    decoded = len(tokens) - 1
    return {
        "tokens": [t for t in tokens if t not in eos],
        "ttft_s": first - started,
        "decode_tok_s": decoded / (done - first) if decoded else 0.0,
    }


def _stamped(started: float, tokens: list[int], stamps: list[float]) -> dict[str, Any]:
    """An answer's tokens, time to first token and decode speed, from the time each token came."""
    decoded = len(stamps) - 1
    return {
        "tokens": tokens,
        "ttft_s": stamps[0] - started if stamps else 0.0,
        "decode_tok_s": decoded / (stamps[-1] - stamps[0]) if decoded > 0 else 0.0,
    }


def worker_eager(
    prompts: list[dict[str, Any]], new_tokens: int, threads: int, base_model: str | None
) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from flywheel_model.prepare import ExportOptions, default_model_dir, resolve_source

    torch.set_num_threads(threads)
    model_dir = default_model_dir(resolve_source(base_model), ExportOptions()) / "hf"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = {int(model.config.eos_token_id)}
    results = []
    for prompt in [prompts[0], *prompts]:
        cache = DynamicCache()

        def first(ids: list[int] = prompt["ids"], cache: Any = cache) -> int:
            with torch.no_grad():
                out = model(torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
            return int(out.logits[0, -1].argmax())

        def step(token: int, cache: Any = cache) -> int:
            with torch.no_grad():
                out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            return int(out.logits[0, -1].argmax())

        results.append(_timed_decode(first, step, new_tokens, eos))
    return results[1:]


SUFFIXES = ("-unbound", "-stacked", "-noprefix", "-nodrafts", "-greedy")


def variant_suffixes(variant: str) -> tuple[str, set[str]]:
    """`onnx-fp32-nodrafts-greedy` -> ("onnx-fp32", {"-nodrafts", "-greedy"})."""
    found: set[str] = set()
    while suffix := next((s for s in SUFFIXES if variant.endswith(s)), None):
        variant = variant.removesuffix(suffix)
        found.add(suffix)
    return variant, found


def onnx_variant(variant: str) -> tuple[str, str]:
    """`onnx-<precision>[-<provider>][-unbound|-stacked|-noprefix|-nodrafts|-greedy…]` -> (precision,
    provider)."""
    parts = variant_suffixes(variant)[0].split("-")
    return parts[1], parts[2] if len(parts) > 2 else "cpu"


def _error_text(reason: str, error: BaseException | None) -> str:
    """What a sequence that ended in an error reports (an on_token failure ends one without one)."""
    return f"{type(error).__name__}: {error}" if error is not None else f"finished with reason {reason!r}"


def batch_decode(generator: Any, prompts: list[dict[str, Any]], batch: int, new_tokens: int) -> float:
    """Decode tok/s of `batch` sequences decoding together (none stops early): tokens after the last
    one's first token, over the time from then to the last token (prefills, one at a time, are not
    counted)."""
    import threading

    from flywheel_model.generation import SamplingParams, Sequence

    stamps: list[list[float]] = [[] for _ in range(batch)]
    errors: list[str] = []
    done = threading.Semaphore(0)

    def on_finish(reason: str, error: BaseException | None) -> None:
        if error is not None or reason == "error":
            errors.append(_error_text(reason, error))
        done.release()

    for i in range(batch):
        generator.submit(
            Sequence(
                prompts[i % len(prompts)]["ids"],
                SamplingParams(max_new_tokens=new_tokens),
                lambda token, row=stamps[i]: row.append(time.perf_counter()),
                on_finish,
            )
        )
    for _ in range(batch):
        done.acquire()
    if errors:
        # A speed measured over failed rows is not a speed: the whole variant fails, with the reason.
        raise RuntimeError(f"batch {batch}: {len(errors)} of {batch} sequences failed: {errors[0]}")
    start = max(row[0] for row in stamps if row)
    end = max(row[-1] for row in stamps if row)
    tokens = sum(1 for row in stamps for t in row if t > start)
    return tokens / (end - start) if end > start else 0.0


def worker_onnx(
    prompts: list[dict[str, Any]],
    prefix: list[int],
    new_tokens: int,
    threads: int,
    variant: str,
    batches: list[int],
    base_model: str | None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    import threading

    from flywheel_model.generation import BatchGenerator, SamplingParams, Sequence
    from flywheel_model.prepare import ExportOptions, default_model_dir, resolve_source
    from flywheel_model.runtime import Decoder, OrtSettings

    precision, provider = onnx_variant(variant)
    suffixes = variant_suffixes(variant)[1]
    onnx_dir = default_model_dir(resolve_source(base_model), ExportOptions(precision, provider)) / "onnx"
    decoder = Decoder(
        onnx_dir,
        OrtSettings(
            provider=provider,
            intra_op_threads=threads,
            io_binding="off" if "-unbound" in suffixes else "auto",
            shared_cache="-stacked" not in suffixes,
            prefix_cache="-noprefix" not in suffixes,
            drafts="-nodrafts" not in suffixes,
        ),
    )
    decoder.cache_prefix(prefix)  # as the service's engine does (the tokenizer stays in the parent)
    if decoder.provider != {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[provider]:
        raise RuntimeError(f"{variant}: the session runs on {decoder.provider}")
    generator = BatchGenerator(decoder, max_batch=1)
    results = []
    for prompt in [prompts[0], *prompts]:
        stamps: list[float] = []
        tokens: list[int] = []
        failed: list[str] = []
        done = threading.Event()

        def on_token(token: int, stamps: list[float] = stamps, tokens: list[int] = tokens) -> None:
            stamps.append(time.perf_counter())
            tokens.append(token)

        def on_finish(
            reason: str, error: BaseException | None, failed: list[str] = failed, done: Any = done
        ) -> None:
            if error is not None or reason == "error":
                failed.append(_error_text(reason, error))
            done.set()

        started = time.perf_counter()
        generator.submit(
            Sequence(
                prompt["ids"],
                SamplingParams(max_new_tokens=new_tokens),
                on_token,
                on_finish,
            )
        )
        done.wait()
        # A failed answer is kept as a failure (its partial tokens are no answer to compare).
        results.append({"error": failed[0], "tokens": []} if failed else _stamped(started, tokens, stamps))
    generator.close()
    if "error" in results[0]:
        raise RuntimeError(f"{variant}: the warm-up answer failed: {results[0]['error']}")
    by_batch = {}
    for batch in batches:
        # No end token: every row decodes all its tokens, so the batch stays `batch` rows wide.
        generator = BatchGenerator(decoder, max_batch=batch, stop_token_ids=(-1,))
        by_batch[str(batch)] = batch_decode(generator, prompts, batch, new_tokens)
        generator.close()
    return results[1:], by_batch


def gpu_memory_mb() -> float | None:
    """Memory in use on the GPU (this worker is the only process on it), or None without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return float(out.split()[0])


def worker_llamacpp(
    prompts: list[dict[str, Any]], new_tokens: int, threads: int, gguf: str
) -> list[dict[str, Any]]:
    from llama_cpp import Llama  # type: ignore[import-not-found]

    llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_batch=512, verbose=False, logits_all=False)
    eos = {llm.token_eos()}
    results = []
    for prompt in [prompts[0], *prompts]:
        llm.reset()

        def first(ids: list[int] = prompt["ids"]) -> int:
            llm.eval(ids)
            return int(llm.sample(temp=0.0))

        def step(token: int) -> int:
            llm.eval([token])
            return int(llm.sample(temp=0.0))

        results.append(_timed_decode(first, step, new_tokens, eos))
    return results[1:]


def worker_llamacpp_lookup(
    prompts: list[dict[str, Any]], new_tokens: int, threads: int, gguf: str
) -> list[dict[str, Any]]:
    """llama.cpp drafting from the prompt as llama-cpp-python does it. Its drafts need every
    position's logits, the prompt's too, which costs its time to first token (and `logits_all` must
    be given: without it llama-cpp-python 0.3 keeps the logits of one batch, and a prompt longer than
    one fails)."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding  # type: ignore[import-not-found]

    llm = Llama(
        model_path=gguf,
        n_ctx=2048,
        n_threads=threads,
        n_batch=512,
        verbose=False,
        logits_all=True,
        draft_model=LlamaPromptLookupDecoding(max_ngram_size=3, num_pred_tokens=4),
    )
    eos = {llm.token_eos()}
    results = []
    for prompt in [prompts[0], *prompts]:
        started = time.perf_counter()
        stamps, tokens = [], []
        for token in llm.generate(prompt["ids"], temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            tokens.append(int(token))
            if token in eos or len(tokens) >= new_tokens:
                break
        results.append(_stamped(started, [t for t in tokens if t not in eos], stamps))
    return results[1:]


def worker_main(args: argparse.Namespace) -> None:
    shared = json.loads(Path(args.prompts).read_text())
    prompts = shared["prompts"]
    by_batch: dict[str, float] = {}
    if args.worker == "eager":
        results = worker_eager(prompts, args.new_tokens, args.threads, args.base_model)
    elif args.worker == "llamacpp":
        results = worker_llamacpp(prompts, args.new_tokens, args.threads, args.gguf)
    elif args.worker == "llamacpp-lookup":
        results = worker_llamacpp_lookup(prompts, args.new_tokens, args.threads, args.gguf)
    else:
        batches = [int(b) for b in args.batches.split(",") if b]
        results, by_batch = worker_onnx(
            prompts, shared["prefix"], args.new_tokens, args.threads, args.worker, batches, args.base_model
        )
    # VmHWM rather than ru_maxrss: the latter carries the parent's peak across exec.
    status = Path("/proc/self/status").read_text()
    peak_mb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024
    gpu_mb = gpu_memory_mb() if "cuda" in args.worker else None
    for i, r in enumerate(results):
        if "error" in r:
            print(f"{args.worker}: prompt {i} failed: {r['error']}", file=sys.stderr)
    Path(args.out).write_text(
        json.dumps(
            {"results": results, "peak_rss_mb": peak_mb, "gpu_mb": gpu_mb, "batch_decode_tok_s": by_batch}
        )
    )


# Throughput against the running service


def throughput(
    variant: str,
    onnx_dir: Path,
    prompts: list[dict[str, Any]],
    levels: list[int],
    new_tokens: int,
    requests_per_level: int,
) -> list[dict[str, Any]]:
    """Starts the inference service on a model and measures it at each concurrency."""
    from flywheel_cli.local.kafka_broker import free_port

    port, metrics_port = free_port(), free_port()
    suffixes = variant_suffixes(variant)[1]
    env = {
        **os.environ,
        "FLYWHEEL_INFERENCE_MODEL_DIR": str(onnx_dir),
        "FLYWHEEL_INFERENCE_ORT__PROVIDER": onnx_variant(variant)[1],
        "FLYWHEEL_INFERENCE_ORT__SHARED_CACHE": str("-stacked" not in suffixes).lower(),
        "FLYWHEEL_INFERENCE_ORT__PREFIX_CACHE": str("-noprefix" not in suffixes).lower(),
        "FLYWHEEL_INFERENCE_ORT__DRAFTS": str("-nodrafts" not in suffixes).lower(),
        **({"FLYWHEEL_INFERENCE_LIMITS__ANSWER_CANDIDATES": "1"} if "-greedy" in suffixes else {}),
        "FLYWHEEL_INFERENCE_KAFKA_ENABLED": "false",
        "FLYWHEEL_INFERENCE_GRPC__PORT": str(port),
        # The metrics endpoint says which execution provider the loaded model really runs on.
        "FLYWHEEL_INFERENCE_METRICS__HOST": "127.0.0.1",
        "FLYWHEEL_INFERENCE_METRICS__PORT": str(metrics_port),
    }
    with tempfile.NamedTemporaryFile(prefix="bench-inference-service-", suffix=".log") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "flywheel_inference"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            return asyncio.run(
                _measure(port, metrics_port, variant, prompts, levels, new_tokens, requests_per_level)
            )
        except WrongProvider:
            raise
        except Exception:
            text = Path(log.name).read_text()
            first = max(0, text.find("Traceback") - 1000)
            print(f"the service failed; its log from the first error:\n{text[first : first + 6000]}")
            raise
        finally:
            server.terminate()
            server.wait(30)


class WrongProvider(RuntimeError):
    """The service loaded the model on another execution provider than the variant names."""


def served_provider(metrics_text: str) -> str | None:
    """The execution provider of the production model in the service's /metrics text (None if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        if family.name == "flywheel_inference_model_info":
            for sample in family.samples:
                if sample.labels.get("role") == "production" and sample.value == 1:
                    return str(sample.labels["provider"])
    return None


def check_provider(variant: str, metrics_port: int) -> str:
    """The provider the service loaded the model on; raises when it is not the variant's."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as response:
        provider = served_provider(response.read().decode())
    wanted = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[onnx_variant(variant)[1]]
    if provider != wanted:
        # choose_providers falls back to the CPU with a warning: such a row would be a CPU row.
        raise WrongProvider(f"{variant}: the service runs on {provider}, not {wanted}")
    return provider


async def _measure(
    port: int,
    metrics_port: int,
    variant: str,
    prompts: list[dict[str, Any]],
    levels: list[int],
    new_tokens: int,
    requests_per_level: int,
) -> list[dict[str, Any]]:
    import grpc

    from flywheel_proto.flywheel.inference.v1 import inference_pb2, inference_pb2_grpc

    def make(i: int) -> inference_pb2.AnswerRequest:
        p = prompts[i % len(prompts)]
        return inference_pb2.AnswerRequest(
            page=inference_pb2.Page(text=p["page"], title=p["title"]),
            question=p["question"],
            session_id=f"s{i}",
            options=inference_pb2.GenerationOptions(max_new_tokens=new_tokens),
        )

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for attempt in range(600):  # until the model is loaded; this answer is also the warm-up
            try:
                await stub.Answer(make(0), timeout=60)
                break
            except grpc.aio.AioRpcError:
                if attempt == 599:
                    raise
                await asyncio.sleep(0.5)
        provider = check_provider(variant, metrics_port)

        async def client(queue: list[int], latencies: list[float], tokens: list[int]) -> None:
            while queue:
                i = queue.pop()
                t = time.perf_counter()
                response = await stub.Answer(make(i), timeout=600)
                latencies.append(time.perf_counter() - t)
                tokens.append(response.tokens.completion_tokens)

        rows = []
        for level in levels:
            queue = list(range(max(requests_per_level, level)))
            latencies: list[float] = []
            tokens: list[int] = []
            started = time.perf_counter()
            await asyncio.gather(*(client(queue, latencies, tokens) for _ in range(level)))
            elapsed = time.perf_counter() - started
            latencies.sort()
            rows.append(
                {
                    "concurrency": level,
                    "provider": provider,
                    "answers": len(latencies),
                    "answers_per_s": len(latencies) / elapsed,
                    "tokens_per_s": sum(tokens) / elapsed,
                    "p50_s": statistics.median(latencies),
                    "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
                }
            )
    return rows


# Report


def tokens_of(data: dict[str, Any]) -> list[list[int] | None]:
    """A variant's tokens per prompt, None where its answer failed."""
    return [None if "error" in r else r["tokens"] for r in data["results"]]


def equal_tokens(data: dict[str, Any], reference: list[list[int] | None]) -> int:
    """Prompts on which a variant's tokens are the reference's (a failed answer on either side is not)."""
    mine = tokens_of(data)
    return sum(a is not None and a == b for a, b in zip(mine, reference, strict=True))


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(
    variant: str,
    data: dict[str, Any],
    reference: list[list[int] | None] | None,
    is_reference: bool,
    prompts: list[dict[str, Any]],
    encoder: Any,
) -> dict[str, Any]:
    """A variant's row; timings and accuracy are over its answers that did not fail."""
    from flywheel_eval.metrics import contains

    results = data["results"]
    ok = [(r, p) for r, p in zip(results, prompts, strict=True) if "error" not in r]
    texts = [None if "error" in r else encoder.decode(r["tokens"]).strip() for r in results]
    equal = equal_tokens(data, reference) if reference is not None and not is_reference else None
    answered = [
        (t, p["answers"]) for t, p in zip(texts, prompts, strict=True) if p["answers"] and t is not None
    ]
    return {
        "variant": variant,
        "errors": len(results) - len(ok),
        "error_messages": [r["error"] for r in results if "error" in r],
        "ttft_s": _median([r["ttft_s"] for r, _ in ok]),
        "decode_tok_s": _median([r["decode_tok_s"] for r, _ in ok]),
        "peak_rss_mb": data["peak_rss_mb"],
        "gpu_mb": data.get("gpu_mb"),
        "batch_decode_tok_s": data.get("batch_decode_tok_s", {}),
        # None for the reference itself: its tokens equal their own by construction.
        "reference": is_reference,
        "tokens_equal_to_reference": equal,
        "accuracy": sum(contains(t, a) for t, a in answered) / len(answered) if answered else float("nan"),
        "answers": texts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--split", default="gate", help="the dataset split the questions come from")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--dataset", default=str(ROOT / "datasets/python-faq"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--llama-python", default=str(ROOT / ".cache/bench/llamacpp-venv/bin/python"))
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--batches", default="", help="decode speed at these batch sizes, e.g. 1,4,16")
    parser.add_argument("--service-variant", default="onnx-fp32", help="the model the service serves")
    parser.add_argument("--requests", type=int, default=16, help="answers per concurrency level")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--base-model",
        help="the ONNX variants' model: smollm2-135m (default), gemma3-270m, a .gguf or a HF folder",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return

    from flywheel_model.prepare import ExportOptions, ensure_prepared, resolve_source, smollm2_gguf

    source = resolve_source(args.base_model)
    args.gguf = str(source or smollm2_gguf())
    variants = args.variants.split(",")
    service_variants = [v for v in args.service_variant.split(",") if v]
    # The fp32 CPU model always (prompts, eager's weights), and each ONNX variant's; each made once.
    exports = {("fp32", "cpu")} | {
        onnx_variant(v) for v in {*variants, *service_variants} if v.startswith("onnx-")
    }
    model_dirs = {key: ensure_prepared(source, ExportOptions(*key), None, force=False) for key in exports}
    fp32_dir = model_dirs[("fp32", "cpu")]
    prompts = build_prompts(Path(args.dataset), args.split, args.questions, fp32_dir / "onnx")
    from flywheel_model.prompt import PromptEncoder

    encoder = PromptEncoder(fp32_dir / "onnx")
    sizes = [len(p["ids"]) for p in prompts]
    answered = sum(bool(p["answers"]) for p in prompts)
    print(
        f"{len(prompts)} {args.split} prompts ({answered} with reference answers) of "
        f"{min(sizes)}-{max(sizes)} tokens, {args.new_tokens} new tokens"
    )
    measured: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps({"prompts": prompts, "prefix": encoder.shared_prefix()}))
        for variant in variants:
            python = sys.executable
            if variant.startswith("llamacpp"):
                if not Path(args.llama_python).exists():
                    print(
                        "llamacpp: skipped (no --llama-python with llama-cpp-python; see docs/inference.md)"
                    )
                    continue
                python = args.llama_python
            data = run_variant(variant, prompts_file, args, python)
            if data is not None:
                measured[variant] = data
    reference_variant = next((v for v in ("onnx-fp32", "eager") if v in measured), None)
    reference = tokens_of(measured[reference_variant]) if reference_variant else None
    rows = [
        summarise(v, data, reference, v == reference_variant, prompts, encoder)
        for v, data in measured.items()
    ]
    # The reference's own fidelity: onnx-fp32's tokens against eager PyTorch's, when both ran.
    fp32_equal_to_eager = (
        equal_tokens(measured["onnx-fp32"], tokens_of(measured["eager"]))
        if reference_variant == "onnx-fp32" and "eager" in measured
        else None
    )
    for r in rows:
        r["tokens_equal_to_eager"] = fp32_equal_to_eager if r["variant"] == "onnx-fp32" else None
    base = {r["variant"]: r for r in rows}

    def ratio(r: dict[str, Any], key: str, to: str) -> float:
        return float(r[key] / base[to][key]) if to in base and base[to][key] else float("nan")

    print(
        f"\n{'variant':24} {'TTFT s':>7} {'decode tok/s':>12} {'x fp32':>7} {'x eager':>8} "
        f"{'x llama.cpp':>11} {'TTFT x llama.cpp':>16} {'peak MB':>8} {'= ' + str(reference_variant):>12} "
        f"{'accuracy':>8} {'errors':>6}"
    )
    for r in rows:
        r["x_fp32"], r["x_eager"] = ratio(r, "decode_tok_s", "onnx-fp32"), ratio(r, "decode_tok_s", "eager")
        r["x_llamacpp"], r["ttft_x_llamacpp"] = (
            ratio(r, "decode_tok_s", "llamacpp"),
            ratio(r, "ttft_s", "llamacpp"),
        )
        if r["reference"]:
            equal = "ref"
        elif r["tokens_equal_to_reference"] is not None:
            equal = f"{r['tokens_equal_to_reference']}/{len(prompts)}"
        else:
            equal = "-"
        # A row with failed answers is marked: its timings and accuracy cover only the rest.
        name = f"{r['variant']} FAILED" if r["errors"] else r["variant"]
        print(
            f"{name:24} {r['ttft_s']:7.2f} {r['decode_tok_s']:12.1f} {r['x_fp32']:7.2f} "
            f"{r['x_eager']:8.2f} {r['x_llamacpp']:11.2f} {r['ttft_x_llamacpp']:16.2f} "
            f"{r['peak_rss_mb']:8.0f} {equal:>12} {r['accuracy']:8.0%} {r['errors']:6d}"
        )
    if fp32_equal_to_eager is not None:
        print(
            f"onnx-fp32 (the reference): tokens equal to eager PyTorch's on "
            f"{fp32_equal_to_eager}/{len(prompts)}"
        )
    for r in rows:
        if r["errors"]:
            print(
                f"{r['variant']}: {r['errors']} of {len(prompts)} answers failed (first: "
                f"{r['error_messages'][0]}); its timings and accuracy are over the others only"
            )
    batch_rows = [r for r in rows if r["batch_decode_tok_s"]]
    if batch_rows:
        batch_sizes = list(batch_rows[0]["batch_decode_tok_s"])
        columns = " ".join(f"{'batch ' + b + ' tok/s':>15}" for b in batch_sizes)
        print(f"\n{'variant':24} {columns} {'GPU MB':>7}")
        for r in batch_rows:
            speeds = " ".join(f"{r['batch_decode_tok_s'][b]:15.1f}" for b in batch_sizes)
            print(f"{r['variant']:24} {speeds} {r['gpu_mb'] if r['gpu_mb'] is not None else '-':>7}")
    levels = [int(c) for c in args.concurrency.split(",") if c]
    service_rows = []
    skipped: dict[str, str] = {}
    for variant in service_variants if levels else []:
        try:
            measured_rows = throughput(
                variant,
                model_dirs[onnx_variant(variant)] / "onnx",
                prompts,
                levels,
                args.new_tokens,
                args.requests,
            )
        except WrongProvider as exc:
            # A CUDA variant the service fell back to the CPU for would be a CPU row under its name.
            print(f"service {exc}: not measured", file=sys.stderr)
            skipped[variant] = str(exc)
            continue
        service_rows += [{"variant": variant, **row} for row in measured_rows]
    if service_rows:
        header = (
            f"{'service':24} {'concurrency':>11} {'answers':>8} {'answers/s':>10} {'tokens/s':>9} "
            f"{'p50 s':>7} {'p95 s':>7} {'provider':>21}"
        )
        print("\n" + header)
        for row in service_rows:
            rate = f"{row['answers_per_s']:10.2f} {row['tokens_per_s']:9.1f}"
            print(
                f"{row['variant']:24} {row['concurrency']:11d} {row['answers']:8d} {rate} "
                f"{row['p50_s']:7.2f} {row['p95_s']:7.2f} {row['provider']:>21}"
            )
        for variant in service_variants:
            if variant in skipped:
                continue
            mine = [row for row in service_rows if row["variant"] == variant]
            ratio = mine[-1]["answers_per_s"] / mine[0]["answers_per_s"]
            print(f"{variant}: throughput at concurrency {levels[-1]} / at {levels[0]}: {ratio:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "variants": rows,
                    "service": service_rows,
                    "service_variants_not_measured": skipped,
                    "questions": len(prompts),
                    "split": args.split,
                    "answered_questions": answered,
                    "tokens_compared_with": reference_variant,
                    "new_tokens": args.new_tokens,
                    "threads": args.threads,
                    "service_variants": service_variants,
                },
                indent=2,
            )
        )
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
