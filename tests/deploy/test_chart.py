"""The Helm chart: lint, render every ci scenario, validate offline, and hold the house rules."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
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


# What a render of the chart's defaults must be given: the recommended Secret, made beforehand
# (docs/deploy.md, "Secrets"), and the API server's address for the trainer's egress.
API_SERVER = ("--set-json", 'networkPolicy.apiServerCidrs=["192.0.2.1/32"]')
EXISTING_SECRET = ("--set", "secrets.existingSecret=flywheel-secrets", *API_SERVER)


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
    # The trainer's launcher uses the batch API alone (BatchV1Api): no pods, no logs.
    assert rules == {(("batch",), ("jobs",)): {"create", "get", "list", "watch", "delete"}}
    binding = renders[GPU].named("RoleBinding", "-trainer")
    trainer = renders[GPU].named("Deployment", "-trainer")["spec"]["template"]["spec"]
    assert binding["subjects"][0]["name"] == trainer["serviceAccountName"]
    others = [d for d in renders[GPU].of_kind("Deployment") if not d["metadata"]["name"].endswith("-trainer")]
    assert all(d["spec"]["template"]["spec"]["automountServiceAccountToken"] is False for d in others)


def test_trainer_launcher_calls_only_the_batch_api() -> None:
    """What the Role grants is what the launcher calls: Jobs through BatchV1Api, nothing on pods."""
    source = dc.ROOT / "services" / "trainer" / "src" / "flywheel_trainer" / "launchers.py"
    if not source.is_file():
        pytest.skip("pending: services/trainer")
    text = source.read_text()
    assert "BatchV1Api" in text
    assert not re.search(r"CoreV1Api|_namespaced_pod|pod_log", text)


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


def test_topics_roll_segments_within_a_day_of_their_retention(helm: Path) -> None:
    """Kafka deletes whole segments, rolled after 7 days by default; the services' own topic creation
    does the same (`flywheel_common.kafka.topic_configs`)."""
    strimzi = ("-f", str(dc.CHART / "ci" / "gpu-values.yaml"))  # the scenario with Strimzi's topics
    topics = dc.render(helm, *strimzi).of_kind("KafkaTopic")
    assert topics and all(t["spec"]["config"]["segment.ms"] == 86400000 for t in topics)
    hourly = dc.render(helm, *strimzi, "--set", "kafka.topics.retentionMs=3600000").of_kind("KafkaTopic")
    assert all(t["spec"]["config"]["segment.ms"] == 3600000 for t in hourly)
    forever = dc.render(helm, *strimzi, "--set", "kafka.topics.retentionMs=-1").of_kind("KafkaTopic")
    assert all("segment.ms" not in t["spec"]["config"] for t in forever)


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


def _notes(helm: Path, *args: str) -> str:
    """What `helm install` prints after the objects (NOTES.txt)."""
    out = dc.run_helm(
        helm, "install", "fw", str(dc.CHART), "--dry-run=client", "--namespace", "flywheel", *args
    )
    return out.split("NOTES:", 1)[1]


@pytest.mark.parametrize("scenario", [GPU, KAFKA])
def test_notes_print_the_next_commands(helm: Path, scenario: str) -> None:
    notes = _notes(helm, "-f", str(dc.CHART / "ci" / scenario))
    assert "helm test fw -n flywheel" in notes
    assert "kubectl -n flywheel port-forward svc/fw-flywheel-inference 50051:50051" in notes
    assert "flywheel.inference.v1.InferenceService/Answer" in notes
    assert "port-forward svc/fw-flywheel-gateway 8080:8080" in notes and "/widget.js" in notes
    assert 'in the folder "Flywheel"' in notes
    assert ("-insecure" in notes) == (scenario == KAFKA)
    # gRPC over TLS leaves the native gRPC probes and the gateway speaking plaintext: said out loud.
    assert ("WARNING:\n- tls.enabled: " in notes) == (scenario == KAFKA)


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


# What each of the policy's validations says when it refuses a Job (the start of its message).
REFUSED = {
    "image": "a training Job runs the training image",
    "account": "a training Job runs as the default service account, without its token",
    "volumes": "a training Job mounts only the artifact store",
    "secret env": "a training Job reads no Secret into its environment",
    "host": "a training Job shares nothing with its host",
    "root": "a training Job runs as non-root",
    "privileges": "a training Job is unprivileged",
    "seccomp": "a training Job runs under the RuntimeDefault (or a Localhost) seccomp profile",
    "labels": "a training pod carries the trainer-job labels its NetworkPolicy selects",
}


def _pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def _psc(job: dict) -> dict:
    """The training pod's securityContext."""
    return _pod(job)["securityContext"]


