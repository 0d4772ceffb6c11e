"""`flywheel feedback` sends a rating or a correction; `flywheel topic tail` prints decoded events."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message
from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from flywheel_cli.errors import UserError
from flywheel_common.kafka import EVENT_TYPE_HEADER, client_config, header
from flywheel_common.settings import KafkaSettings, TopicSettings
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2, feedback_pb2_grpc

# The event type of each default topic, for records written without the type header.
_TOPIC_TYPES = {
    TopicSettings().interactions: "flywheel.events.v1.Interaction",
    TopicSettings().feedback: "flywheel.events.v1.Feedback",
    TopicSettings().candidates: "flywheel.events.v1.ModelCandidate",
    TopicSettings().decisions: "flywheel.events.v1.GateDecision",
}


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca:
        credentials = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes())
        return grpc.secure_channel(args.target, credentials)
    return grpc.insecure_channel(args.target)


def _send(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("FLYWHEEL_TOKEN", "")
    if not token:
        raise UserError("a bearer token is needed: --token or FLYWHEEL_TOKEN (dev-user-token locally)")
    metadata = (("authorization", f"Bearer {token}"),)
    with _channel(args) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        if args.correction is not None:
            response = stub.SubmitCorrection(
                feedback_pb2.SubmitCorrectionRequest(
                    query_id=args.query_id,
                    corrected_answer=args.correction,
                    note=args.note or "",
                    idempotency_key=args.key or "",
                ),
                metadata=metadata,
                timeout=args.timeout,
            )
        else:
            request = feedback_pb2.SubmitFeedbackRequest(
                query_id=args.query_id, idempotency_key=args.key or "", session_id=args.session or ""
            )
            if args.rating is not None:
                request.rating = args.rating
            elif args.thumbs is not None:
                request.thumbs_up = args.thumbs == "up"
            elif args.comment is not None:
                request.comment = args.comment
            else:
                request.ignored = True
            response = stub.SubmitFeedback(request, metadata=metadata, timeout=args.timeout)
    state = "already stored (duplicate)" if response.duplicate else "stored"
    print(f"feedback {response.feedback_id} {state}")
    return 0


def _message_type(record: ConsumerRecord) -> type[Message] | None:
    name = (header(record, EVENT_TYPE_HEADER) or b"").decode() or _TOPIC_TYPES.get(record.topic, "")
    package, _, short = name.rpartition(".")
    if package != "flywheel.events.v1":
        return None
    return getattr(events_pb2, short, None)


def decode_record(record: ConsumerRecord) -> dict[str, Any]:
    """A consumed record as a JSON-ready dict, its value decoded as the event it carries."""
    out: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp_ms": record.timestamp,
        "key": (record.key or b"").decode(errors="replace"),
    }
    extra = {
        k: (v or b"").decode(errors="replace") for k, v in record.headers or () if k != EVENT_TYPE_HEADER
    }
    if extra:
        out["headers"] = extra
    message_type = _message_type(record)
    if message_type is not None:
        try:
            message = message_type()
            message.ParseFromString(record.value or b"")
            out["type"] = message.DESCRIPTOR.full_name
            out["event"] = MessageToDict(message, preserving_proto_field_name=True)
            return out
        except DecodeError:
            pass
    out["value_hex"] = (record.value or b"").hex()
    return out


def _tail(args: argparse.Namespace) -> int:
    settings = KafkaSettings(bootstrap_servers=args.bootstrap, client_id="flywheel-cli")
    consumer = KafkaConsumer(**client_config(settings), group_id=None, enable_auto_commit=False)
    try:
        partitions = [
            TopicPartition(args.topic, p) for p in sorted(consumer.partitions_for_topic(args.topic) or ())
        ]
        if not partitions:
            print(f"no topic {args.topic} on {args.bootstrap}", file=sys.stderr)
            return 1
        consumer.assign(partitions)
        if args.from_beginning:
            consumer.seek_to_beginning(*partitions)
        else:
            consumer.seek_to_end(*partitions)
        printed = 0
        deadline = time.monotonic() + args.timeout if args.timeout else None
        while deadline is None or time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                for record in batch:
                    print(json.dumps(decode_record(record), ensure_ascii=False), flush=True)
                    printed += 1
                    if args.max and printed >= args.max:
                        return 0
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds `feedback` and `topic tail` to the flywheel command."""
    send = subparsers.add_parser("feedback", help="send feedback or an expert correction for a query id")
    send.add_argument("query_id", help="the query id the inference service returned with the answer")
    signal = send.add_mutually_exclusive_group(required=True)
    signal.add_argument("--rating", type=int, choices=range(1, 6), metavar="1-5", help="1 to 5")
    signal.add_argument("--thumbs", choices=["up", "down"])
    signal.add_argument("--comment", help="free text (personal data is redacted by the service)")
    signal.add_argument("--ignored", action="store_true", help="the visitor ignored the answer")
    signal.add_argument("--correction", help="the corrected answer (needs an expert token)")
    send.add_argument("--note", help="reviewer's note with --correction")
    send.add_argument("--token", help="bearer token (default $FLYWHEEL_TOKEN)")
    send.add_argument("--key", help="idempotency key: retries with the same key are stored once")
    send.add_argument("--session", help="the visitor's session id (pseudonymised by the service)")
    send.add_argument("--target", default="127.0.0.1:50052", help="feedback service address")
    send.add_argument("--tls-ca", help="CA certificate file when the service uses TLS")
    send.add_argument("--timeout", type=float, default=10.0)
    send.set_defaults(func=_send)

    topic = subparsers.add_parser("topic", help="look at Kafka topics")
    commands = topic.add_subparsers(dest="topic_command", required=True)
    tail = commands.add_parser("tail", help="print a topic's events as JSON lines, decoded")
    tail.add_argument("topic")
    tail.add_argument("--bootstrap", default=os.environ.get("FLYWHEEL_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    tail.add_argument("--from-beginning", action="store_true", help="start at the oldest record")
    tail.add_argument("--max", type=int, default=0, help="stop after this many records")
    tail.add_argument("--timeout", type=float, default=0, help="stop after this many seconds")
    tail.set_defaults(func=_tail)
