"""Canary benchmark: how often the canary's verdict rolls back a candidate that is not worse than
production, or promotes one that is.

    uv run python bench/canary.py [--trials 400] [--json PATH]

Simulates the live signals of a canary and of production as the simulation's visitors send them
(`flywheel_cli.simulation.simulate`): an answer is bad (F1 under 0.2) with the version's bad-answer
share, and good answers have an F1 drawn between 0.2 and 1; a visitor ignores the answer (0.3 when
bad, 0.05 when good) or rates it from its F1 with the simulation's noise. Sessions alternate at random
between the two versions, one every `--session-s` seconds, and after each one the evaluator's own
`judge_canary` decides, as its check loop does, with the local stack's canary settings (16 sessions a
side, `--min-samples`; 10 s to 300 s), until it promotes or rolls back.

Production answers badly `--production-bad` of the time (0.5: a first candidate's share); the
scenarios move the canary's share. A canary is *not worse* when its bad share is at most
production's; *worse* when it is 0.2 higher (its mean rating then falls about 0.5, past the 0.3
tolerance). The table gives each scenario's share of trials rolled back and promoted, and the median
sessions it took.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from statistics import median
from typing import Any

from flywheel_cli.local.stack import LOCAL_CANARY as LOCAL_CANARY_ENV
from flywheel_cli.simulation.simulate import RATING_THRESHOLDS, SimulationConfig, ignores, rating_from_f1
from flywheel_common.files import write_json
from flywheel_evaluator.live import VersionStats, judge_canary
from flywheel_evaluator.settings import CanarySettings

# The local stack's canary, as its evaluator reads it from the environment.
LOCAL_CANARY = CanarySettings.model_validate({key.lower(): value for key, value in LOCAL_CANARY_ENV.items()})
# The canary's bad-answer share minus production's.
SCENARIOS = (-0.2, 0.0, 0.1, 0.2, 0.4)


def _visit(stats: VersionStats, bad: float, rng: random.Random, config: SimulationConfig) -> None:
    """One session's answer and what its visitor did with it."""
    f1 = rng.uniform(0, RATING_THRESHOLDS[0]) if rng.random() < bad else rng.uniform(RATING_THRESHOLDS[0], 1)
    stats.sessions += 1
    stats.sessions_served += 1
    if ignores(f1, rng, config):
        stats.ignored += 1
        return
    rating = rating_from_f1(f1, rng, config.rating_noise)
    stats.ratings += 1
    stats.rating_sum += rating
    stats.rating_sq_sum += rating * rating


# The simulation's visitors (ignore and rating noise), as `flywheel up --simulate` runs them.
VISITORS = SimulationConfig(dataset=Path("."))


def trial(
    production_bad: float, canary_bad: float, settings: CanarySettings, session_s: float, rng: random.Random
) -> tuple[str, int]:
    """The verdict of one simulated canary and the sessions it took."""
    canary, production = VersionStats("canary"), VersionStats("production")
    sessions = 0
    while True:
        sessions += 1
        if rng.random() < settings.fraction:
            _visit(canary, canary_bad, rng, VISITORS)
        else:
            _visit(production, production_bad, rng, VISITORS)
        elapsed = sessions * session_s
        verdict = judge_canary(canary, production, min(elapsed, settings.max_duration_s), settings)
        if verdict.action != "wait" or elapsed >= settings.max_duration_s:
            return verdict.action, sessions


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    settings = LOCAL_CANARY.model_copy(update={"min_samples": args.min_samples})
    rows = []
    for shift in SCENARIOS:
        canary_bad = min(1.0, max(0.0, args.production_bad + shift))
        outcomes = [
            trial(args.production_bad, canary_bad, settings, args.session_s, rng) for _ in range(args.trials)
        ]
        kind = "not worse" if shift <= 0 else ("worse" if shift >= 0.2 else "slightly worse")
        rows.append(
            {
                "canary_bad_minus_production": shift,
                "kind": kind,
                "rolled_back": sum(action == "rollback" for action, _ in outcomes) / args.trials,
                "promoted": sum(action == "promote" for action, _ in outcomes) / args.trials,
                "median_sessions": median(n for _, n in outcomes),
            }
        )
    return {
        "production_bad": args.production_bad,
        "min_samples": args.min_samples,
        "trials": args.trials,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=400, help="simulated canaries per scenario")
    parser.add_argument("--production-bad", type=float, default=0.5, help="production's bad-answer share")
    parser.add_argument("--session-s", type=float, default=2.5, help="seconds between sessions")
    parser.add_argument("--min-samples", type=int, default=LOCAL_CANARY.min_samples, help="sessions a side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = run(args)
    print(
        f"production answers badly {args.production_bad:.0%} of the time; {args.trials} canaries per scenario"
    )
    print(
        f"{'canary bad share':>17} {'kind':>15} {'rolled back':>12} {'promoted':>9} {'median sessions':>16}"
    )
    for row in results["rows"]:
        print(
            f"{row['canary_bad_minus_production']:>+17.1f} {row['kind']:>15} {row['rolled_back']:>12.1%}"
            f" {row['promoted']:>9.1%} {row['median_sessions']:>16.0f}"
        )
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
