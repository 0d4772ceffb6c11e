"""The checks behind tests/deploy: each returns a list of problems, so a test can also show it fails."""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "flywheel"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
SERVICES = ("inference", "feedback", "trainer", "evaluator", "gateway")
# The one service browsers talk to: HTTP probes instead of gRPC ones.
HTTP_SERVICES = ("gateway",)
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion, ">=1.30.0-0" -> "1.30.0");
# kubernetes-validate knows the newest.
CHART_KUBE_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
MIN_KUBE_VERSION = re.sub(r"^>=\s*|-0$", "", CHART_KUBE_VERSION)
# Graceful shutdown grace of every gRPC server (GrpcSettings.grace_s).
SERVICE_GRACE_S = 20
GPU_TAINT_KEY = "nvidia.com/gpu"
# The chart's CI scenarios: ci/*-values.yaml.
SCENARIOS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))

Doc = dict[str, Any]


# ---------------------------------------------------------------- rendering


class RenderError(Exception):
    """helm template (or lint) failed; the message carries its stderr."""


@dataclass(frozen=True)
class Render:
    """What `helm template` made of one set of values."""

    docs: tuple[Doc, ...]

    def of_kind(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d.get("kind") == kind]

    def named(self, kind: str, suffix: str) -> Doc:
        matches = [d for d in self.of_kind(kind) if d["metadata"]["name"].endswith(suffix)]
        if len(matches) != 1:
            raise KeyError(f"{kind} *{suffix}: {len(matches)} found")
        return matches[0]


def helm_args(
    values_files: Iterable[Path] = (), set_values: Iterable[str] = (), set_json: Iterable[str] = ()
) -> list[str]:
    args: list[str] = []
    for f in values_files:
        args += ["-f", str(f)]
    for s in set_values:
        args += ["--set", s]
    for s in set_json:
        args += ["--set-json", s]
    return args


def run_helm(helm: Path, *args: str, chart: Path = CHART) -> str:
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    if proc.returncode != 0:
        raise RenderError(f"helm {shlex.join(args)} failed:\n{proc.stderr.strip()}")
    return proc.stdout


def render(
    helm: Path, *args: str, chart: Path = CHART, release: str = "fw", namespace: str = "flywheel"
) -> Render:
    """Renders the chart with `helm template` and parses every document."""
    out = run_helm(
        helm,
        "template",
        release,
        str(chart),
        "--namespace",
        namespace,
        "--kube-version",
        MIN_KUBE_VERSION,
        *args,
    )
    return Render(tuple(d for d in yaml.safe_load_all(out) if d))


def pod_specs(docs: Iterable[Doc]) -> Iterator[tuple[str, Doc]]:
    """Every pod spec: Deployments', Pods' (the test hook), and the trainer's Job template (a ConfigMap)."""
    for d in docs:
        name = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield name, d["spec"]["template"]["spec"]
        if d.get("kind") == "Pod":
            yield name, d["spec"]
        for job in embedded_jobs(d):
            yield f"{name}[job.yaml]", job["spec"]["template"]["spec"]


def embedded_jobs(doc: Doc) -> list[Doc]:
    """Jobs carried as data in a ConfigMap (the trainer's Job template)."""
    if doc.get("kind") != "ConfigMap":
        return []
    jobs = []
    for text in (doc.get("data") or {}).values():
        if "kind: Job" in text:
            jobs.append(yaml.safe_load(text))
    return jobs


# ---------------------------------------------------------------- Kubernetes and CRD schemas

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"): "kafkatopic-kafka-v1beta2.json",
}


def is_custom(doc: Doc) -> bool:
    return (doc.get("apiVersion"), doc.get("kind")) in CRD_SCHEMAS


