"""`flywheel simulate`: drive the running system with simulated visitors and an expert, then report."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from flywheel_cli.console import make_console
from flywheel_cli.errors import UserError
from flywheel_cli.flags import non_negative_int, positive_int
from flywheel_cli.local.options import add_stack_args, print_table, stack_config, stack_flags_given
from flywheel_cli.local.stack import LocalStack, StackConfig, StackError, runs_on_disk
from flywheel_cli.simulation import report as report_mod
from flywheel_cli.simulation.simulate import (
    DEFAULT_TEMPLATE,
    Simulation,
    SimulationConfig,
    SimulationError,
    Targets,
    Tokens,
    correction_text,
)
from flywheel_eval.dataset import DatasetError, QAItem, load_dataset

# What a correction template is tried on before a run (a run finds a bad one only mid-round).
_SAMPLE = QAItem(id="sample", page="sample", question="What is it?", answers=("42",), split="traffic")


class RichProgress:
    """Progress bars for the simulation's steps, and its log lines above them."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bars = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )

    def log(self, message: str) -> None:
        self.bars.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}", highlight=False)

    def start(self, description: str, total: int | None) -> object:
        return self.bars.add_task(description, total=total)

    def advance(self, task: object, amount: int = 1) -> None:
        self.bars.advance(task, amount)  # type: ignore[arg-type]

    def update(self, task: object, description: str) -> None:
        self.bars.update(task, description=description)  # type: ignore[arg-type]

    def finish(self, task: object) -> None:
        t = self.bars.tasks[self.bars.task_ids.index(task)]  # type: ignore[arg-type]
        total = t.total if t.total is not None else max(t.completed, 1)
        self.bars.update(task, total=total, completed=total)  # type: ignore[arg-type]


def simulation_config(
    args: argparse.Namespace, dataset: Path, targets: Targets, gateway: str | None = None
) -> SimulationConfig:
    """The simulation's settings from the command's flags (`gateway`: visitors go through it)."""
    return SimulationConfig(
        dataset=dataset,
        rounds=args.rounds,
        seed=args.seed,
        questions_per_round=args.questions,
        exam_questions=args.exam_questions,
        concurrency=args.concurrency,
        correction_share=args.correction_share,
        correction_template=args.correction_template,
        rating_noise=args.rating_noise,
        ignore_bad=args.ignore_bad,
        ignore_good=args.ignore_good,
        targets=targets,
        tokens=Tokens(user=args.user_token, expert=args.expert_token, admin=args.admin_token),
        via_gateway=gateway,
    )


def check_run_inputs(args: argparse.Namespace, dataset: Path | None, stack: StackConfig | None) -> None:
    """Refuses, before anything starts, what a run would trip over only later (minutes into the
    stack's start, or mid-round): the simulated `dataset` or the `stack`'s golden set not loading (or
    without the split it gates on), a correction template that does not format."""
    simulated = None
    if dataset is not None:
        simulated = load_dataset(dataset)  # a DatasetError says what is wrong, as `flywheel simulate` does
        try:
            correction_text(_SAMPLE, args.correction_template)
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            why = f"unknown field {{{exc.args[0]}}}" if isinstance(exc, KeyError) else str(exc)
            raise UserError(
                f"--correction-template {args.correction_template!r}: {why}; it can use {{answer}} and "
                "{question} (write {{ and }} for a brace)"
            ) from exc
    if stack is None:
        return
    golden = simulated
    if args.golden:
        try:
            golden = load_dataset(stack.dataset)
        except DatasetError as exc:
            raise UserError(f"bad --golden dataset: {exc}") from exc
    if golden is not None and not golden.split(stack.gate_split):
        raise UserError(
            f"{golden.root} has no {stack.gate_split!r} questions for the evaluator to gate on; "
            "pass --golden with a dataset that has them"
        )


def run_simulation(
    args: argparse.Namespace, stack: LocalStack | None, console: Console, dataset: Path
) -> int:
    """Runs a simulation on `dataset` (against `stack` or the flags' targets); prints, writes the report."""
    gateway: str | None = None
    if stack is not None:
        t = stack.targets
        targets = Targets(t["inference"], t["feedback"], t.get("trainer", ""), t.get("evaluator", ""))
        missing = [name for name in ("trainer", "evaluator") if name not in t]
        if args.via_gateway and stack.gateway_url is None:
            missing.append("gateway")
        if missing:
            console.print(f"[red]cannot simulate: {', '.join(missing)} not running[/]")
            return 1
        gateway = stack.gateway_url if args.via_gateway else None
    else:
        targets = Targets(args.inference, args.feedback, args.trainer, args.evaluator)
        gateway = args.gateway if args.via_gateway else None
    try:
        config = simulation_config(args, dataset, targets, gateway)
        progress = RichProgress(console)
        with progress.bars:
            result = asyncio.run(Simulation(config, progress).run())
    except SimulationError as exc:
        raise UserError(f"simulation stopped: {exc}") from exc
    if stack is not None:
        result.settings["state_at_start"] = stack.initial_state
        result.notes.insert(0, f"started from {stack.initial_state}")
    folder = report_mod.write(result, Path(args.reports_dir))
    console.print(report_mod.rich_table(result))
    for line in result.notes:
        console.print(f"[dim]{line}[/]")
    gain = report_mod.Report.gain_vs_base(result, result.rounds[-1]) if len(result.rounds) > 1 else None
    if gain is not None:
        console.print(
            f"exam accuracy over the base model: {gain['mean_difference'] * 100:+.1f} points "
            f"(95% CI {gain['low'] * 100:+.1f} to {gain['high'] * 100:+.1f})"
        )
    console.print(f"wall time {result.wall_time_s / 60:.1f} min")
    console.print(f"[bold]report:[/] {folder}/report.md  (JSON: report.json, chart: chart.png)")
    if stack is not None and stack.config.own_broker:
        count, freed = runs_on_disk(stack.config.var_dir.parent)
        console.print(
            f"[dim]{stack.config.var_dir.parent}: {count} simulation state folder{'s' * (count != 1)}; "
            f"deleting {'them' if count != 1 else 'it'} frees {freed / 2**30:.1f} GB (the reports stay)[/]"
        )
    return 0


