"""A run refuses, before anything starts, the inputs it would otherwise trip over minutes later."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from flywheel_cli.__main__ import main
from flywheel_cli.errors import UserError
from flywheel_cli.local.options import stack_flags_given
from flywheel_cli.local.stack import LocalStack, StackConfig
from flywheel_cli.simulation import simulate_cmd
from flywheel_cli.simulation.simulate import DEFAULT_TEMPLATE


@pytest.fixture(autouse=True)
def no_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may start Kafka or a service: a check that lets a bad input through fails at once."""

    def start(self: LocalStack) -> LocalStack:
        pytest.fail("the stack started before the inputs were checked")

    monkeypatch.setattr(LocalStack, "start", start)


def make_dataset(root: Path, splits: tuple[str, ...] = ("traffic", "exam", "gate")) -> Path:
    (root / "pages").mkdir(parents=True)
    (root / "pages" / "p.html").write_text("<html><body><p>The answer is 42.</p></body></html>")
    items = [
        {"id": f"q{i}", "page": "p", "question": "What is it?", "answers": ["42"], "split": split}
        for i, split in enumerate(splits)
    ]
    (root / "qa.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    return root


def simulation_args(*argv: str) -> argparse.Namespace:
    """`flywheel simulate`'s flags, as its parser reads them."""
    parser = argparse.ArgumentParser()
    simulate_cmd.register(parser.add_subparsers())
    return parser.parse_args(["simulate", "--dataset", "d", *argv])


@pytest.mark.parametrize(
    "argv",
    [
        ["up", "--simulate", "{missing}"],
        ["simulate", "--up", "--dataset", "{missing}"],
        ["up", "--golden", "{missing}"],
        ["up", "--simulate", "{dataset}", "--golden", "{missing}"],
    ],
)
def test_a_missing_dataset_is_refused_before_the_stack_starts(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing, dataset = tmp_path / "no-such-dataset", make_dataset(tmp_path / "ds")
    argv = [arg.format(missing=missing, dataset=dataset) for arg in argv]
    assert main(argv) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"flywheel {argv[0]}: bad ")
    assert line.endswith(f"{missing}: dataset folder not found")


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("{ans}", "unknown field {ans}"),
        ("{0}", "Replacement index 0 out of range"),
        ("The answer is {answer", "expected '}'"),
    ],
)
def test_a_correction_template_that_does_not_format_is_refused(
    template: str, why: str, tmp_path: Path
) -> None:
    args = simulation_args("--correction-template", template)
    with pytest.raises(UserError, match="--correction-template") as refused:
        simulate_cmd.check_run_inputs(args, make_dataset(tmp_path / "ds"), None)
    assert why in str(refused.value) and "{answer} and {question}" in str(refused.value)


@pytest.mark.parametrize("template", [DEFAULT_TEMPLATE, "{question} {answer}", "{{literal}} {answer}"])
def test_a_template_that_formats_passes(template: str, tmp_path: Path) -> None:
    args = simulation_args("--correction-template", template)
    simulate_cmd.check_run_inputs(args, make_dataset(tmp_path / "ds"), None)


def test_a_golden_set_without_gate_questions_is_refused(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "ds", splits=("traffic", "exam"))
    args = simulation_args("--up")
    with pytest.raises(UserError, match="no 'gate' questions for the evaluator to gate on"):
        simulate_cmd.check_run_inputs(args, dataset, StackConfig(dataset=dataset))
    # Against a running stack the evaluator's own golden set counts, not this one.
    simulate_cmd.check_run_inputs(simulation_args(), dataset, None)


def test_simulate_without_up_refuses_the_flags_of_a_stack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = str(make_dataset(tmp_path / "ds"))
    assert main(["simulate", "--dataset", dataset, "--observe", "--var", str(tmp_path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "flywheel simulate: --var, --observe configure the stack that --up starts: add --up, or leave "
        "them out to drive the running one"
    ]
    assert stack_flags_given(simulation_args()) == []
    given = simulation_args("--kafka", "h:1", "--free-ports", "--base-model", "smollm2-135m", "--resume")
    assert stack_flags_given(given) == ["--kafka", "--free-ports", "--base-model", "--resume"]
