"""The command line: ``gateway serve | check | download | demo-model``."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import shlex
import sys
from typing import Any

from gateway.commands import download
from gateway.config.loader import Config, ConfigError, load_config

log = logging.getLogger("gateway")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible gateway that owns its engines.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway and its engines")
    serve.add_argument("--config", help="YAML config file (see deploy/examples/)")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    check = sub.add_parser("check", help="validate a config and print each engine's command line")
    check.add_argument("--config", required=True)
    download.add_arguments(sub.add_parser("download", help="fetch model weights from the Hugging Face hub (resumable)"))
    demo = sub.add_parser("demo-model", help="make the tiny local models of the CPU demo (offline, seconds)")
    demo.add_argument("--path", required=True, help="folder for the tiny chat model")
    demo.add_argument("--vl-path", help="folder for the tiny vision-language model")
    demo.add_argument("--force", action="store_true")
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config: Config, *, config_path: str | None = None, overrides: dict[str, Any] | None = None) -> int:
    from gateway.app import create_app
    from gateway.http.server import uvicorn_config
    from gateway.http.shutdown import DrainingServer, Shutdown
    from gateway.observability.log_setup import configure_logging

    s = config.server
    configure_logging(s.log_level, s.log_format)
    if not config.auth.api_keys and not _is_loopback(s.host):
        log.warning(
            "NO API KEYS ARE CONFIGURED and the gateway listens on %s: anyone who can reach port %d "
            "can use every model. Add auth.api_keys to the config.",
            s.host,
            s.port,
        )
    fleet, where = None, {"host": s.host, "port": s.port}
    if s.workers > 1:
        from gateway.workers.fleet import Fleet, bind, make_run_dir, remove_run_dir
        from gateway.workers.lease_server import Liveness

        try:
            listener = bind(s.host, s.port)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", s.host, s.port, exc.strerror or exc)
            return 1
        liveness = Liveness(s.worker_ping_interval, s.worker_ping_timeout)
        fleet = Fleet(s.workers, listener, make_run_dir(), liveness)
        where = {"uds": fleet.owner_socket}  # the owner answers only its workers; they answer clients
    # The stages a signal drives (gateway/http/shutdown.py); the app's lifespan attaches what it starts.
    shutdown = Shutdown(s.drain_timeout)
    app = create_app(
        config, config_path=config_path, server_overrides=overrides, workers=fleet, shutdown=shutdown
    )  # the path: reloads
    try:
        DrainingServer(uvicorn_config(app, s, **where), shutdown).run()
    finally:
        if fleet is not None:
            fleet.listener.close()
            remove_run_dir(fleet.run_dir)
    return 0


def check(config: Config) -> int:
    from engines.adapters import adapter_for
    from engines.discovery import report
    from engines.replica.snapshot import redact_argv

    found = config.discovered
    if found is not None:
        print(report.header(found))
    for spec in config.models:
        adapter = adapter_for(spec.engine)
        names = ", ".join(spec.served_names)
        print(f"{spec.name}  [{spec.engine}, {spec.load}]  serves: {names}")
        planned = found.planned(spec.name) if found is not None and spec.source == "discovered" else None
        if planned is not None:  # the plan: folder → kind → engine → GPUs, then the command line below
            print(f"  {report.plan_line(planned)}")
        if not adapter.spawns:
            print(f"  remote: {spec.url}")
            continue
        argv = adapter.argv(spec, spec.host, spec.port or 0)
        if spec.port is None:  # the port is picked free at each launch
            argv = [
                "<free port>" if a == "0" and flag in ("--port", "--server-port") else a
                for flag, a in zip(["", *argv], argv, strict=False)
            ]
        # Secret values (--api-key, HF_TOKEN...) hidden by the snapshot's rule: this output ends up in CI logs.
        argv = redact_argv(argv)
        env = " ".join(
            f"{k}={shlex.quote(redact_argv([f'--{k}', v])[1])}" for k, v in sorted(adapter.env(spec).items())
        )
        print(f"  {env} {shlex.join(argv)}" if env else f"  {shlex.join(argv)}")
    for line in report.footer(found) if found is not None else ():
        print(line)
    print(f"config OK: {len(config.models)} model(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "download":
        return download.run(args)
    if args.command == "demo-model":
        from gateway.commands import demo_model

        return demo_model.main(
            [
                "--path",
                args.path,
                *(["--vl-path", args.vl_path] if args.vl_path else []),
                *(["--force"] if args.force else []),
            ]
        )
    if args.command == "serve":
        # Loading the config may already log (model discovery's warnings): in the server's format from the
        # start, so a JSON log pipeline never sees a bare line. The config's own settings apply once it is read.
        from gateway.observability.log_setup import configure_logging

        level, fmt = os.environ.get("GATEWAY_LOG_LEVEL", "info").lower(), os.environ.get("GATEWAY_LOG_FORMAT", "")
        configure_logging(
            level if level in ("debug", "info", "warning", "error") else "info",
            "json" if fmt.lower() == "json" else "text",
        )
    try:
        config = load_config(args.config)
        if args.command == "serve" and (args.host or args.port is not None):
            server = config.server.model_copy(
                update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
            )
            config = config.model_copy(update={"server": server})
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        return check(config)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    return serve(config, config_path=args.config, overrides=overrides)
