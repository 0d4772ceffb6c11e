"""Entry point of the training job (a local subprocess or a Kubernetes Job run the same command)."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import sys
import time
from types import FrameType

from flywheel_common.logging import configure_logging
from flywheel_common.runtime import load_settings
from flywheel_trainer.job.run import JobArgs, fail, run
from flywheel_trainer.settings import JobSettings

log = logging.getLogger("flywheel_trainer.job")


def parse_args(argv: list[str] | None = None) -> JobArgs:
    parser = argparse.ArgumentParser(
        prog="python -m flywheel_trainer.job",
        description="Fine-tune a registered model version on a dataset and register the result as a "
        "candidate. Settings come from FLYWHEEL_TRAINER_JOB_* environment variables.",
    )
    parser.add_argument(
        "--dataset", required=True, help="dataset id (under <artifact root>/datasets) or a dataset folder"
    )
    parser.add_argument("--base-version", required=True, help="registered version to start from, e.g. v1")
    parser.add_argument("--job-id", help="the job's id (default: manual-<UTC time>)")
    ns = parser.parse_args(argv)
    job_id = ns.job_id or "manual-" + dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return JobArgs(dataset=ns.dataset, base_version=ns.base_version, job_id=job_id)


# The exit status of a process ended by SIGTERM's default action in a shell's terms (128 + 15).
_TERMINATED = 128 + signal.SIGTERM


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turns SIGTERM (the local launcher's stop, a Kubernetes pod's deletion) into SystemExit, so the
    job's `finally` and `except` blocks remove its scratch folder and a half-made registration,
    which the default action (ending the process on the spot) leaves behind, gigabytes each."""
    # Unlike a service's handler, which sets a flag for its loop to see, this one raises: a job has no
    # loop to look, only long calls to leave. A second SIGTERM is ignored, so it cannot cut short the
    # clean-up the first started (the launcher's SIGKILL after its grace still ends it).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(_TERMINATED)


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin while they wait are ruinous where other processes share the cores
    # (40 s instead of 2 s per step measured on 2 busy cores): they sleep instead. Set before torch
    # loads, and inherited by the exporter's subprocess.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    settings = load_settings(JobSettings)
    configure_logging(settings.logging, "trainer-job")
    started = time.perf_counter()
    try:
        result = run(settings, args)
    except SystemExit as exc:
        if exc.code == _TERMINATED:
            log.warning("job %s stopped by SIGTERM", args.job_id, extra={"job_id": args.job_id})
        raise
    except Exception as exc:
        log.exception("job %s failed", args.job_id, extra={"job_id": args.job_id})
        fail(settings, args, exc, started)
        return 1
    log.info("job %s done: the trainer announces candidate %s", args.job_id, result["candidate_version"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
