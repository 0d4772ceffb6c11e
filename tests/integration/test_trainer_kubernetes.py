"""The Job KubernetesJobLauncher creates is the chart's trainer Job template, filled in, and valid."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from flywheel_cli.local.prometheus import find_tool
from flywheel_trainer.launchers import JOB_ID_LABEL, JobSpec, KubernetesJobLauncher, build_launcher
from flywheel_trainer.settings import JobsSettings, TrainerSettings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "flywheel"
# The oldest Kubernetes the chart supports: Chart.yaml's kubeVersion, ">=1.30.0-0" -> "1.30.0".
KUBE_VERSION = re.sub(r"^>=\s*|-0$", "", yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"])
SPEC = JobSpec("job-20250101-120000123-abcdef12", "ds-20250101-120000123-abcdef12", "v7")


def helm() -> str:
    found = find_tool("helm")
    if found is None:
        pytest.skip("helm is not installed: run scripts/install-deploy-tools")
    return str(found)


def rendered_template(values: str) -> dict[str, Any]:
    """The chart's trainer Job template, as the trainer reads it from its ConfigMap."""
    out = subprocess.run(
        [
            helm(), "template", "fw", str(CHART), "--namespace", "flywheel", "--kube-version", KUBE_VERSION,
            "-f", str(CHART / "ci" / values), "--show-only", "templates/trainer/job-template.yaml",
        ],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    config_map = yaml.safe_load(out)
    return dict(yaml.safe_load(config_map["data"]["job.yaml"]))


class RecordingApi:
    def __init__(self) -> None:
        self.created: list[tuple[str, dict[str, Any]]] = []

    def create_namespaced_job(self, namespace: str, body: dict[str, Any]) -> None:
        self.created.append((namespace, body))


@pytest.mark.parametrize("values", ["gpu-values.yaml", "cpu-values.yaml"])
def test_launched_job_is_the_chart_template_and_valid(values: str, tmp_path: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    template = rendered_template(values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(template))
    settings = TrainerSettings(jobs=JobsSettings(template_file=path, namespace="flywheel"))
    launcher = build_launcher(settings)
    assert isinstance(launcher, KubernetesJobLauncher)  # a template configured means Kubernetes
    api = RecordingApi()
    launcher._api = api
    name = launcher.launch(SPEC)
    ((namespace, job),) = api.created
    assert namespace == "flywheel" and job["metadata"]["name"] == name
    kubernetes_validate.validate(job, KUBE_VERSION, strict=True)

    spec = job["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "flywheel_trainer.job"]
    assert container["args"][-6:] == SPEC.args()
    assert spec["backoffLimit"] >= 0 and spec["ttlSecondsAfterFinished"] > 0
    assert pod["restartPolicy"] == "Never"
    assert {v["name"] for v in pod["volumes"]} >= {"artifacts", "scratch"}
    assert job["metadata"]["labels"][JOB_ID_LABEL] == SPEC.job_id
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "FLYWHEEL_TRAINER_JOB_ARTIFACT_ROOT" in env and "FLYWHEEL_TRAINER_JOB_SCRATCH_DIR" in env
    limits = container["resources"]["limits"]
    if values == "gpu-values.yaml":
        # GPU scheduling: the GPU resource, the pool's node selector and its taint's toleration.
        assert limits["nvidia.com/gpu"] == "1"  # quantities go to the API server as strings
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
