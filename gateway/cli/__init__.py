"""`gateway` command line: serve, check the configuration, list models, make keys, explain policy,
render the Kubernetes manifests."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from gateway.cli import deploy
from gateway.store import cli as store_cli
from gateway.cli.server import DrainingServer, http_protocol
from gateway.cli.tables import format_formats, format_matrix, format_model_table
from gateway.policy.decide import decide
from gateway.errors import ConfigError
from gateway.observability.lines import LineSink, LineSinkHandler, SecondCachedFormatter
from gateway.registry import Registry, load_registry
from gateway.settings import get_settings
from gateway.snapshot import load_config
from gateway.tenancy.tenants import TenantDirectory, load_tenants, new_key


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args.host, args.port)
    if args.command == "usage":
        return _usage_report(args)
    if args.command == "keys":
        key, key_hash = new_key()
        print(f"API key for tenant '{args.tenant}' (shown once, store it now):\n  {key}")
        print(f"Add this line under the tenant's api_key_hashes in the tenants file:\n  - \"{key_hash}\"")
        return 0
    if args.command == "deploy":
        return deploy.run(args)
    if args.command == "db":
        return store_cli.run(args)
    try:
        paths = [Path(p) for arg in args.registry or () for p in str(arg).split(",") if p]  # as GATEWAY_REGISTRY
        registry = load_registry(paths or get_settings().registry_paths)
        tenants = _tenants(args, registry)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    return _report(args, registry, tenants)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="License-aware OpenAI-compatible LLM gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    keys = commands.add_parser("keys", help="make an API key")
    keys.add_argument("action", choices=["new"])
    keys.add_argument("--tenant", required=True)
    usage = commands.add_parser("usage", help="usage by tenant x license x model from audit files")
    usage.add_argument("action", choices=["report"])
    usage.add_argument("files", nargs="+", type=Path, help="audit files (JSON lines), one per replica")
    usage.add_argument("--since", help="start (inclusive): unix seconds or ISO time, UTC by default")
    usage.add_argument("--until", help="end (exclusive): unix seconds or ISO time, UTC by default")
    usage.add_argument("--format", choices=["table", "csv", "json"], default="table")
    _with_config(commands.add_parser("check", help="validate the registry (and tenants) files"))
    models = _with_config(commands.add_parser("models", help="print the model table"))
    models.add_argument("--formats", action="store_true", help="list prompt formats and their models")
    policy = _with_config(commands.add_parser("policy", help="explain license decisions"))
    policy.add_argument("action", choices=["explain", "matrix"])
    policy.add_argument("--tenant")
    policy.add_argument("--model")
    deploy.add_parser(commands)
    store_cli.add_parser(commands)
    return parser


def _with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub.add_argument("--registry", action="append", type=Path,
                     help="registry file (repeat for overlays); default: GATEWAY_REGISTRY")
    sub.add_argument("--tenants", type=Path, help="tenants file; default: GATEWAY_TENANTS")
    return sub


def _tenants(args: argparse.Namespace, registry: Registry) -> TenantDirectory | None:
    path = args.tenants or get_settings().tenants
    return load_tenants(path, registry) if path else None


def _report(args: argparse.Namespace, registry: Registry, tenants: TenantDirectory | None) -> int:
    if args.command == "check":
        count = f", {len(tenants.tenants)} tenants" if tenants else ""
        print(f"ok: {len(registry.models)} models, {len(registry.licenses)} licenses{count}")
        return 0
    if args.command == "models":
        print(format_formats(registry) if args.formats else format_model_table(registry))
        return 0
    if tenants is None:
        print("policy needs a tenants file: --tenants FILE or GATEWAY_TENANTS", file=sys.stderr)
        return 2
    if args.action == "matrix":
        print(format_matrix(registry, tenants))
        return 0
    tenant, model = tenants.tenants.get(args.tenant or ""), registry.model(args.model or "")
    if tenant is None or model is None:
        print(f"unknown {'tenant' if tenant is None else 'model'}: "
              f"{args.tenant if tenant is None else args.model}", file=sys.stderr)
        return 2
    decision = decide(tenant, model, registry)
    print(f"{decision.verdict.value} ({decision.rule}): {decision.reason}")
    if decision.served_model and decision.served_model != model.id:
        print(f"served model: {decision.served_model}")
    return 0


def _usage_report(args: argparse.Namespace) -> int:
    from gateway.usage.report import build, parse_time, render

    try:
        since, until = (parse_time(t) if t else None for t in (args.since, args.until))
    except ValueError as exc:
        print(f"bad --since/--until: {exc}", file=sys.stderr)
        return 2
    report = build(args.files, since, until)
    for problem in report.problems:
        print(problem, file=sys.stderr)
    print(render(report, args.format))
    return 0


def _serve(host: str | None, port: int | None) -> int:
    import uvicorn

    settings = get_settings()
    try:
        load_config(settings)  # fail here with a clean message, not inside uvicorn
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    bind = host or settings.host
    if settings.tenants is None and not _is_loopback(bind) and not settings.allow_open_access:
        print(f"refusing to serve without a tenants file (GATEWAY_TENANTS) on {bind}: open access (any "
              "bearer token) is for loopback only; set GATEWAY_ALLOW_OPEN_ACCESS=true to allow it anyway",
              file=sys.stderr)
        return 1
    # Log lines leave in batches from a writer thread: the event loop never waits on stderr.
    _lean_log_records()
    handler = LineSinkHandler(LineSink(sys.stderr))
    handler.setFormatter(SecondCachedFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
    config = uvicorn.Config("gateway.api.app:create_app", factory=True, host=bind,
                            port=port or settings.port, log_level=settings.log_level, loop="uvloop",
                            http=http_protocol(settings.header_timeout_s), timeout_graceful_shutdown=5,
                            limit_concurrency=settings.max_connections,  # beyond: 503, before any work
                            timeout_keep_alive=settings.keepalive_timeout_s,
                            access_log=False)  # ours is JSON, with the request id (gateway.access)
    DrainingServer(config, settings.drain_timeout_s).run()
    return 0


def _lean_log_records() -> None:
    """The format below uses no caller, thread or process fields; not collecting them (the logging
    HOWTO's "Optimization" section) cut the access log's cost per request by a third."""
    logging._srcfile = None  # type: ignore[attr-defined]  # no stack walk for the caller's file and line
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    sys.exit(main())
