"""Command lines of ``vllm serve`` (0.33) and ``lmdeploy serve api_server`` (0.18), as ENGINES.md §1-2 lists them.

Unknown or misspelled flags end the process with argparse's exit code 2, as the real CLIs do, so a
gateway that renders a wrong flag fails here as it would on a GPU box. Abbreviations are refused
(``allow_abbrev=False``): a truncated flag that argparse would silently complete is a gateway bug.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

VLLM_VERSION = "0.33.0"
LMDEPLOY_VERSION = "0.18.0"
VLLM_DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
DEFAULT_MAX_MODEL_LEN = 8192
BOOL = argparse.BooleanOptionalAction


@dataclass
class EngineConfig:
    """What the running stand-in needs from the command line, engine-neutral."""

    engine: str  # "vllm" | "lmdeploy"
    model: str
    served_names: list[str]
    host: str
    port: int
    uds: str | None = None
    api_keys: list[str] = field(default_factory=list)
    tp: int = 1
    pp: int = 1
    executor: str | None = None
    backend: str = "turbomind"
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    image_limit: int = 999
    allowed_media_domains: list[str] | None = None
    allowed_local_media_path: str | None = None
    access_log: bool = True
    quiet_uvicorn: bool = False  # uvicorn log level above info: no startup or access lines
    no_log_paths: tuple[str, ...] = ()
    request_id_headers: bool = False
    force_include_usage: bool = False
    sse_keep_alive: float = 0.0
    shutdown_timeout: float = 0.0
    metrics: bool = True
    tool_parser: str | None = None
    auto_tool_choice: bool = False  # vLLM --enable-auto-tool-choice
    log_requests: bool = False  # vLLM --enable-log-requests: "Request ... aborted." lines
    sleep_mode: bool = False  # vLLM --enable-sleep-mode: a sleep frees GPU memory (without it, nothing)
    dev_mode: bool = False  # vLLM VLLM_SERVER_DEV_MODE=1: /sleep, /wake_up, /is_sleeping, /collective_rpc exist
    non_default: dict[str, Any] = field(default_factory=dict)


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON: {exc}") from None


def _human_int(text: str) -> int | None:
    """vLLM's ``--max-model-len``: ``1k``=1000, ``1K``=1024, ``25.6k``, ``-1``/``auto`` mean "largest that fits"."""
    if text.strip().lower() in ("auto", "-1"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgKMG]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid human-readable integer: {text!r}")
    unit = m.group(2)
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def _normalize(argv: list[str]) -> list[str]:
    """FlexibleArgumentParser: ``--a_b`` == ``--a-b``; ``--x.key v`` folds into ``--x '{"key": v}'``."""
    out: list[str] = []
    dotted: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            out.append(arg)
            continue
        key, eq, value = arg.partition("=")
        key = key.replace("_", "-")
        if "." in key:
            base, _, sub = key.partition(".")
            if not eq:
                if i >= len(argv):
                    out.append(key)  # let argparse report the missing value
                    continue
                value = argv[i]
                i += 1
            try:
                parsed: Any = json.loads(value)
            except ValueError:
                parsed = value
            node = dotted.setdefault(base, {})
            *path, leaf = sub.split(".")
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = parsed
            continue
        out.append(f"{key}={value}" if eq else key)
    for base, value in dotted.items():
        out += [base, json.dumps(value)]
    return out