def kubernetes_errors(docs: Iterable[Doc], kube_version: str) -> list[str]:
    """Validates built-in objects (and embedded Jobs) offline against Kubernetes' strict schemas."""
    import kubernetes_validate

    errors = []
    for doc in docs:
        targets = [doc, *embedded_jobs(doc)]
        for obj in targets:
            meta = obj.get("metadata", {})
            where = f"{obj.get('kind')}/{meta.get('name') or meta.get('generateName')}"
            if is_custom(obj):
                continue
            try:
                kubernetes_validate.validate(obj, kube_version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                kind = f"{obj.get('apiVersion')} {obj.get('kind')}"
                errors.append(f"{where}: no Kubernetes {kube_version} schema for {kind}")
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.absolute_path)
                errors.append(f"{where} (k8s {kube_version}) at /{path}: {exc.message}")
    return errors


@cache
def _crd_validator(filename: str) -> Any:
    import jsonschema

    schema = json.loads((SCHEMAS / filename).read_text())
    return jsonschema.Draft202012Validator(schema)


def custom_resource_errors(docs: Iterable[Doc]) -> list[str]:
    """Validates custom resources (ServiceMonitor, PrometheusRule, KafkaTopic) against their CRD schemas."""
    errors = []
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key not in CRD_SCHEMAS:
            continue
        where = f"{doc['kind']}/{doc.get('metadata', {}).get('name')}"
        for err in _crd_validator(CRD_SCHEMAS[key]).iter_errors(doc):
            path = "/".join(str(p) for p in err.absolute_path)
            errors.append(f"{where} at /{path}: {err.message}")
    return errors


def unknown_kinds(docs: Iterable[Doc]) -> list[str]:
    """apiVersion/kind pairs that are neither built in nor covered by a shipped CRD schema."""
    builtin = re.compile(
        r"^(v1|(apps|batch|policy|autoscaling|networking\.k8s\.io|rbac\.authorization\.k8s\.io"
        r"|admissionregistration\.k8s\.io)/v[0-9]+)$"
    )
    return sorted(
        {
            f"{d.get('apiVersion')} {d.get('kind')}"
            for d in docs
            if not is_custom(d) and not builtin.match(str(d.get("apiVersion")))
        }
    )


# ---------------------------------------------------------------- workload policy


def _tolerates(tolerations: list[Doc], key: str) -> bool:
    return any(
        (t.get("operator") == "Exists" and t.get("key") in (key, None)) or t.get("key") == key
        for t in tolerations
    )


def runs_to_completion(where: str) -> bool:
    """Job and test pods: no probes, no serving grace."""
    return "[job.yaml]" in where or where.startswith(("Pod/", "Job/"))


def workload_errors(docs: Iterable[Doc], gpu_resource: str = GPU_TAINT_KEY) -> list[str]:
    """Hardened pods, native probes (gRPC; HTTP for the gateway), graceful stops, GPU pods on the pool."""
    errors = []
    for where, spec in pod_specs(docs):
        psc = spec.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            errors.append(f"{where}: pod securityContext.runAsNonRoot is not true")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            errors.append(f"{where}: pod seccompProfile is not RuntimeDefault")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if not runs_to_completion(where) and grace <= SERVICE_GRACE_S:
            errors.append(f"{where}: terminationGracePeriodSeconds {grace} <= the {SERVICE_GRACE_S} s grace")
        wants_gpu = False
        for c in spec.get("containers", []):
            cname = f"{where} container {c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{cname}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                errors.append(f"{cname}: readOnlyRootFilesystem is not true")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                errors.append(f"{cname}: capabilities do not drop ALL")
            if sc.get("privileged"):
                errors.append(f"{cname}: privileged")
            if ":latest" in c["image"] or (
                "@" not in c["image"] and ":" not in c["image"].rsplit("/", 1)[-1]
            ):
                errors.append(f"{cname}: image {c['image']} is not pinned to a tag or digest")
            if not runs_to_completion(where):
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    if probe not in c:
                        errors.append(f"{cname}: no {probe}")
                kind = "httpGet" if c["name"] in HTTP_SERVICES else "grpc"
                if kind not in c.get("readinessProbe", {}):
                    errors.append(f"{cname}: readinessProbe is not a native {kind} probe")
            limits = c.get("resources", {}).get("limits", {})
            requests = c.get("resources", {}).get("requests", {})
            if gpu_resource in limits:
                wants_gpu = True
            if "memory" not in limits or "cpu" not in requests:
                errors.append(f"{cname}: no memory limit or CPU request")
        if wants_gpu and not _tolerates(spec.get("tolerations", []), GPU_TAINT_KEY):
            errors.append(
                f"{where}: requests {gpu_resource} but does not tolerate the GPU taint {GPU_TAINT_KEY}"
            )
    return errors