def _container(job: dict) -> dict:
    return _pod(job)["containers"][0]


def _sc(job: dict) -> dict:
    """The training container's securityContext."""
    return _container(job)["securityContext"]


Change = Callable[[dict], object]


def _set(where: Callable[[dict], dict], **fields: object) -> Change:
    return lambda job: where(job).update(fields)


def _unset(where: Callable[[dict], dict], key: str) -> Change:
    return lambda job: where(job).pop(key)


def _volume(source: dict) -> Change:
    return lambda job: _pod(job)["volumes"].append({"name": "extra", **source})


SECRET_ENV = {
    "name": "K",
    "valueFrom": {"secretKeyRef": {"name": "flywheel-secrets", "key": "pseudonym-key"}},
}
ADDED_CAPABILITIES = {"add": ["SYS_ADMIN", "NET_RAW", "SYS_PTRACE"]}

# (what a stolen trainer token might try, the change to the trainer's own Job, what refuses it)
HOSTILE_JOBS: list[tuple[str, Change, list[str]]] = [
    ("another image", _set(_container, image="attacker/miner:latest"), ["image"]),
    ("an init container", lambda j: _pod(j).update(initContainers=[_container(j)]), ["image"]),
    ("the trainer's account", _set(_pod, serviceAccountName="flywheel-trainer"), ["account"]),
    ("the account's token", _set(_pod, automountServiceAccountToken=True), ["account"]),
    ("a Secret volume", _volume({"secret": {"secretName": "flywheel-secrets"}}), ["volumes"]),
    ("a hostPath volume", _volume({"hostPath": {"path": "/"}}), ["volumes"]),
    ("an inline NFS volume", _volume({"nfs": {"server": "10.0.0.9", "path": "/"}}), ["volumes"]),
    ("a CSI volume", _volume({"csi": {"driver": "secrets-store.csi.k8s.io"}}), ["volumes"]),
    (
        "another claim",
        _volume({"persistentVolumeClaim": {"claimName": "fw-flywheel-trainer-data"}}),
        ["volumes"],
    ),
    ("a Secret in env", lambda j: _container(j)["env"].append(SECRET_ENV), ["secret env"]),
    ("the host's network", _set(_pod, hostNetwork=True), ["host"]),
    ("the host's PIDs", _set(_pod, hostPID=True), ["host"]),
    ("a host port", _set(_container, ports=[{"containerPort": 22, "hostPort": 2222}]), ["host"]),
    (
        "root with added capabilities",
        _set(_sc, runAsUser=0, runAsNonRoot=False, capabilities=ADDED_CAPABILITIES),
        ["root", "privileges"],
    ),
    ("runAsNonRoot left out", lambda j: (_psc(j).pop("runAsNonRoot"), _sc(j).pop("runAsNonRoot")), ["root"]),
    ("runAsNonRoot false in the container", _set(_sc, runAsNonRoot=False), ["root"]),
    ("the pod as user 0", _set(_psc, runAsUser=0), ["root"]),
    ("the container as user 0", _set(_sc, runAsUser=0), ["root"]),
    ("an added capability", _set(_sc, capabilities={"drop": ["ALL"], "add": ["NET_RAW"]}), ["privileges"]),
    ("capabilities not dropped", _unset(_sc, "capabilities"), ["privileges"]),
    ("no container securityContext", _unset(_container, "securityContext"), ["privileges"]),
    ("privilege escalation left to its default", _unset(_sc, "allowPrivilegeEscalation"), ["privileges"]),
    ("privileged", _set(_sc, privileged=True), ["privileges"]),
    ("an unconfined container", _set(_sc, seccompProfile={"type": "Unconfined"}), ["seccomp"]),
    ("an unconfined pod", _set(_psc, seccompProfile={"type": "Unconfined"}), ["seccomp"]),
    ("no seccomp profile", _unset(_psc, "seccompProfile"), ["seccomp"]),
    (
        "other labels",
        lambda j: j["spec"]["template"]["metadata"]["labels"].update(
            {"app.kubernetes.io/component": "inference"}
        ),
        ["labels"],
    ),
    # Stricter than the chart's own settings, so still a training Job:
    (
        "a Localhost seccomp profile",
        _set(_sc, seccompProfile={"type": "Localhost", "localhostProfile": "t.json"}),
        [],
    ),
    ("a memory-backed scratch", _volume({"emptyDir": {"medium": "Memory"}}), []),
]


