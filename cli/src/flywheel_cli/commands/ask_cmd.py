"""`flywheel ask`: ask the running inference service a question about a page file."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc

from flywheel_cli.errors import UserError
from flywheel_cli.flags import non_negative_int
from flywheel_proto.flywheel.inference.v1 import inference_pb2, inference_pb2_grpc


def build_request(args: argparse.Namespace) -> inference_pb2.AnswerRequest:
    """The AnswerRequest for the page file and question in the flags."""
    path = Path(args.page)
    if not path.is_file():
        raise UserError(f"no page file {args.page}: --page takes an .html or .txt file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{args.page} is not UTF-8 text: give an .html or .txt file") from exc
    is_html = args.page.endswith((".html", ".htm")) or content.lstrip().startswith("<")
    page = inference_pb2.Page(url=args.url or Path(args.page).resolve().as_uri(), title=args.title or "")
    if is_html:
        page.html = content
    else:
        page.text = content
    return inference_pb2.AnswerRequest(
        page=page,
        question=args.question,
        session_id=args.session or "",
        options=inference_pb2.GenerationOptions(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p
        ),
    )


def _ask(args: argparse.Namespace) -> int:
    request = build_request(args)
    with grpc.insecure_channel(args.target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        if args.stream:
            for chunk in stub.StreamAnswer(request, timeout=args.timeout):
                if chunk.query_id:
                    header = f"[{chunk.model_version}] "
                    print(header, end="", flush=True)
                    query_id = chunk.query_id
                print(chunk.delta, end="", flush=True)
                if chunk.finish_reason:
                    print(
                        f"\n\nquery id: {query_id}\n"
                        f"first token {chunk.timing.time_to_first_token_ms:.0f} ms, "
                        f"total {chunk.timing.total_ms:.0f} ms, {chunk.tokens.completion_tokens} tokens"
                    )
        else:
            response = stub.Answer(request, timeout=args.timeout)
            print(response.answer)
            print(
                f"\nmodel {response.model_version} | query id {response.query_id}\n"
                f"first token {response.timing.time_to_first_token_ms:.0f} ms, "
                f"total {response.timing.total_ms:.0f} ms, {response.tokens.completion_tokens} tokens, "
                f"{len(response.passages)} passages"
            )
            if args.show_passages:
                for p in response.passages:
                    print(f"--- passage {p.index} (score {p.score:.2f})\n{p.text}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds `ask` to the flywheel command."""
    ask = subparsers.add_parser("ask", help="ask the inference service a question about a page file")
    ask.add_argument("question")
    ask.add_argument("--page", required=True, help="an .html or .txt file")
    ask.add_argument("--url", help="the page's URL (default: the file's URI)")
    ask.add_argument("--title")
    ask.add_argument("--session", help="session id (routes canary traffic)")
    ask.add_argument("--target", default="127.0.0.1:50051")
    ask.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    ask.add_argument("--max-new-tokens", type=non_negative_int, default=0, help="0: the service's default")
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--top-p", type=float, default=0.0)
    ask.add_argument("--timeout", type=float, default=120.0)
    ask.add_argument("--show-passages", action="store_true")
    ask.set_defaults(func=_ask)
