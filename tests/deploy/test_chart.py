"""The Helm chart: lint, render every ci scenario, validate offline, and hold the house rules."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import flywheel_deploy_checks as dc
import pytest

GPU = "gpu-values.yaml"
CPU = "cpu-values.yaml"
KAFKA = "external-kafka-values.yaml"


def _latest_kube() -> str:
    import kubernetes_validate

    return kubernetes_validate.latest_version()


@pytest.mark.parametrize("scenario", dc.SCENARIOS)
def test_helm_lint_strict(helm: Path, scenario: str) -> None:
    dc.run_helm(
        helm,
        "lint",
        str(dc.CHART),
        "--strict",
        "--kube-version",
        dc.MIN_KUBE_VERSION,
        "-f",
        str(dc.CHART / "ci" / scenario),
    )


def test_values_schema_is_a_valid_schema_and_closed(jsonschema: object) -> None:
    import jsonschema as js

    schema = json.loads((dc.CHART / "values.schema.json").read_text())
    js.Draft7Validator.check_schema(schema)

    def open_objects(node: dict, path: str) -> list[str]:
        found = []
        if (
            node.get("type") == "object"
            and "properties" in node
            and node.get("additionalProperties") is not False
        ):
            found.append(path or "/")
        for key, child in node.get("properties", {}).items():
            found += open_objects(child, f"{path}/{key}")
        return found

    # Every block with known keys rejects unknown ones (free-form maps have no "properties").
    assert open_objects(schema, "") == []


def test_every_scenario_renders(renders: dict[str, dc.Render]) -> None:
    assert set(renders) >= {GPU, CPU, KAFKA, "minimal-values.yaml"}
    for name, r in renders.items():
        assert r.of_kind("Deployment"), name


@pytest.mark.parametrize("scenario", dc.SCENARIOS)
@pytest.mark.parametrize("kube", ["oldest", "newest"])
def test_objects_match_kubernetes_schema(
    renders: dict[str, dc.Render], kubernetes_validate: object, scenario: str, kube: str
) -> None:
    version = dc.MIN_KUBE_VERSION if kube == "oldest" else _latest_kube()
    assert dc.kubernetes_errors(renders[scenario].docs, version) == []


@pytest.mark.parametrize("scenario", dc.SCENARIOS)
def test_custom_resources_match_crd_schemas(
    renders: dict[str, dc.Render], jsonschema: object, scenario: str
) -> None:
    docs = renders[scenario].docs
    assert dc.unknown_kinds(docs) == []
    assert dc.custom_resource_errors(docs) == []


@pytest.mark.parametrize("scenario", dc.SCENARIOS)
def test_workloads_are_hardened_and_probed(renders: dict[str, dc.Render], scenario: str) -> None:
    assert dc.workload_errors(renders[scenario].docs) == []


@pytest.mark.parametrize("scenario", dc.SCENARIOS)
def test_standard_labels(renders: dict[str, dc.Render], scenario: str) -> None:
    required = {
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/version",
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/part-of",
        "helm.sh/chart",
    }
    for d in renders[scenario].docs:
        labels = d["metadata"].get("labels", {})
        assert required <= set(labels), f"{d['kind']}/{d['metadata']['name']} lacks {required - set(labels)}"
        if d["kind"] in ("Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget", "ServiceMonitor"):
            assert labels.get("app.kubernetes.io/component"), d["metadata"]["name"]


@pytest.mark.parametrize("scenario", dc.SCENARIOS)
def test_each_enabled_service_has_its_objects(
    helm: Path, renders: dict[str, dc.Render], scenario: str
) -> None:
    import yaml

    values = yaml.safe_load((dc.CHART / "values.yaml").read_text())
    override = yaml.safe_load((dc.CHART / "ci" / scenario).read_text()) or {}
    r = renders[scenario]
    for svc in dc.SERVICES:
        enabled = override.get(svc, {}).get("enabled", values[svc]["enabled"])
        names = {(d["kind"], d["metadata"]["name"]) for d in r.docs}
        have = {kind for kind, name in names if name == f"fw-flywheel-{svc}"}
        if not enabled:
            assert not have, f"{svc} is disabled but renders {have}"
            continue
        assert {"Deployment", "Service"} <= have, svc
        np_on = override.get("networkPolicy", {}).get("enabled", True)
        sm_on = override.get("metrics", {}).get("serviceMonitor", {}).get("enabled", True)
        assert ("NetworkPolicy" in have) == np_on, svc
        assert ("ServiceMonitor" in have) == sm_on, svc
        if svc in ("inference", "feedback"):
            hpa_on = override.get(svc, {}).get("autoscaling", {}).get("enabled", True)
            assert ("HorizontalPodAutoscaler" in have) == hpa_on, svc


def test_gpu_pool_scheduling_and_ort_limits(renders: dict[str, dc.Render]) -> None:
    r = renders[GPU]
    inference = r.named("Deployment", "-inference")
    spec = inference["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = dc.env_of(inference)
    assert env["FLYWHEEL_INFERENCE_ORT__PROVIDER"] == "cuda"
    assert int(env["FLYWHEEL_INFERENCE_ORT__GPU_MEM_LIMIT"]) == 20480 * 1024 * 1024
    assert env["FLYWHEEL_INFERENCE_ORT__ARENA_EXTEND_STRATEGY"] == "kSameAsRequested"
    (job,) = dc.embedded_jobs(r.named("ConfigMap", "-trainer-job-template"))
    job_spec = job["spec"]["template"]["spec"]
    assert job_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert job_spec["nodeSelector"] == spec["nodeSelector"]


# The recommended path: a Secret made beforehand (docs/deploy.md, "Secrets").
EXISTING_SECRET = ("--set", "secrets.existingSecret=flywheel-secrets")


def test_default_ort_limit_is_a_fraction_of_the_pool(helm: Path) -> None:
    r = dc.render(
        helm,
        *EXISTING_SECRET,
        "--set",
        "gpuPool.memoryMiB=81920",
        "--set-json",
        "inference.ort.gpuMemFraction=0.5",
    )
    env = dc.env_of(r.named("Deployment", "-inference"))
    assert int(env["FLYWHEEL_INFERENCE_ORT__GPU_MEM_LIMIT"]) == 40960 * 1024 * 1024


def test_cpu_only_requests_no_gpu(renders: dict[str, dc.Render]) -> None:
    r = renders[CPU]
    text = json.dumps(r.docs)
    assert "nvidia.com/gpu" not in text.replace('"key": "nvidia.com/gpu"', "")
    env = dc.env_of(r.named("Deployment", "-inference"))
    assert env["FLYWHEEL_INFERENCE_ORT__PROVIDER"] == "cpu"
    assert "FLYWHEEL_INFERENCE_ORT__GPU_MEM_LIMIT" not in env
    assert "tolerations" not in r.named("Deployment", "-inference")["spec"]["template"]["spec"]


def test_trainer_role_allows_only_job_handling(renders: dict[str, dc.Render]) -> None:
    role = renders[GPU].named("Role", "-trainer")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    assert rules == {
        (("batch",), ("jobs",)): {"create", "get", "list", "watch", "delete"},
        (("",), ("pods",)): {"get", "list"},
        (("",), ("pods/log",)): {"get"},
    }
    binding = renders[GPU].named("RoleBinding", "-trainer")
    trainer = renders[GPU].named("Deployment", "-trainer")["spec"]["template"]["spec"]
    assert binding["subjects"][0]["name"] == trainer["serviceAccountName"]
    others = [d for d in renders[GPU].of_kind("Deployment") if not d["metadata"]["name"].endswith("-trainer")]
    assert all(d["spec"]["template"]["spec"]["automountServiceAccountToken"] is False for d in others)


def test_trainer_job_template(renders: dict[str, dc.Render]) -> None:
    r = renders[GPU]
    cm = r.named("ConfigMap", "-trainer-job-template")
    (job,) = dc.embedded_jobs(cm)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("flywheel-trainer-job:")
    assert container["command"] == ["python", "-m", "flywheel_trainer.job"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 1 and job["spec"]["ttlSecondsAfterFinished"] == 86400
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/var/lib/flywheel/artifacts" in mounts
    # The trainer reads the template from the mounted ConfigMap.
    trainer = r.named("Deployment", "-trainer")
    volumes = {v["name"]: v for v in trainer["spec"]["template"]["spec"]["volumes"]}
    assert volumes["job-template"]["configMap"]["name"] == cm["metadata"]["name"]
    template_env = [v for k, v in dc.env_of(trainer).items() if k.endswith("TEMPLATE_FILE")]
    assert template_env and template_env[0].startswith("/etc/flywheel/trainer/")


def test_external_kafka_wiring(renders: dict[str, dc.Render]) -> None:
    r = renders[KAFKA]
    feedback = r.named("Deployment", "-feedback")
    env = dc.env_of(feedback)
    assert env["FLYWHEEL_FEEDBACK_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["FLYWHEEL_FEEDBACK_KAFKA__SASL_MECHANISM"] == "SCRAM-SHA-512"
    mounts = {
        m["mountPath"]: m["name"]
        for m in feedback["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    for var in ("KAFKA__SASL_PASSWORD_FILE", "KAFKA__SSL_CAFILE", "GRPC__TLS_CERT_FILE"):
        path = env[f"FLYWHEEL_FEEDBACK_{var}"]
        assert any(path.startswith(m + "/") for m in mounts), f"{var}={path} is not under a mounted volume"
    raw = next(
        e
        for e in feedback["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"] == "FLYWHEEL_FEEDBACK_KAFKA__SASL_USERNAME"
    )
    assert raw["valueFrom"]["secretKeyRef"]["name"] == "flywheel-kafka-credentials"
    assert not r.of_kind("Secret"), "an existing Secret was given: the chart must not create one"


@pytest.mark.parametrize("scenario", dc.SCENARIOS)
@pytest.mark.parametrize("svc", dc.SERVICES)
def test_env_names_match_service_settings(
    renders: dict[str, dc.Render], scenario: str, svc: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not dc.service_exists(svc):
        pytest.skip(f"pending: services/{svc} is not written yet")
    prefix = f"FLYWHEEL_{svc.upper()}_"
    cls = dc.settings_class(f"flywheel_{svc}.settings", prefix)
    deployments = [
        d for d in renders[scenario].of_kind("Deployment") if d["metadata"]["name"].endswith(f"-{svc}")
    ]
    if not deployments:
        pytest.skip(f"{svc} is disabled in {scenario}")
    containers = deployments[0]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", "from-a-secret") for e in containers[0]["env"]}
    assert dc.settings_env_errors(env, cls, prefix) == []
    # And the values parse: pydantic-settings reads them as the pod would.
    for name in [k for k in os.environ if k.startswith("FLYWHEEL_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cls()


@pytest.mark.parametrize("scenario", [GPU, KAFKA])
def test_notes_print_the_next_commands(helm: Path, scenario: str) -> None:
    notes = dc.run_helm(
        helm,
        "install",
        "fw",
        str(dc.CHART),
        "--dry-run=client",
        "--namespace",
        "flywheel",
        "-f",
        str(dc.CHART / "ci" / scenario),
    ).split("NOTES:", 1)[1]
    assert "helm test fw -n flywheel" in notes
    assert "kubectl -n flywheel port-forward svc/fw-flywheel-inference 50051:50051" in notes
    assert "flywheel.inference.v1.InferenceService/Answer" in notes
    assert "port-forward svc/fw-flywheel-gateway 8080:8080" in notes and "/widget.js" in notes
    assert 'in the folder "Flywheel"' in notes
    assert ("-insecure" in notes) == (scenario == KAFKA)


@pytest.mark.parametrize("scenario", dc.SCENARIOS)
def test_training_job_env_matches_job_settings(
    renders: dict[str, dc.Render], scenario: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not dc.service_exists("trainer"):
        pytest.skip("pending: services/trainer is not written yet")
    jobs = [j for d in renders[scenario].of_kind("ConfigMap") for j in dc.embedded_jobs(d)]
    if not jobs:
        pytest.skip(f"the trainer is disabled in {scenario}")
    prefix = "FLYWHEEL_TRAINER_JOB_"
    cls = dc.settings_class("flywheel_trainer.settings", prefix)
    env = {e["name"]: e.get("value", "") for e in jobs[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert dc.settings_env_errors(env, cls, prefix) == []
    for name in [k for k in os.environ if k.startswith("FLYWHEEL_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cls()


def test_trainer_builds_a_valid_job_from_the_template(
    renders: dict[str, dc.Render], kubernetes_validate: object
) -> None:
    """The trainer's own launcher turns the chart's template into a Job the API server accepts."""
    launchers = pytest.importorskip("flywheel_trainer.launchers", reason="pending: services/trainer")
    (template,) = dc.embedded_jobs(renders[GPU].named("ConfigMap", "-trainer-job-template"))
    spec = launchers.JobSpec(job_id="J-20261127-0001", dataset_id="ds-0001", base_version="v3")
    job = launchers.build_job(template, spec, "flywheel")
    assert dc.kubernetes_errors([job], dc.MIN_KUBE_VERSION) == []
    assert dc.workload_errors([job]) == []
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] + container["args"] == [
        "python", "-m", "flywheel_trainer.job",
        "--dataset", "ds-0001", "--base-version", "v3", "--job-id", "J-20261127-0001",
    ]  # fmt: skip
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "trainer-job"  # what its NetworkPolicy selects


def _admission(policy: dict, job: dict, username: str) -> list[str]:
    """The messages of the policy's failed validations for `username` creating `job` (CEL, as the
    API server evaluates it), or ["not matched"] when its match condition leaves the request alone."""
    import celpy

    env = celpy.Environment()
    activation = {
        "object": celpy.json_to_cel(job),
        "request": celpy.json_to_cel({"userInfo": {"username": username}, "operation": "CREATE"}),
    }

    def holds(expression: str) -> bool:
        return bool(env.program(env.compile(expression)).evaluate(activation))

    if not all(holds(c["expression"]) for c in policy["spec"]["matchConditions"]):
        return ["not matched"]
    return [v["message"] for v in policy["spec"]["validations"] if not holds(v["expression"])]


def test_trainer_may_create_only_training_jobs(renders: dict[str, dc.Render]) -> None:
    """The chart's ValidatingAdmissionPolicy admits the trainer's own Job and refuses hostile ones."""
    launchers = pytest.importorskip("flywheel_trainer.launchers", reason="pending: services/trainer")
    r = renders[GPU]
    policy = r.named("ValidatingAdmissionPolicy", "-trainer-jobs")
    binding = r.named("ValidatingAdmissionPolicyBinding", "-trainer-jobs")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    (template,) = dc.embedded_jobs(r.named("ConfigMap", "-trainer-job-template"))
    job = launchers.build_job(template, launchers.JobSpec("J-1", "ds-1", "v1"), "flywheel")
    namespace = r.named("Role", "-trainer")["metadata"]["namespace"]
    trainer = f"system:serviceaccount:{namespace}:{r.named('ServiceAccount', '-trainer')['metadata']['name']}"
    assert _admission(policy, job, trainer) == []
    assert _admission(policy, job, "system:serviceaccount:other:someone") == ["not matched"]

    def hostile(change: Callable[[dict], None]) -> list[str]:
        bad = json.loads(json.dumps(job))
        change(bad["spec"]["template"]["spec"])
        return _admission(policy, bad, trainer)

    def image(pod: dict) -> None:
        pod["containers"][0]["image"] = "attacker/miner:latest"

    def secret_volume(pod: dict) -> None:
        pod["volumes"].append({"name": "keys", "secret": {"secretName": "flywheel-secrets"}})

    def secret_env(pod: dict) -> None:
        ref = {"secretKeyRef": {"name": "flywheel-secrets", "key": "pseudonym-key"}}
        pod["containers"][0]["env"].append({"name": "K", "valueFrom": ref})

    def account(pod: dict) -> None:
        pod["serviceAccountName"] = "flywheel-trainer"

    def privileged(pod: dict) -> None:
        pod["hostNetwork"] = True

    def host_path(pod: dict) -> None:
        pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})

    training_image = job["spec"]["template"]["spec"]["containers"][0]["image"]
    assert hostile(image) == [f"a training Job runs the training image ({training_image}) and nothing else"]
    assert len(hostile(secret_volume)) == 1 and "artifact store" in hostile(secret_volume)[0]
    assert hostile(secret_env) == ["a training Job reads no Secret into its environment"]
    assert hostile(account) == ["a training Job runs as the default service account, without its token"]
    assert hostile(privileged) == ["a training Job is unprivileged and shares nothing with its host"]
    assert len(hostile(host_path)) == 1 and "artifact store" in hostile(host_path)[0]
    relabelled = json.loads(json.dumps(job))
    relabelled["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] = "inference"
    assert _admission(policy, relabelled, trainer) == [
        "a training pod carries the trainer-job labels its NetworkPolicy selects"
    ]


# ---------------------------------------------------------------- each check fails on a broken input


def test_wrong_value_type_is_rejected(helm: Path) -> None:
    with pytest.raises(dc.RenderError, match="/inference/replicas"):
        dc.render(helm, "--set", "inference.replicas=two")
    with pytest.raises(dc.RenderError, match="replicaCount"):
        dc.render(helm, "--set", "inference.replicaCount=2")
    with pytest.raises(dc.RenderError, match="/kafka/securityProtocol"):
        dc.render(helm, "--set", "kafka.securityProtocol=TLS")
    with pytest.raises(dc.RenderError):
        dc.run_helm(helm, "lint", str(dc.CHART), "--strict", "--set", "gpuPool.memoryMiB=lots")


def test_missing_gpu_toleration_is_caught(helm: Path) -> None:
    r = dc.render(helm, "-f", str(dc.CHART / "ci" / GPU), "--set-json", "gpuPool.tolerations=[]")
    errors = dc.workload_errors(r.docs)
    assert any("-inference" in e and "does not tolerate the GPU taint" in e for e in errors), errors
    assert any("[job.yaml]" in e and "does not tolerate the GPU taint" in e for e in errors), errors


def test_gpu_limit_over_pool_memory_is_refused(helm: Path) -> None:
    with pytest.raises(dc.RenderError, match="exceeds the GPU pool's memory"):
        dc.render(
            helm,
            *EXISTING_SECRET,
            "--set",
            "inference.ort.gpuMemLimitMiB=30000",
            "--set",
            "gpuPool.memoryMiB=24576",
        )
    with pytest.raises(dc.RenderError, match="no GPU would be scheduled"):
        dc.render(
            helm,
            *EXISTING_SECRET,
            "--set",
            "inference.gpu.enabled=false",
            "--set",
            "inference.ort.provider=cuda",
        )


def test_a_render_never_generates_keys_silently(helm: Path) -> None:
    with pytest.raises(
        dc.RenderError,
        match=r"nothing gives apiTokens, queryIdKey, pseudonymKey, eventSigningKey, gatewaySessionKey, "
        r"gatewayVisitorToken.*existingSecret",
    ):
        dc.render(helm)
    given = (
        "--set-json",
        'secrets.create.apiTokens={"a-user-token-0123": "user"}',
        "--set",
        "secrets.create.queryIdKey=k",
        "--set",
        "secrets.create.pseudonymKey=p",
        "--set",
        "secrets.create.eventSigningKey=e",
        "--set",
        "secrets.create.gatewaySessionKey=g",
        "--set",
        "secrets.create.gatewayVisitorToken=a-visitor-token-0123",
    )
    first, second = (dc.render(helm, *given).named("Secret", "-secrets") for _ in range(2))
    assert first["data"] == second["data"], "a render with given values is the same every time"
    hashes = base64.b64decode(first["data"]["api-token-hashes.yaml"]).decode()
    # The gateway's visitor token is a user-role token of the services, hashed like the others.
    assert sorted(hashes.strip().splitlines()) == sorted(
        f"sha256:{hashlib.sha256(token).hexdigest()}: user"
        for token in (b"a-user-token-0123", b"a-visitor-token-0123")
    )


def test_services_run_in_production_mode_and_mount_token_hashes_only(renders: dict[str, dc.Render]) -> None:
    for deployment in renders[CPU].of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert dc.env_of(deployment)["FLYWHEEL_MODE"] == "production"
        for volume in pod.get("volumes", []):
            keys = [item["key"] for item in volume.get("secret", {}).get("items", [])]
            assert "api-tokens.yaml" not in keys, f"{deployment['metadata']['name']} mounts plaintext tokens"


@pytest.mark.parametrize(
    ("component", "setting"),
    [
        # Feedback signs its events; the trainer (roles) and the evaluator (live votes) verify them.
        *((c, "EVENT_SIGNING_KEY_FILE") for c in ("-feedback", "-trainer", "-evaluator")),
        # Inference and feedback pseudonymise sessions; the trainer and the evaluator forget them.
        *((c, "PSEUDONYM_KEY_FILE") for c in ("-inference", "-feedback", "-trainer", "-evaluator")),
        # Inference signs query ids (feedback verifies them) and interactions (the trainer and the
        # evaluator verify those with a key derived from it).
        *((c, "QUERY_ID_KEY_FILE") for c in ("-inference", "-feedback", "-trainer", "-evaluator")),
    ],
)
def test_every_key_file_a_service_reads_is_mounted(
    renders: dict[str, dc.Render], component: str, setting: str
) -> None:
    deployment = renders[CPU].named("Deployment", component)
    path = next(v for k, v in dc.env_of(deployment).items() if k.endswith(setting))
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = {
        f"{mount['mountPath']}/{item['path']}"
        for mount in pod["containers"][0]["volumeMounts"]
        for item in volumes[mount["name"]].get("secret", {}).get("items", [])
    }
    assert path in mounted


def test_kubernetes_schema_check_catches_a_bad_object(
    renders: dict[str, dc.Render], kubernetes_validate: object
) -> None:
    import copy

    deployment = copy.deepcopy(renders[GPU].named("Deployment", "-feedback"))
    deployment["spec"]["replicas"] = "two"
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpcc"] = {"port": 1}
    errors = dc.kubernetes_errors([deployment], dc.MIN_KUBE_VERSION)
    assert len(errors) >= 1 and any("replicas" in e or "grpcc" in e for e in errors), errors


def test_crd_schema_check_catches_bad_custom_resources(
    renders: dict[str, dc.Render], jsonschema: object
) -> None:
    import copy

    sm = copy.deepcopy(renders[GPU].named("ServiceMonitor", "-inference"))
    sm["spec"]["endpoints"][0]["interval"] = "30 seconds"
    sm["spec"]["endpoints"][0]["scrapeTimout"] = "10s"
    rule = copy.deepcopy(renders[GPU].of_kind("PrometheusRule")[0])
    rule["spec"]["groups"][0]["rules"][0]["for"] = 5
    errors = dc.custom_resource_errors([sm, rule])
    assert any("interval" in e for e in errors), errors
    assert any("scrapeTimout" in e for e in errors), errors
    assert any("/for" in e for e in errors), errors


def test_settings_check_catches_unknown_env(svc: str = "inference") -> None:
    if not dc.service_exists(svc):
        pytest.skip(f"pending: services/{svc} is not written yet")
    cls = dc.settings_class(f"flywheel_{svc}.settings", "FLYWHEEL_INFERENCE_")
    errors = dc.settings_env_errors(
        {"FLYWHEEL_INFERENCE_ORT__GPU_MEMORY_LIMIT": "1", "FLYWHEEL_INFERENCE_GRPC__PORT": "1"},
        cls,
        "FLYWHEEL_INFERENCE_",
    )
    assert errors == ["FLYWHEEL_INFERENCE_ORT__GPU_MEMORY_LIMIT: OrtSettings has no field 'gpu_memory_limit'"]


def test_workload_check_catches_an_unhardened_pod(renders: dict[str, dc.Render]) -> None:
    import copy

    deployment = copy.deepcopy(renders[GPU].named("Deployment", "-feedback"))
    spec = deployment["spec"]["template"]["spec"]
    spec["terminationGracePeriodSeconds"] = 10
    spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    del spec["containers"][0]["readinessProbe"]
    errors = dc.workload_errors([deployment])
    assert any("terminationGracePeriodSeconds" in e for e in errors)
    assert any("readOnlyRootFilesystem" in e for e in errors)
    assert any("no readinessProbe" in e for e in errors)
