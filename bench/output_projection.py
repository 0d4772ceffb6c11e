"""Output projection benchmark: how far the 4-bit approximation ranks fp32's likeliest tokens, and
what the projection costs each way.

    uv run python bench/output_projection.py [--base-model gemma3-270m] [--datasets python-faq,...]
                                             [--questions 50] [--steps 24] [--rescored 64]
                                             [--json bench/results/output_projection.json]

The served fp32 export reads its output projection at 4 bits and computes only the approximation's
`--rescored` likeliest tokens' logits exactly (`flywheel_model.output_projection`). That gives
fp32's greedy token as long as fp32's likeliest token is among them. This bench decodes the `gate`
prompts of each dataset greedily with the prepared model's PyTorch weights (`hf/`), takes the final
hidden state of every step, and reports where the approximation ranks fp32's likeliest token and
the worst of fp32's four likeliest (the candidate answers' first tokens), and how often the top
`--rescored` would have missed. Then it times the projection alone (fp32 MatMul, the
approximation, the approximation with the top `--rescored` exact) for 1, 2 and 16 rows, with ONNX
Runtime on the machine's threads.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def hidden_states(
    model: Any, model_dir: Path, datasets: list[str], questions: int, steps: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """The final hidden state of each greedy step over the datasets' gate prompts, the model's own
    likeliest token at each, and the number of prompts."""
    import torch

    from flywheel_eval.dataset import load_dataset
    from flywheel_model.engine import AnswerEngine, EngineSettings
    from flywheel_model.retrieval import html_to_text
    from flywheel_model.runtime import OrtSettings

    engine = AnswerEngine(model_dir / "onnx", OrtSettings(), EngineSettings())
    prompts = []
    for name in datasets:
        data = load_dataset(ROOT / "datasets" / name)
        for item in data.split("gate")[:questions]:
            text, title = html_to_text(data.pages[item.page])
            prompts.append(engine.prepare(text, title, item.question, steps).token_ids)
    engine.close()
    states, chosen = [], []
    with torch.no_grad():
        for ids in prompts:
            out = model(torch.tensor([ids]), use_cache=True, output_hidden_states=True)
            for _ in range(steps):
                token = int(out.logits[0, -1].argmax())
                states.append(out.hidden_states[-1][0, -1].numpy().copy())
                chosen.append(token)
                out = model(
                    torch.tensor([[token]]),
                    past_key_values=out.past_key_values,
                    use_cache=True,
                    output_hidden_states=True,
                )
    return np.stack(states), np.array(chosen), len(prompts)


def projection_model(table: np.ndarray, rescored: int | None) -> Any:
    """x [rows, 1, hidden] -> logits: the fp32 MatMul (`rescored` None) or the served rewrite."""
    from onnx import TensorProto, helper, numpy_helper

    from flywheel_model.output_projection import rescore_output_projection

    vocabulary, hidden = table.shape
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["embedded"]),
            helper.make_node("MatMul", ["x", "weight"], ["logits"]),
        ],
        "projection",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 1, hidden]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", 1, vocabulary]),
            helper.make_tensor_value_info("embedded", TensorProto.FLOAT, [1, 1, hidden]),
        ],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.ascontiguousarray(table.T), "weight"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    if rescored is not None:
        rescore_output_projection(model, rescored)
    return model


def approximate(table: np.ndarray, states: np.ndarray, rescored: int) -> Iterator[np.ndarray]:
    """The 4-bit approximation of every logit of each state: the served graph's own tensor."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = projection_model(table, rescored)
    model.graph.output.append(helper.make_tensor_value_info("logits/approximate", TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.zeros((1, 1), np.int64)
    # One row at a time, as a decode step of one sequence runs it.
    for state in states:
        yield session.run(["logits/approximate"], {"x": state[None, None], "ids": ids})[0][0, 0]


def ranks(table: np.ndarray, states: np.ndarray, chosen: np.ndarray, rescored: int) -> dict[str, Any]:
    """Where the approximation ranks fp32's likeliest token and its four likeliest, step by step
    (a token's rank: how many tokens the approximation puts above it)."""
    approx = approximate(table, states, rescored)
    first_rank, top4_rank, best, error = [], [], [], 0.0
    for state, row in zip(states, approx, strict=True):
        exact = table @ state
        top4 = np.argpartition(-exact, 4)[:4]
        ranks_of = [int(np.sum(row > row[token])) for token in top4]
        first = int(top4[np.argmax(exact[top4])])
        best.append(first)
        first_rank.append(int(np.sum(row > row[first])))
        top4_rank.append(max(ranks_of))
        error = max(error, float(np.abs(row - exact).max()))
    first_ranks, worst = np.array(first_rank), np.array(top4_rank)
    return {
        "steps": len(states),
        "exact_argmax_is_the_models": float(np.mean(np.array(best) == chosen)),
        "approximation_first_is_fp32_first": float(np.mean(first_ranks == 0)),
        "fp32_first_rank_max": int(first_ranks.max()),
        "fp32_first_rank_p99": float(np.percentile(first_ranks, 99)),
        "fp32_top4_worst_rank_max": int(worst.max()),
        "fp32_top4_worst_rank_p99": float(np.percentile(worst, 99)),
        "missed_with_rescored": int(np.sum(first_ranks >= rescored)),
        "max_abs_error": error,
    }


def timings(table: np.ndarray, rescored: int, threads: int, seconds: float) -> list[dict[str, Any]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    variants = {
        "fp32": projection_model(table, None),
        f"4-bit, top {rescored} exact": projection_model(table, rescored),
    }
    sessions = {
        name: ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for name, model in variants.items()
    }
    rng = np.random.default_rng(0)
    rows = []
    for count in (1, 2, 16):
        feeds = {
            "x": rng.standard_normal((count, 1, table.shape[1])).astype(np.float32),
            "ids": np.zeros((1, 1), np.int64),
        }
        reference = None
        for name, session in sessions.items():
            session.run(None, feeds)
            runs, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                logits = session.run(None, feeds)[0]
                runs += 1
            elapsed = (time.perf_counter() - start) / runs
            reference = logits if reference is None else reference
            rows.append(
                {
                    "rows": count,
                    "variant": name,
                    "ms": elapsed * 1000,
                    "argmax_equal": float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-model", default="gemma3-270m", help="a --source of flywheel model prepare")
    parser.add_argument("--datasets", default="python-faq,postgresql-docs,bash-manual")
    parser.add_argument("--questions", type=int, default=50, help="gate questions per dataset")
    parser.add_argument("--steps", type=int, default=24, help="greedy steps per prompt")
    parser.add_argument("--rescored", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0, help="per timing")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from flywheel_model.prepare import ExportOptions, ensure_prepared, resolve_source

    torch.set_num_threads(args.threads)
    model_dir = ensure_prepared(resolve_source(args.base_model), ExportOptions(), None, force=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir / "hf", dtype=torch.float32).eval()
    # The `[vocabulary, hidden]` table the served graph's output projection rescores from.
    table = model.get_output_embeddings().weight.detach().numpy().astype(np.float32)
    states, chosen, prompts = hidden_states(
        model, model_dir, args.datasets.split(","), args.questions, args.steps
    )
    rank = {"prompts": prompts, **ranks(table, states, chosen, args.rescored)}
    cost = timings(table, args.rescored, args.threads, args.seconds)

    print(f"{args.base_model}: {prompts} gate prompts, {rank['steps']} greedy steps")
    print(f"  the table's likeliest token is the model's own: {rank['exact_argmax_is_the_models']:.1%}")
    first = rank["approximation_first_is_fp32_first"]
    print(f"  fp32's likeliest token first in the 4-bit approximation: {first:.1%}")
    print(f"  its rank there: max {rank['fp32_first_rank_max']}, p99 {rank['fp32_first_rank_p99']:.0f}")
    print(
        f"  worst rank of fp32's four likeliest: max {rank['fp32_top4_worst_rank_max']}, "
        f"p99 {rank['fp32_top4_worst_rank_p99']:.0f}"
    )
    print(f"  steps whose likeliest token the top {args.rescored} would miss: {rank['missed_with_rescored']}")
    print(f"  largest error of an approximated logit: {rank['max_abs_error']:.3f}")
    print(f"\n{'rows':>4} {'variant':26} {'ms':>8} {'argmax = fp32':>14}")
    for row in cost:
        print(f"{row['rows']:4d} {row['variant']:26} {row['ms']:8.2f} {row['argmax_equal']:14.0%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "base_model": args.base_model,
            "datasets": args.datasets.split(","),
            "ranks": rank,
            "timings": cost,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
