"""Every vLLM and LMDeploy command line the gateway builds, parsed by that engine's own argument parser.

A flag the engine renamed or dropped fails here, on a CPU machine, instead of on a GPU host at launch. The
lines are the adapters' (engines/adapters) for the shipped configs (deploy/examples/*.yaml), for the flags the
model folder scan adds (engines/discovery: pooling runner, convert, CPU offload), for the configs of the
tests that run real vLLM, and for deploy/k8s/remote/engine-vllm.yaml. Each is parsed by the engine's Python
(tests/e2e/engine_cli_parse.py) with abbreviations off, and, for vLLM, checked by ``vllm serve``'s own
validation of the parsed arguments; a flag the parser marks deprecated fails too.

vLLM's parser comes from the real-vLLM environment (scripts/install-vllm.sh); LMDeploy's from an environment
that has its wheel and only what its CLI imports (scripts/install-lmdeploy.sh: LMDeploy itself needs CUDA to
serve, its parser does not). Each skips, with the install script's reason, where it cannot be installed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from engines.adapters import adapter_for
from engines.discovery.policy import OFFLOAD_FLAG, kind_args
from engines.spec import ModelSpec
from gateway.config.loader import build_config
from tests.e2e.conftest import VLLM_ENV

ROOT = Path(__file__).resolve().parents[2]
PARSE = Path(__file__).with_name("engine_cli_parse.py")
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))

Line = tuple[str, list[str]]  # (where it comes from, argv without the executable)


def _spec(engine: str, **fields: Any) -> ModelSpec:
    return ModelSpec.model_validate({"name": "m", "engine": engine, "model": "/models/m", **fields})


def _argv(spec: ModelSpec) -> list[str]:
    """The adapter's command line without the executable (``command:`` may be several words, e.g. nice)."""
    argv = adapter_for(spec.engine).argv(spec, spec.host, spec.port or 8000)
    return argv[len(spec.command) if spec.command else 1 :]


def example_lines(engine: str) -> list[Line]:
    lines = []
    for path in EXAMPLES:
        for spec in build_config(yaml.safe_load(path.read_text())).models:
            if spec.engine == engine:
                lines.append((f"deploy/examples/{path.name}: {spec.name}", _argv(spec)))
    return lines


def vllm_lines() -> list[Line]:
    lines = example_lines("vllm")
    lines.append(("tensor parallel, aliases", _argv(_spec("vllm", gpus=[0, 1], aliases=["a", "b"]))))
    for kind in ("embedding", "rerank"):  # what the model folder scan adds for pooling models
        for generative in (False, True):
            args = kind_args("vllm", kind, generative)
            lines.append((f"discovered {kind} (generative={generative})", _argv(_spec("vllm", args=args))))
    lines.append(("discovered, CPU offload", _argv(_spec("vllm", args={OFFLOAD_FLAG["vllm"]: 12.5}))))
    # tests/e2e/test_vllm_real.py and tests/bench/vllm_serve.py: what runs here against the real server.
    real = {
        "max-model-len": 2048,
        "dtype": "bfloat16",
        "enable-auto-tool-choice": True,
        "tool-call-parser": "pythonic",
        "enable-log-requests": True,
    }
    lines.append(("tests/e2e/test_vllm_real.py: chat", _argv(_spec("vllm", args=real, env=VLLM_ENV))))
    lines.append(("tests/e2e/test_vllm_real.py: VL", _argv(_spec("vllm", args={"model-impl": "transformers"}))))
    # A value of false is written --no-FLAG for vLLM (render_flags(negate_false=True)).
    lines.append(("a false boolean", _argv(_spec("vllm", args={"enable-prefix-caching": False}))))
    lines.append(("config args: api key, revision", _argv(_spec("vllm", args={"api-key": "k", "revision": "v1"}))))
    # sleep: on GPUs the adapter adds --enable-sleep-mode (issue 17; never without GPUs: the CPU build refuses it)
    for level in (1, 2):
        sleepy = _argv(_spec("vllm", gpus=[0, 1], sleep={"level": level}))
        assert "--enable-sleep-mode" in sleepy
        lines.append((f"sleep level {level} on GPUs", sleepy))
    (k8s,) = [
        d
        for d in yaml.safe_load_all((ROOT / "deploy/k8s/remote/engine-vllm.yaml").read_text())
        if d["kind"] == "Deployment"
    ]
    (container,) = k8s["spec"]["template"]["spec"]["containers"]
    lines.append(("deploy/k8s/remote/engine-vllm.yaml", [str(a) for a in container["args"]]))
    return lines


