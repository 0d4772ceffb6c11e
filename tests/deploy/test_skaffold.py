"""skaffold.yaml: a current apiVersion, buildable artifacts, images the chart uses, profiles that render."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import flywheel_deploy_checks as dc
import pytest
import yaml

CONFIG: dict[str, Any] = yaml.safe_load((dc.ROOT / "skaffold.yaml").read_text())
PROFILES = [p["name"] for p in CONFIG.get("profiles", [])]
ARTIFACTS = CONFIG["build"]["artifacts"]


def test_skaffold_config_is_sound() -> None:
    for name in [None, *PROFILES]:
        assert dc.skaffold_errors(dc.skaffold_profile(CONFIG, name)) == [], name


def test_profiles_cpu_gpu_dev() -> None:
    assert {"cpu", "gpu", "dev"} <= set(PROFILES)


@pytest.mark.parametrize("artifact", ARTIFACTS, ids=lambda a: a["image"])
def test_dockerfile_copies_only_what_the_context_has(artifact: dict[str, Any]) -> None:
    dockerfile = dc.dockerfile_of(Path(artifact["docker"]["dockerfile"]).parent.name)
    missing = [
        src for src in dc.copy_sources(dockerfile.read_text()) if not list(dc.ROOT.glob(src.rstrip("/")))
    ]
    pending = [m for m in missing if m.startswith("services/") and not dc.service_exists(m.split("/")[1])]
    if pending and pending == missing:
        pytest.skip(f"pending: {', '.join(pending)} not written yet")
    assert missing == []
    ignored = dockerignored()
    assert [s for s in dc.copy_sources(dockerfile.read_text()) if s.split("/")[0] + "/" in ignored] == []


def dockerignored() -> set[str]:
    lines = (dc.ROOT / ".dockerignore").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def test_image_names_match_the_chart_values() -> None:
    values = yaml.safe_load((dc.CHART / "values.yaml").read_text())
    chart_images = {
        "inference.image": values["inference"]["image"]["repository"],
        "feedback.image": values["feedback"]["image"]["repository"],
        "trainer.image": values["trainer"]["image"]["repository"],
        "trainer.job.image": values["trainer"]["job"]["image"]["repository"],
        "evaluator.image": values["evaluator"]["image"]["repository"],
        "gateway.image": values["gateway"]["image"]["repository"],
    }
    built = {a["image"] for a in ARTIFACTS}
    assert set(chart_images.values()) == built
    templates = CONFIG["deploy"]["helm"]["releases"][0]["setValueTemplates"]
    for key, image in chart_images.items():
        env_name = image.replace("-", "_")
        assert templates[f"{key}.repository"] == f"{{{{.IMAGE_REPO_{env_name}}}}}", key
        assert f".IMAGE_TAG_{env_name}" in templates[f"{key}.tag"], key


def test_services_dockerfiles_match_the_folders() -> None:
    """The folder name is the image name: services/<name>/Dockerfile builds flywheel-<name>."""
    for art in ARTIFACTS:
        folder = Path(art["docker"]["dockerfile"]).parent
        assert folder.parent.as_posix() == "services"
        assert art["image"] == f"flywheel-{folder.name}" or art["image"].startswith(
            f"flywheel-{folder.name}-"
        )


@pytest.mark.parametrize("profile", [None, *PROFILES], ids=lambda p: p or "base")
def test_profile_values_render(helm: Path, kubernetes_validate: object, profile: str | None) -> None:
    config = dc.skaffold_profile(CONFIG, profile)
    (release,) = config["deploy"]["helm"]["releases"]
    args: list[str] = []
    for vf in release.get("valuesFiles", []):
        args += ["-f", str(dc.ROOT / vf)]
    for key, template in release.get("setValueTemplates", {}).items():
        args += ["--set-string", f"{key}={dc.image_template_values(template)}"]
    r = dc.render(
        helm,
        *args,
        chart=dc.ROOT / release["chartPath"],
        release=release["name"],
        namespace=release["namespace"],
    )
    assert dc.kubernetes_errors(r.docs, dc.MIN_KUBE_VERSION) == []
    assert dc.workload_errors(r.docs) == []
    images = {c["image"] for _, spec in dc.pod_specs(r.docs) for c in spec["containers"]}
    assert images and all(i.startswith("registry.example/flywheel-") and "@sha256:" in i for i in images), (
        images
    )


# ---------------------------------------------------------------- the check fails on a broken input


def test_skaffold_check_catches_a_broken_config() -> None:
    broken = copy.deepcopy(CONFIG)
    broken["apiVersion"] = "skaffold/v2beta29"
    broken["build"]["artifacts"][0]["image"] = "flywheel-inferense"
    broken["build"]["artifacts"][0]["docker"]["dockerfile"] = "services/inferense/Dockerfile"
    broken["build"]["artifacts"][1]["docker"]["target"] = "no-such-stage"
    broken["deploy"]["helm"]["releases"][0]["valuesFiles"] = ["deploy/helm/flywheel/ci/tpu-values.yaml"]
    errors = dc.skaffold_errors(broken)
    assert any("apiVersion" in e for e in errors)
    assert any("inferense" in e for e in errors)
    assert any("no-such-stage" in e for e in errors)
    assert any("tpu-values" in e for e in errors)
    assert any("names image flywheel_inference" in e for e in errors)


def test_copy_check_catches_a_missing_path() -> None:
    text = "FROM python:3.11.14-slim AS a\nCOPY libs/nope/pyproject.toml libs/nope/\nCOPY --from=a /x /y\n"
    assert dc.copy_sources(text) == ["libs/nope/pyproject.toml"]
    assert not list(dc.ROOT.glob("libs/nope/pyproject.toml"))