def env_of(doc: Doc, container: str | None = None) -> dict[str, str]:
    """The plain env vars of a Deployment's (first or named) container."""
    containers = doc["spec"]["template"]["spec"]["containers"]
    c = next(c for c in containers if container in (None, c["name"]))
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


# ---------------------------------------------------------------- metrics

_METRIC_CLASSES = {
    "Counter": ("_total", "_created"),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_sum", "_count", "_created"),
    "Summary": ("", "_sum", "_count", "_created"),
    "Info": ("_info",),
    "Enum": ("",),
    "CounterMetricFamily": ("_total",),
    "GaugeMetricFamily": ("",),
    "HistogramMetricFamily": ("_bucket", "_sum", "_count"),
    "SummaryMetricFamily": ("_sum", "_count"),
    "InfoMetricFamily": ("_info",),
}
_METRIC_IN_EXPR = re.compile(r"\bflywheel_[a-zA-Z0-9_:]+")


def source_files() -> list[Path]:
    """The Python sources whose metrics Prometheus scrapes: libs and services."""
    files: list[Path] = []
    for base in (ROOT / "libs", ROOT / "services"):
        files += [p for p in base.glob("*/src/**/*.py") if "flywheel_proto/flywheel" not in p.as_posix()]
    return sorted(files)


def exposed_metrics(files: Iterable[Path]) -> dict[str, Path]:
    """Names the code exposes (with the suffixes prometheus_client adds), and where each is defined."""
    exposed: dict[str, Path] = {}
    for path in files:
        try:
            tree = ast.parse(path.read_text(), str(path))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            cls = (
                func.id
                if isinstance(func, ast.Name)
                else func.attr
                if isinstance(func, ast.Attribute)
                else ""
            )
            if cls not in _METRIC_CLASSES:
                continue
            kwargs = {
                k.arg: k.value.value
                for k in node.keywords
                if isinstance(k.value, ast.Constant) and isinstance(k.value.value, str)
            }
            first = node.args[0] if node.args else None
            name = first.value if isinstance(first, ast.Constant) else kwargs.get("name")
            if not isinstance(name, str):
                continue
            name = "_".join([*(kwargs[k] for k in ("namespace", "subsystem") if kwargs.get(k)), name])
            if cls.startswith("Counter"):
                name = name.removesuffix("_total")
            for suffix in _METRIC_CLASSES[cls]:
                exposed[name + suffix] = path
    return exposed


def metrics_in_expr(expr: str) -> set[str]:
    return set(_METRIC_IN_EXPR.findall(expr))


def dashboard_exprs(dashboard: Doc) -> list[str]:
    """The PromQL of every panel target and of every query variable (Grafana's label_values(...) too).

    A datasource variable's `query` is a plugin id ("prometheus"), not PromQL: it is left out.
    """
    exprs: list[str] = []

    def walk(panels: list[Doc]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if "expr" in t)
            walk(p.get("panels", []))

    walk(dashboard.get("panels", []))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        exprs.append(query.get("query", "") if isinstance(query, dict) else str(query or ""))
    return exprs


def rule_exprs(rule_doc: Doc) -> list[str]:
    return [str(r["expr"]) for g in rule_doc["spec"]["groups"] for r in g.get("rules", [])]