def lmdeploy_lines() -> list[Line]:
    lines = example_lines("lmdeploy")
    lines.append(("one GPU", _argv(_spec("lmdeploy", gpus=[2]))))
    lines.append(
        ("tensor parallel, pytorch backend", _argv(_spec("lmdeploy", gpus=[2, 3], args={"backend": "pytorch"})))
    )
    lines.append(("config args: revision", _argv(_spec("lmdeploy", args={"revision": "v1"}))))
    lines.append(("sleep level 1", _argv(_spec("lmdeploy", gpus=[2], sleep={"level": 1}))))
    return lines


# Lines the parser must refuse: the check is not vacuous, and abbreviations and renames are caught.
REFUSED = {
    "vllm": [["serve", "/models/m", "--max-model", "512"], ["serve", "/models/m", "--tp-size", "2"]],
    "lmdeploy": [["serve", "api_server", "/models/m", "--port", "1"], ["serve", "api_server", "/m", "--session", "5"]],
}


def parse(venv: Path, engine: str, lines: list[list[str]]) -> list[dict[str, Any]]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), **VLLM_ENV}
    done = subprocess.run(
        [str(venv / "bin" / "python"), str(PARSE), engine],
        input=json.dumps(lines),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and results, f"{PARSE.name} {engine} exited {done.returncode}:\n{done.stderr[-3000:]}"
    parsed: list[dict[str, Any]] = json.loads(results[-1].removeprefix("RESULTS "))
    return parsed


def check(venv: Path, engine: str, lines: list[Line]) -> None:
    refused = REFUSED[engine]
    results = parse(venv, engine, [argv for _, argv in lines] + refused)
    wrong = [
        f"{where}: {' '.join(argv)}\n    {r['error'] or 'deprecated: ' + ', '.join(r['deprecated'])}"
        for (where, argv), r in zip(lines, results, strict=False)
        if not r["ok"] or r["deprecated"]
    ]
    assert not wrong, f"{engine} refuses command lines the gateway builds:\n" + "\n".join(wrong)
    passed = [argv for argv, r in zip(refused, results[len(lines) :], strict=True) if r["ok"]]
    assert not passed, f"{engine}'s parser took lines it must refuse (the check would prove nothing): {passed}"


@pytest.fixture(scope="session")
def lmdeploy_venv() -> Path:
    """LMDeploy's CLI, installed once per machine by ``scripts/install-lmdeploy.sh`` (skip with its reason)."""
    script = ROOT / "scripts" / "install-lmdeploy.sh"
    done = subprocess.run([str(script)], capture_output=True, text=True, timeout=1800)
    if done.returncode == 3:
        pytest.skip(f"LMDeploy's CLI cannot be installed here: {done.stderr.strip()}")
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stderr}"
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.mark.lmdeploy
@pytest.mark.timeout(1800)  # the first run on a machine installs (about a minute)
def test_lmdeploy_parses_every_command_line(lmdeploy_venv: Path) -> None:
    lines = lmdeploy_lines()
    assert any(where.startswith("deploy/examples/") for where, _ in lines)
    check(lmdeploy_venv, "lmdeploy", lines)


@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_vllm_parses_every_command_line(vllm_venv: Path) -> None:
    lines = vllm_lines()
    assert any(where.startswith("deploy/examples/") for where, _ in lines)
    check(vllm_venv, "vllm", lines)
