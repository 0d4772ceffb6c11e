"""Settings from the environment: the service's and the job's prefixes do not collide."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel_trainer.launchers import KubernetesJobLauncher, LocalJobLauncher, build_launcher
from flywheel_trainer.settings import JobSettings, TrainerSettings


def test_service_and_job_read_their_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_TRAINER_BATCH__MAX_EXAMPLES", "12")
    monkeypatch.setenv("FLYWHEEL_TRAINER_JOBS__LOCAL_COMMAND", '["python", "-m", "x"]')
    monkeypatch.setenv("FLYWHEEL_TRAINER_JOB_HYPER__EPOCHS", "3")
    monkeypatch.setenv("FLYWHEEL_TRAINER_JOB_THREADS", "1")
    service, job = TrainerSettings(), JobSettings()
    assert service.batch.max_examples == 12 and service.jobs.local_command == ["python", "-m", "x"]
    assert job.hyper.epochs == 3 and job.threads == 1
    assert "kafka" not in JobSettings.model_fields  # the trainer alone announces candidates


def test_launcher_auto_follows_the_template(tmp_path: Path) -> None:
    assert isinstance(build_launcher(TrainerSettings(data_dir=tmp_path)), LocalJobLauncher)
    template = tmp_path / "job.yaml"
    template.write_text(
        "apiVersion: batch/v1\nkind: Job\nmetadata: {generateName: t-}\n"
        "spec: {template: {spec: {containers: [{name: train, image: i:1}]}}}\n"
    )
    settings = TrainerSettings(data_dir=tmp_path, jobs={"template_file": template})
    assert isinstance(build_launcher(settings), KubernetesJobLauncher)
    forced = TrainerSettings(data_dir=tmp_path, jobs={"template_file": template, "launcher": "local"})
    assert isinstance(build_launcher(forced), LocalJobLauncher)
