"""gRPC channels and stubs to the services behind the gateway, opened once and shared by all requests."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flywheel_gateway.settings import ServiceTargets
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2_grpc
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2_grpc
from flywheel_proto.flywheel.inference.v1 import inference_pb2_grpc
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2_grpc


class ServiceClients:
    """One channel per service; the stubs the routes call."""

    def __init__(self, targets: ServiceTargets) -> None:
        self.targets = targets
        self._channels = {
            name: grpc.aio.insecure_channel(getattr(targets, name))
            for name in ("inference", "feedback", "trainer", "evaluator")
        }
        self.inference = inference_pb2_grpc.InferenceServiceStub(self._channels["inference"])
        self.feedback = feedback_pb2_grpc.FeedbackServiceStub(self._channels["feedback"])
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(self._channels["trainer"])
        self.evaluator = evaluator_pb2_grpc.EvaluatorServiceStub(self._channels["evaluator"])

    async def serving(self, name: str, timeout_s: float = 2.0) -> bool:
        """Whether a service reports SERVING (grpc.health.v1)."""
        stub = health_pb2_grpc.HealthStub(self._channels[name])
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