@pytest.fixture(scope="module")
def trainer_admission(renders: dict[str, dc.Render]) -> tuple[dict, dict, str]:
    """The chart's admission policy, the Job the trainer's own launcher builds from the chart's
    template, and the trainer's user name."""
    launchers = pytest.importorskip("flywheel_trainer.launchers", reason="pending: services/trainer")
    r = renders[GPU]
    policy = r.named("ValidatingAdmissionPolicy", "-trainer-jobs")
    (template,) = dc.embedded_jobs(r.named("ConfigMap", "-trainer-job-template"))
    job = launchers.build_job(template, launchers.JobSpec("J-1", "ds-1", "v1"), "flywheel")
    namespace = r.named("Role", "-trainer")["metadata"]["namespace"]
    trainer = f"system:serviceaccount:{namespace}:{r.named('ServiceAccount', '-trainer')['metadata']['name']}"
    return policy, job, trainer


def test_trainer_may_create_only_training_jobs(
    renders: dict[str, dc.Render], trainer_admission: tuple[dict, dict, str]
) -> None:
    """The chart's ValidatingAdmissionPolicy admits the trainer's own Job, and holds only the trainer."""
    policy, job, trainer = trainer_admission
    binding = renders[GPU].named("ValidatingAdmissionPolicyBinding", "-trainer-jobs")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert _admission(policy, job, trainer) == []
    assert _admission(policy, job, "system:serviceaccount:other:someone") == ["not matched"]
    # The chart's own securityContext is what the policy asks for (restricted Pod Security).
    assert _sc(job)["capabilities"]["drop"] == ["ALL"] and _sc(job)["allowPrivilegeEscalation"] is False
    assert _pod(job)["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def _with(job: dict, change: Change) -> dict:
    changed = json.loads(json.dumps(job))
    change(changed)
    return changed


@pytest.mark.parametrize(("attempt", "change", "refused_by"), HOSTILE_JOBS, ids=[h[0] for h in HOSTILE_JOBS])
def test_trainer_admission_refuses_a_hostile_job(
    trainer_admission: tuple[dict, dict, str],
    attempt: str,
    change: Change,
    refused_by: list[str],
) -> None:
    """Each way a stolen trainer token might start something other than a training pod is refused
    by the validation meant for it (and only by it); stricter settings are still admitted."""
    policy, job, trainer = trainer_admission
    messages = _admission(policy, _with(job, change), trainer)
    assert len(messages) == len(refused_by), f"{attempt}: {messages}"
    for message, key in zip(messages, sorted(refused_by, key=list(REFUSED).index), strict=True):
        assert message.startswith(REFUSED[key]), f"{attempt}: {message!r} is not the {key} refusal"


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


def test_trainer_egress_needs_the_api_servers_address(helm: Path) -> None:
    """An empty apiServerCidrs would let the trainer reach any address on 443/6443: the render fails."""
    secret = ("--set", "secrets.existingSecret=flywheel-secrets")
    with pytest.raises(
        dc.RenderError, match=r"networkPolicy.apiServerCidrs is empty: .* any address on ports 443, 6443"
    ):
        dc.render(helm, *secret)
    egress = dc.render(helm, *EXISTING_SECRET).named("NetworkPolicy", "-trainer")["spec"]["egress"]
    assert all(rule.get("to") for rule in egress), "an egress rule without peers allows every address"
    assert {"to": [{"ipBlock": {"cidr": "192.0.2.1/32"}}], "ports": [
        {"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"},
    ]} in egress  # fmt: skip
    # Nothing to hold without the NetworkPolicy; nothing to reach when jobs run in the trainer's pod.
    assert not dc.render(helm, *secret, "--set", "networkPolicy.enabled=false").of_kind("NetworkPolicy")
    local = dc.render(helm, *secret, "--set", "trainer.settings.jobs.launcher=local")
    assert all(rule.get("to") for rule in local.named("NetworkPolicy", "-trainer")["spec"]["egress"])
    # Any address, chosen on purpose (a CNI that cannot match the API server by address), is said aloud.
    anywhere = ("--set-json", 'networkPolicy.apiServerCidrs=["0.0.0.0/0", "::/0"]')
    assert "apiServerCidrs allows any address" in _notes(helm, *secret, *anywhere)
    assert "apiServerCidrs" not in _notes(helm, *EXISTING_SECRET)


def test_an_ingress_without_tls_is_refused(helm: Path) -> None:
    """Experts log in to /console through the Ingress: no TLS only when explicitly allowed."""
    ingress = (*EXISTING_SECRET, "--set", "gateway.ingress.enabled=true")
    with pytest.raises(
        dc.RenderError, match=r"gateway.ingress.tlsSecret is empty.*gateway.ingress.allowPlaintext=true"
    ):
        dc.render(helm, *ingress)
    tls = dc.render(helm, *ingress, "--set", "gateway.ingress.tlsSecret=ask-tls").named("Ingress", "-gateway")
    assert tls["spec"]["tls"] == [{"hosts": ["ask.example.com"], "secretName": "ask-tls"}]
    plaintext = (*ingress, "--set", "gateway.ingress.allowPlaintext=true")
    assert "tls" not in dc.render(helm, *plaintext).named("Ingress", "-gateway")["spec"]
    assert "the Ingress for ask.example.com has no TLS" in _notes(helm, *plaintext)


@pytest.mark.parametrize("service", ["trainer", "evaluator"])
def test_single_writers_cannot_be_scaled_out(helm: Path, service: str) -> None:
    """The trainer and the evaluator each own state (Recreate strategy): a second replica is refused."""
    with pytest.raises(dc.RenderError, match=f"/{service}/replicas"):
        dc.render(helm, *EXISTING_SECRET, "--set", f"{service}.replicas=2")
    deployment = dc.render(helm, *EXISTING_SECRET, "--set", f"{service}.replicas=0").named(
        "Deployment", f"-{service}"
    )
    assert deployment["spec"]["replicas"] == 0 and deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_an_empty_peer_list_is_refused(helm: Path) -> None:
    """`from: []` admits every source, so an emptied list of peers is refused, not rendered."""
    with pytest.raises(dc.RenderError, match="/networkPolicy/scrapers"):
        dc.render(helm, *EXISTING_SECRET, "--set-json", "networkPolicy.scrapers=[]")
    no_clients = (*EXISTING_SECRET, "--set-json", "networkPolicy.apiClients=[]")
    with pytest.raises(
        dc.RenderError, match=r"networkPolicy\.apiClients is empty: the gateway's NetworkPolicy"
    ):
        dc.render(helm, *no_clients)
    # Without the gateway, the public APIs are then the release's own pods' only.
    r = dc.render(helm, *no_clients, "--set", "gateway.enabled=false")
    grpc_from = r.named("NetworkPolicy", "-inference")["spec"]["ingress"][0]["from"]
    assert len(grpc_from) == 1 and "podSelector" in grpc_from[0]


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
        dc.render(helm, *API_SERVER)
    given = (
        *API_SERVER,
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
        # Token hashes: feedback and the admin RPCs check callers; inference lets the gateway (a
        # caller with a token) name its visitor's network.
        *((c, "AUTH__TOKENS_FILE") for c in ("-inference", "-feedback", "-trainer", "-evaluator")),
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