def _config_file_args(path: str) -> list[str]:
    """``vllm serve --config file.yaml``: its keys become flags placed before the command line's own."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        import yaml  # type: ignore[import-untyped]  # optional: the venv has PyYAML, a bare python3 may not

        data = yaml.safe_load(text)
    except ImportError:
        data = json.loads(text)
    args: list[str] = []
    for key, value in (data or {}).items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + flag[2:])
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        elif isinstance(value, dict):
            args += [flag, json.dumps(value)]
        elif value is not None:
            args += [flag, str(value)]
    return args


def _vllm_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vllm", description="vLLM CLI", allow_abbrev=False)
    top.add_argument("-v", "--version", action="version", version=VLLM_VERSION)
    sub = top.add_subparsers(dest="subparser", required=True)
    p = sub.add_parser("serve", help="Launch a local OpenAI-compatible API server", allow_abbrev=False)
    a = p.add_argument
    a("model_tag", nargs="?", default=None, help=f"model (default: {VLLM_DEFAULT_MODEL})")
    a("--model", default=None)
    a("--config", default=None)
    a("--served-model-name", nargs="+", default=None)
    a("--host", default=None)
    a("--port", type=int, default=8000)
    a("--uds", default=None)
    a("--tensor-parallel-size", "-tp", type=int, default=1)
    a("--pipeline-parallel-size", "-pp", type=int, default=1)
    a("--data-parallel-size", "-dp", type=int, default=1)
    a("--data-parallel-size-local", "-dpl", type=int, default=None)
    a("--data-parallel-address", "-dpa", default=None)
    a("--data-parallel-rpc-port", "-dpp", type=int, default=None)
    a("--data-parallel-backend", "-dpb", default="mp")
    a("--api-server-count", "-asc", type=int, default=None)
    a("--gpu-memory-utilization", "--device-memory-utilization", type=float, default=0.92)
    a("--max-model-len", type=_human_int, default=None)
    a("--dtype", choices=["auto", "half", "float16", "bfloat16", "float", "float32"], default="auto")
    a("--trust-remote-code", action=BOOL, default=False)
    a("--chat-template", default=None)
    a("--chat-template-content-format", choices=["auto", "string", "openai"], default="auto")
    a("--default-chat-template-kwargs", type=_json_arg, default=None)
    a("--trust-request-chat-template", action=BOOL, default=False)
    a("--limit-mm-per-prompt", type=_json_arg, default=None)
    a("--mm-processor-kwargs", type=_json_arg, default=None)
    a("--media-io-kwargs", type=_json_arg, default=None)
    a("--enable-mm-embeds", action=BOOL, default=False)
    a("--language-model-only", action=BOOL, default=False)
    a("--trust-request-mm-kwargs", action=BOOL, default=False)
    a("--enable-prompt-embeds", action=BOOL, default=False)
    a("--allowed-media-domains", nargs="+", default=None)
    a("--allowed-local-media-path", default="")
    a("--api-key", nargs="+", default=None)
    a("--distributed-executor-backend", choices=["ray", "mp", "uni", "external_launcher"], default=None)
    a("--quantization", "-q", default=None)
    a("--quantization-config", type=_json_arg, default=None)
    a("--kv-cache-dtype", default="auto")
    a("--enforce-eager", action=BOOL, default=False)
    a("--max-num-seqs", type=int, default=None)
    a("--max-num-batched-tokens", type=int, default=None)
    a("--enable-prefix-caching", action=BOOL, default=None)
    a("--disable-log-stats", action=BOOL, default=False)
    a("--enable-log-requests", action=BOOL, default=False)
    a("--uvicorn-log-level", choices=["critical", "error", "warning", "info", "debug", "trace"], default="info")
    a("--disable-uvicorn-access-log", action=BOOL, default=False)
    a("--disable-access-log-for-endpoints", default=None)
    a("--shutdown-timeout", type=int, default=0)
    a("--enable-force-include-usage", action=BOOL, default=False)
    a("--sse-keep-alive-interval", type=float, default=0.0)
    a("--enable-server-load-tracking", action=BOOL, default=False)
    a("--enable-request-id-headers", action=BOOL, default=False)
    a("--allowed-origins", type=_json_arg, default=[])
    a("--log-level", choices=["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", "NOTSET"], default=None)
    a("--show-hidden-metrics-for-version", default=None)
    a("--h11-max-header-count", type=int, default=256)
    a("--h11-max-incomplete-event-size", type=int, default=4194304)
    a("--enable-scale-out", action=BOOL, default=False)
    a("--tokens-only", action=BOOL, default=False)
    a("--enable-sleep-mode", action=BOOL, default=False)
    # Not in ENGINES.md, but in every real vLLM and in many deployment configs.
    a("--seed", type=int, default=None)
    a("--tokenizer", default=None)
    a("--revision", default=None)
    a("--download-dir", default=None)
    a("--generation-config", default="auto")
    a("--tool-call-parser", default=None)
    a("--enable-auto-tool-choice", action=BOOL, default=False)
    a("--reasoning-parser", default=None)
    return top


def _lmdeploy_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lmdeploy", description="LMDeploy CLI", allow_abbrev=False)
    cmds = top.add_subparsers(dest="command", required=True)
    serve = cmds.add_parser("serve", help="Serve LLMs with gradio, openai API or triton server.", allow_abbrev=False)
    kinds = serve.add_subparsers(dest="serve_kind", required=True)
    p = kinds.add_parser("api_server", help="Serve LLMs with restful api using fastapi.", allow_abbrev=False)
    a = p.add_argument
    a("model_path", help="local directory or huggingface model id")
    a("--model-name", default=None)
    a("--server-name", default="0.0.0.0")
    a("--server-port", type=int, default=23333)
    a("--backend", choices=["pytorch", "turbomind"], default="turbomind")
    a("--tp", type=int, default=1)
    a("--dp", type=int, default=1)
    a("--ep", type=int, default=1)
    a("--cp", type=int, default=1)
    a("--nnodes", type=int, default=1)
    a("--node-rank", type=int, default=0)
    a("--dist-init-addr", default=None)
    a("--session-len", type=int, default=None)
    a("--cache-max-entry-count", type=float, default=0.8)
    a("--num-gpu-blocks", type=int, default=0)
    a("--cache-block-seq-len", type=int, default=64)
    a("--quant-policy", default="none")
    a("--dtype", choices=["auto", "float16", "bfloat16"], default="auto")
    a("--model-format", choices=["hf", "awq", "gptq", "compressed-tensors", "fp8", "mxfp4"], default=None)
    a("--vision-max-batch-size", type=int, default=1)
    a("--api-keys", nargs="*", default=None)
    a(
        "--log-level",
        choices=["CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET"],
        default="WARNING",
    )
    a("--distributed-executor-backend", choices=["uni", "mp", "ray"], default=None)
    a("--trust-remote-code", action="store_true")
    a("--chat-template", default=None)
    a("--allowed-media-domains", nargs="+", default=None)
    a("--disable-metrics", action="store_true")
    a("--max-batch-size", type=int, default=None)
    a("--max-prefill-token-num", type=int, default=8192)
    a("--enable-prefix-caching", action="store_true")
    a("--eager-mode", action="store_true")
    a("--max-concurrent-requests", type=int, default=None)
    a("--max-log-len", type=int, default=None)
    a("--tool-call-parser", default=None)
    a("--reasoning-parser", default=None)
    a("--logprobs-mode", default=None)
    a("--adapters", nargs="*", default=None)
    a("--allow-origins", nargs="+", default=["*"])
    a("--allow-methods", nargs="+", default=["*"])
    a("--allow-headers", nargs="+", default=["*"])
    a("--allow-credentials", action="store_true")
    a("--ssl", action="store_true")
    a("--proxy-url", default=None)
    a("--allow-terminate-by-client", action="store_true")
    a("--enable-abort-handling", action="store_true")
    a("--disable-fastapi-docs", action="store_true")
    a("--generation-config", default="auto")
    a("--device", choices=["cuda", "ascend", "maca", "camb"], default="cuda")
    a("--revision", default=None)
    a("--download-dir", default=None)
    return top


def _non_default(parser: argparse.ArgumentParser, ns: argparse.Namespace, skip: tuple[str, ...]) -> dict[str, Any]:
    defaults = vars(parser.parse_args(list(skip)))
    return {k: v for k, v in vars(ns).items() if k in defaults and defaults[k] != v}


def _serve_parser(top: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    node = top
    for name in names:
        action = next(a for a in node._actions if isinstance(a, argparse._SubParsersAction))
        node = action.choices[name]
    return node


def parse_vllm(argv: list[str]) -> EngineConfig:
    top = _vllm_parser()
    argv = _normalize(argv)
    if "--config" in argv[:-1]:
        i = argv.index("--config")
        rest = argv[:i] + argv[i + 2 :]
        # After ``serve MODEL``: a list-valued key right before the positional would swallow it.
        head = 2 if len(rest) > 1 and not rest[1].startswith("-") else 1
        argv = rest[:head] + _normalize(_config_file_args(argv[i + 1])) + rest[head:]
    ns = top.parse_args(argv)
    model = ns.model_tag or ns.model or VLLM_DEFAULT_MODEL
    keys = ns.api_key or ([os.environ["VLLM_API_KEY"]] if os.environ.get("VLLM_API_KEY") else [])
    limit = (ns.limit_mm_per_prompt or {}).get("image", 999)
    if isinstance(limit, dict):
        limit = limit.get("count", 999)
    level = ns.uvicorn_log_level
    serve = _serve_parser(top, "serve")
    try:  # envs.py: bool(int(os.getenv("VLLM_SERVER_DEV_MODE", "0"))); "true" is a ValueError at start
        dev_mode = bool(int(os.environ.get("VLLM_SERVER_DEV_MODE", "0")))
    except ValueError as exc:
        sys.stderr.write(f"Traceback (most recent call last):\nValueError: {exc}\n")
        sys.exit(1)
    return EngineConfig(
        engine="vllm",
        model=model,
        served_names=ns.served_model_name or [model],
        host=ns.host if ns.host is not None else "0.0.0.0",
        port=ns.port,
        uds=ns.uds,
        api_keys=keys,
        tp=ns.tensor_parallel_size,
        pp=ns.pipeline_parallel_size,
        executor=ns.distributed_executor_backend,
        max_model_len=ns.max_model_len or DEFAULT_MAX_MODEL_LEN,
        image_limit=int(limit),
        allowed_media_domains=ns.allowed_media_domains,
        allowed_local_media_path=ns.allowed_local_media_path or None,
        access_log=not ns.disable_uvicorn_access_log,
        quiet_uvicorn=level in ("warning", "error", "critical"),
        no_log_paths=tuple(p for p in (ns.disable_access_log_for_endpoints or "").split(",") if p),
        request_id_headers=ns.enable_request_id_headers,
        force_include_usage=ns.enable_force_include_usage,
        sse_keep_alive=ns.sse_keep_alive_interval,
        shutdown_timeout=float(ns.shutdown_timeout),
        tool_parser=ns.tool_call_parser,
        auto_tool_choice=ns.enable_auto_tool_choice,
        log_requests=ns.enable_log_requests,
        sleep_mode=ns.enable_sleep_mode,
        dev_mode=dev_mode,
        non_default={"model_tag": model, **_non_default(serve, ns, ())},
    )


def parse_lmdeploy(argv: list[str]) -> EngineConfig:
    top = _lmdeploy_parser()
    ns = top.parse_args(_normalize(argv))
    if ns.ssl:
        # Serving TLS would need certificates the tests do not have; refuse loudly instead of serving plain HTTP.
        sys.stderr.write("standin: lmdeploy --ssl is not reproduced by the stand-in\n")
        sys.exit(1)
    name = ns.model_name or ns.model_path
    adapters = [a.split("=", 1)[0] if "=" in a else "default" for a in (ns.adapters or [])]
    level = os.environ.get("UVICORN_LOG_LEVEL", "info").lower()
    return EngineConfig(
        engine="lmdeploy",
        model=ns.model_path,
        served_names=[name, *adapters],
        host=ns.server_name,
        port=ns.server_port,
        api_keys=list(ns.api_keys or []),
        tp=ns.tp,
        executor=ns.distributed_executor_backend,
        backend=ns.backend,
        max_model_len=ns.session_len or DEFAULT_MAX_MODEL_LEN,
        allowed_media_domains=ns.allowed_media_domains,
        quiet_uvicorn=level in ("warning", "error", "critical"),
        metrics=not ns.disable_metrics,
        tool_parser=ns.tool_call_parser,
        non_default=_non_default(_serve_parser(top, "serve", "api_server"), ns, (ns.model_path,)),
    )