def owning_service(metric: str) -> str | None:
    """The service whose code must define a metric (None: the shared library)."""
    for svc in SERVICES:
        if metric.startswith(f"flywheel_{svc}_"):
            return svc
    return None


def service_exists(svc: str) -> bool:
    """The service is written: `python -m flywheel_<svc>` has its entry point."""
    return (ROOT / "services" / svc / "src" / f"flywheel_{svc}" / "__main__.py").is_file()


def dockerfile_of(svc: str) -> Path:
    return ROOT / "services" / svc / "Dockerfile"


def missing_metrics(used: Iterable[str], exposed: dict[str, Path]) -> list[str]:
    return sorted(set(used) - set(exposed))


# ---------------------------------------------------------------- Dockerfiles


@dataclass(frozen=True)
class Instruction:
    line: int
    cmd: str
    args: str


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        cmd, _, args = buf.partition(" ")
        out.append(Instruction(start, cmd.upper(), args.strip()))
        buf = ""
    return out


def copy_sources(text: str) -> list[str]:
    """Paths that COPY/ADD take from the build context (not --from another stage)."""
    sources = []
    for ins in dockerfile_instructions(text):
        if ins.cmd not in ("COPY", "ADD"):
            continue
        words = shlex.split(ins.args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        if words and words[0].startswith("["):
            words = json.loads(ins.args[ins.args.index("[") :])
        sources += words[:-1]
    return sources


def dockerfile_errors(text: str) -> list[str]:
    """House rules: pinned multi-stage bases, locked deps before the source, a non-root user."""
    errors = []
    ins = dockerfile_instructions(text)
    args = {}
    for i in ins:
        if i.cmd == "ARG" and "=" in i.args:
            k, _, v = i.args.partition("=")
            args[k.strip()] = v.strip().strip('"')
    froms = [i for i in ins if i.cmd == "FROM"]
    stages = {i.args.split()[-1] for i in froms if " as " in i.args.lower()}
    if len(froms) < 2:
        errors.append("not multi-stage (fewer than two FROM)")
    for f in froms:
        image = re.sub(r"--platform=\S+\s+", "", f.args).split()[0]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
        if image in stages:
            continue
        if "@sha256:" not in image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            errors.append(f"line {f.line}: base image {image} is not pinned")
    # Per stage: `uv sync --frozen` comes before the sources are copied.
    stage_ins: list[list[Instruction]] = []
    for i in ins:
        if i.cmd == "FROM":
            stage_ins.append([])
        elif stage_ins:
            stage_ins[-1].append(i)
    synced = False
    for stage in stage_ins:
        sync_lines = [i.line for i in stage if i.cmd == "RUN" and "uv sync" in i.args]
        for i in stage:
            if (
                i.cmd == "RUN"
                and "uv sync" in i.args
                and "--frozen" not in i.args
                and "--locked" not in i.args
            ):
                errors.append(f"line {i.line}: uv sync without --frozen/--locked")
        if sync_lines:
            synced = True
            first_sync = min(sync_lines)
            for i in stage:
                if i.cmd == "COPY" and "--from" not in i.args and "/src" in i.args and i.line < first_sync:
                    errors.append(
                        f"line {i.line}: sources copied before the locked dependencies are installed"
                    )
    if not synced:
        errors.append("no `uv sync --frozen`")
    # Every stage that runs something (ENTRYPOINT/CMD) does so as a non-root user.
    for stage in stage_ins:
        if not any(i.cmd in ("ENTRYPOINT", "CMD") for i in stage):
            continue
        users = [i for i in stage if i.cmd == "USER"]
        if not users or users[-1].args.split(":")[0] in ("root", "0"):
            entry = next(i for i in stage if i.cmd in ("ENTRYPOINT", "CMD"))
            errors.append(f"line {entry.line}: the stage runs as root (no non-root USER)")
    return errors


# ---------------------------------------------------------------- skaffold

SKAFFOLD_API_VERSIONS = ("skaffold/v4beta11", "skaffold/v4beta12", "skaffold/v4beta13", "skaffold/v4beta14")
_IMAGE_TEMPLATE = re.compile(r"\{\{\s*\.IMAGE_(REPO|TAG|DIGEST)_([A-Za-z0-9_]+)\s*\}\}")


def apply_patches(config: Doc, patches: Iterable[Doc]) -> Doc:
    """Applies a profile's JSON patches (add, replace, remove), as skaffold does."""
    import copy

    config = copy.deepcopy(config)
    for patch in patches:
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in patch["path"].lstrip("/").split("/")
        ]
        node: Any = config
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        key: Any = int(last) if isinstance(node, list) and last != "-" else last
        if patch["op"] == "remove":
            del node[key]
        elif patch["op"] == "replace":
            if isinstance(node, dict) and key not in node:
                raise KeyError(f"replace of missing {patch['path']}")
            node[key] = patch["value"]
        elif patch["op"] == "add":
            if isinstance(node, list):
                node.insert(len(node) if key == "-" else key, patch["value"])
            else:
                node[key] = patch["value"]
        else:
            raise ValueError(f"unsupported patch op {patch['op']}")
    return config