def _simulate(args: argparse.Namespace) -> int:
    console = make_console()
    dataset = Path(args.dataset)
    if args.up:
        config = stack_config(args, dataset, simulating=True)
        check_run_inputs(args, dataset, config)
        try:
            with LocalStack(config, echo=console.print) as stack:
                print_table(console, stack)
                return run_simulation(args, stack, console, dataset)
        except StackError as exc:
            console.print(f"[red]could not start the stack:[/] {exc}")
            return 1
    given = stack_flags_given(args)
    if given:
        many = len(given) > 1
        raise UserError(
            f"{', '.join(given)} {'configure' if many else 'configures'} the stack that --up starts: "
            f"add --up, or leave {'them' if many else 'it'} out to drive the running one"
        )
    check_run_inputs(args, dataset, None)
    return run_simulation(args, None, console, dataset)


def add_simulation_args(
    parser: argparse.ArgumentParser, *, dataset_flag: bool = True, default_rounds: int = 3
) -> None:
    """The simulation's flags (shared by `flywheel simulate` and `flywheel up --simulate`)."""
    group = parser.add_argument_group("simulation")
    if dataset_flag:
        group.add_argument("--dataset", required=True, help="dataset folder (pages/*.html + qa.jsonl)")
    group.add_argument(
        "--rounds", type=non_negative_int, default=default_rounds, help=f"default {default_rounds}"
    )
    group.add_argument("--seed", type=int, default=0)
    group.add_argument(
        "--questions",
        type=positive_int,
        help="traffic questions per round (default: the traffic split over the rounds)",
    )
    group.add_argument("--exam-questions", type=positive_int, help="exam questions measured (default: all)")
    group.add_argument("--concurrency", type=positive_int, default=4, help="visitors at once (default 4)")
    group.add_argument(
        "--correction-share",
        type=float,
        default=0.8,
        help="share of low-rated (<= 2) answers the expert corrects (default 0.8)",
    )
    group.add_argument(
        "--correction-template",
        default=DEFAULT_TEMPLATE,
        help="how the expert phrases a correction; {answer} and {question} are filled in",
    )
    group.add_argument("--rating-noise", type=float, default=0.15, help="chance a rating moves a step")
    group.add_argument("--ignore-bad", type=float, default=0.3, help="chance a bad answer is ignored")
    group.add_argument("--ignore-good", type=float, default=0.05, help="chance a good answer is ignored")
    group.add_argument("--reports-dir", default="var/reports", help="where reports go (default var/reports)")
    group.add_argument(
        "--via-gateway",
        action="store_true",
        help="visitors ask and rate through the gateway's HTTP API, as the widget does (the expert and "
        "the exam still use gRPC); the report's notes give the gateway's overhead per answer",
    )
    group.add_argument("--user-token", default="dev-user-token")
    group.add_argument("--expert-token", default="dev-expert-token")
    group.add_argument("--admin-token", default="dev-admin-token")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds `simulate` to the flywheel command."""
    sim = subparsers.add_parser(
        "simulate",
        help="simulated visitors and an expert drive the running system; writes a report",
        description="Visitors ask the dataset's traffic questions, rate the answers and an expert corrects "
        "some; after each round it waits for training, the gate and the rollout, then measures the exam "
        "split. Needs a running stack (`flywheel up`), or --up to start one for the run.",
    )
    add_simulation_args(sim)
    targets = sim.add_argument_group("targets (a stack started by `flywheel up`)")
    targets.add_argument("--inference", default="127.0.0.1:50051")
    targets.add_argument("--feedback", default="127.0.0.1:50052")
    targets.add_argument("--trainer", default="127.0.0.1:50053")
    targets.add_argument("--evaluator", default="127.0.0.1:50054")
    targets.add_argument("--gateway", default="http://127.0.0.1:8080", help="with --via-gateway")
    sim.add_argument("--up", action="store_true", help="start a local stack for the run and stop it after")
    add_stack_args(sim)
    sim.set_defaults(func=_simulate)
