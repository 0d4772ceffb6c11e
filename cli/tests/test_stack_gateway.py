"""The local stack's ports, and its gateway in front of the four services with the pages under /demo/."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from flywheel_cli.local.kafka_broker import ephemeral_ports, free_port
from flywheel_cli.local.stack import LocalStack, StackConfig, StackError, service_specs
from flywheel_common.files import repo_root
from flywheel_gateway.settings import GatewaySettings


def test_the_gateway_starts_last_in_front_of_the_services(monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = repo_root() / "datasets" / "python-faq"
    specs = service_specs(StackConfig(dataset=dataset))
    *services, gateway = specs
    assert [s.name for s in services] == ["inference", "feedback", "trainer", "evaluator"]
    assert not any(s.http for s in services)
    assert (gateway.name, gateway.module, gateway.http, gateway.port) == (
        "gateway",
        "flywheel_gateway",
        True,
        8080,
    )
    # The environment is what the gateway's settings read (they forbid unknown keys: no Kafka here).
    for name, value in gateway.env.items():
        monkeypatch.setenv(name, value)
    settings = GatewaySettings()
    assert settings.services.inference == "127.0.0.1:50051"
    assert settings.services.evaluator == "127.0.0.1:50054"
    assert settings.session.secure_cookies is False
    assert settings.demo_pages_dir == (dataset / "pages").resolve()


def test_free_ports_and_a_stack_without_the_gateway(tmp_path: Path) -> None:
    specs = service_specs(StackConfig(dataset=tmp_path, free_ports=True))
    gateway = specs[-1]
    assert gateway.port != 8080 and gateway.port not in {s.port for s in specs[:-1]}
    assert "FLYWHEEL_GATEWAY_DEMO_PAGES_DIR" not in gateway.env  # a dataset without pages/
    four = service_specs(StackConfig(services=("inference", "feedback", "trainer", "evaluator")))
    assert "gateway" not in {s.name for s in four}


def test_a_free_port_is_below_the_source_ports_of_outgoing_connections() -> None:
    # A port from the ephemeral range (binding port 0) became a Kafka client's source port before
    # the gateway bound it: "address already in use", and the stack did not start.
    low, _ = ephemeral_ports()
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= port < low for port in ports) and len(ports) > 1
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))


def test_a_second_stack_on_taken_ports_stops_before_it_starts_anything(tmp_path: Path) -> None:
    # gRPC servers bind with SO_REUSEPORT: without the check, a second stack would share the ports.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        ports = [free_port() for _ in range(5)]
        config = StackConfig(
            var_dir=tmp_path / "var",
            grpc_ports=(ports[0], taken, ports[1], ports[2]),
            metrics_ports=(ports[3], ports[4], free_port(), free_port()),
            gateway_port=free_port(),
            gateway_metrics_port=free_port(),
        )
        stack = LocalStack(config, echo=lambda line: None)
        with pytest.raises(StackError, match=rf"{taken} \(feedback\).*--free-ports"):
            stack.start()
    assert not stack.running and not (tmp_path / "var" / "logs").exists()