def skaffold_profile(config: Doc, name: str | None) -> Doc:
    if name is None:
        return config
    profile = next(p for p in config["profiles"] if p["name"] == name)
    merged = apply_patches(config, profile.get("patches", []))
    for section in ("build", "deploy", "manifests"):
        if section in profile:
            merged[section] = profile[section]
    return merged


def image_template_values(template: str) -> str:
    """What skaffold would put in a setValueTemplates entry, with stand-in repo, tag and digest."""

    def sub(m: re.Match[str]) -> str:
        kind, image = m.groups()
        return {
            "REPO": f"registry.example/{image.replace('_', '-')}",
            "TAG": "0.0.0-test",
            "DIGEST": "sha256:" + "0" * 64,
        }[kind]

    return _IMAGE_TEMPLATE.sub(sub, template)


def skaffold_errors(config: Doc, root: Path = ROOT) -> list[str]:
    """apiVersion, artifacts whose Dockerfiles exist, and releases whose chart and values exist."""
    errors = []
    if config.get("apiVersion") not in SKAFFOLD_API_VERSIONS:
        errors.append(
            f"apiVersion {config.get('apiVersion')} is not one of {', '.join(SKAFFOLD_API_VERSIONS)}"
        )
    if config.get("kind") != "Config":
        errors.append("kind is not Config")
    images = set()
    for art in config.get("build", {}).get("artifacts", []):
        images.add(art["image"])
        context = root / art.get("context", ".")
        if context.resolve() != root:
            errors.append(f"{art['image']}: context {art.get('context')} is not the repository root")
        dockerfile = context / art.get("docker", {}).get("dockerfile", "Dockerfile")
        if not dockerfile.is_file():
            errors.append(f"{art['image']}: {dockerfile.relative_to(root)} does not exist")
            continue
        target = art.get("docker", {}).get("target")
        if target:
            stages = {
                i.args.split()[-1] for i in dockerfile_instructions(dockerfile.read_text()) if i.cmd == "FROM"
            }
            if target not in stages:
                errors.append(
                    f"{art['image']}: target {target} is not a stage of {dockerfile.relative_to(root)}"
                )
    for rel in config.get("deploy", {}).get("helm", {}).get("releases", []):
        if not (root / rel["chartPath"] / "Chart.yaml").is_file():
            errors.append(f"release {rel['name']}: no chart at {rel['chartPath']}")
        for vf in rel.get("valuesFiles", []):
            if not (root / vf).is_file():
                errors.append(f"release {rel['name']}: values file {vf} does not exist")
        for key, template in rel.get("setValueTemplates", {}).items():
            for _, image in _IMAGE_TEMPLATE.findall(template):
                if image.replace("_", "-") not in images:
                    errors.append(f"release {rel['name']}: {key} names image {image} that no artifact builds")
    return errors


# ---------------------------------------------------------------- settings


def settings_class(module_name: str, prefix: str) -> Any:
    """The pydantic-settings class of a settings module that reads the env prefix `prefix`."""
    import importlib

    from pydantic_settings import BaseSettings

    module = importlib.import_module(module_name)
    classes = [
        v
        for v in vars(module).values()
        if isinstance(v, type)
        and issubclass(v, BaseSettings)
        and v.__module__ == module.__name__
        and v.model_config.get("env_prefix") == prefix
    ]
    if len(classes) != 1:
        raise LookupError(f"{module_name} defines {len(classes)} settings classes with prefix {prefix}")
    return classes[0]


def settings_env_errors(env: dict[str, str], cls: Any, prefix: str) -> list[str]:
    """Env vars with the prefix that name no settings field (pydantic-settings ignores those silently)."""
    from pydantic import BaseModel

    errors = []
    for name in sorted(env):
        if not name.startswith(prefix):
            continue
        model = cls
        parts = name[len(prefix) :].lower().split("__")
        for i, part in enumerate(parts):
            field = model.model_fields.get(part)
            if field is None:
                errors.append(f"{name}: {model.__name__} has no field {part!r}")
                break
            if i < len(parts) - 1:
                ann = field.annotation
                if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                    errors.append(f"{name}: {model.__name__}.{part} is not a nested model")
                    break
                model = ann
    return errors


# ---------------------------------------------------------------- replaying a Dockerfile's uv steps


def uv_sync_steps(text: str) -> list[tuple[str, list[Instruction], str]]:
    """(stage, the COPYs before it in that stage, the `uv sync ...` command) for each locked install."""
    steps = []
    stage, copies = "", list[Instruction]()
    for ins in dockerfile_instructions(text):
        if ins.cmd == "FROM":
            stage, copies = ins.args.split()[-1], []
        elif ins.cmd == "COPY" and "--from" not in ins.args:
            copies.append(ins)
        elif ins.cmd == "RUN":
            for part in re.split(r"&&|;", ins.args):
                part = re.sub(r"--mount=\S+", "", part).strip()
                if part.startswith("uv sync"):
                    steps.append((stage, list(copies), part))
    return steps


def replay_uv_sync(copies: list[Instruction], command: str, uv: str, python: str, workdir: Path) -> str:
    """Lays out what the COPYs bring into `workdir` and runs the sync as a dry run; returns uv's error."""
    import shutil

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "tests", ".venv")
    for ins in copies:
        *sources, dest = [w for w in shlex.split(ins.args) if not w.startswith("--")]
        target = workdir / dest
        for src in sources:
            path = ROOT / src
            if path.is_dir():
                shutil.copytree(path, target, ignore=ignore, dirs_exist_ok=True)
            elif path.is_file():
                into = target if dest.endswith("/") else target.parent
                into.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, into / path.name if dest.endswith("/") else target)
            else:
                return f"COPY {src}: not in the build context"
    words = shlex.split(command)
    if "--python" in words:
        i = words.index("--python")
        del words[i : i + 2]
    env = {**__import__("os").environ, "UV_PROJECT_ENVIRONMENT": str(workdir / ".venv-dry-run")}
    proc = subprocess.run(
        [uv, *words[1:], "--dry-run", "--offline", "--python", python],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        return proc.stderr.strip()
    # A workspace member installed as a wheel needs its sources, not just its manifest.
    for member in re.findall(r"^ \+ (\S+) @ file://(\S+)$", proc.stdout + proc.stderr, re.M):
        name, path = member
        if not any(Path(path).glob("src/*/__init__.py")):
            return f"{name} is installed from {path} but its sources were not copied"
    return ""
