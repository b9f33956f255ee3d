"""`gateway` command line: serve, check the configuration, list models, manage keys, explain policy and
read its log, report usage, migrate the database, render the Kubernetes manifests."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from gateway.cli import config, deploy, keys, records
from gateway.store import cli as store_cli
from gateway.cli.server import DrainingServer, http_protocol
from gateway.cli.tables import format_formats, format_matrix, format_model_table
from gateway.policy.decide import decide
from gateway.errors import ConfigError
from gateway.observability.lines import LineSink, LineSinkHandler, SecondCachedFormatter
from gateway.registry import Registry, load_registry
from gateway.settings import get_settings
from gateway.snapshot import load_config
from gateway.tenancy.tenants import TenantDirectory, load_tenants


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args.host, args.port)
    if args.command == "usage":
        return _usage_report(args)
    if args.command == "keys":
        return keys.run(args)
    if args.command == "policy" and args.action == "log":
        return records.policy_log(args)
    if args.command == "deploy":
        return deploy.run(args)
    if args.command == "db":
        return store_cli.run(args)
    files = config.resolve(args.registry, args.tenants)
    print(files.describe(), file=sys.stderr)  # stderr: stdout stays the table or verdict alone
    try:
        registry = load_registry(files.registry)
        tenants = load_tenants(files.tenants, registry) if files.tenants else None
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        hint = config.missing_registry_hint(files.registry)
        if hint:
            print(hint, file=sys.stderr)
        return 1
    return _report(args, registry, tenants)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="License-aware OpenAI-compatible LLM gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    keys.add_parser(commands)
    usage = commands.add_parser("usage", help="usage by tenant x license x model, from the database (or audit files)")
    usage.add_argument("action", choices=["report"])
    usage.add_argument("files", nargs="*", type=Path,
                       help="audit files (JSON lines), one per replica; none: the usage ledger in the database")
    usage.add_argument("--since", help="start (inclusive): unix seconds or ISO time, UTC by default")
    usage.add_argument("--until", help="end (exclusive): unix seconds or ISO time, UTC by default")
    usage.add_argument("--format", choices=["table", "csv", "json"], default="table")
    _with_config(commands.add_parser("check", help="validate the registry (and tenants) files"))
    models = _with_config(commands.add_parser("models", help="print the model table"))
    models.add_argument("--formats", action="store_true", help="list prompt formats and their models")
    models.add_argument("--tenant", help="only the models this tenant may see, with its decision")
    policy = commands.add_parser("policy", help="explain license decisions").add_subparsers(
        dest="action", required=True)
    explain = _with_config(policy.add_parser("explain", help="one tenant, one model: the decision and why"))
    explain.add_argument("--tenant", required=True)
    explain.add_argument("--model", required=True)
    _with_config(policy.add_parser("matrix", help="every tenant x every model"))
    records.add_policy_log(policy)
    deploy.add_parser(commands)
    store_cli.add_parser(commands)
    return parser


def _with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub.add_argument("--registry", action="append",
                     help="registry files in order, comma-separated or repeated (as GATEWAY_REGISTRY); default: "
                          "GATEWAY_REGISTRY, else in a checkout make run's (model_registry.yaml and its local overlay)")
    sub.add_argument("--tenants", type=Path,
                     help="tenants file; default: GATEWAY_TENANTS, else in a checkout make run's local tenants")
    return sub


def _report(args: argparse.Namespace, registry: Registry, tenants: TenantDirectory | None) -> int:
    if args.command == "check":
        count = f", {len(tenants.tenants)} tenants" if tenants else ""
        print(f"ok: {len(registry.models)} models, {len(registry.licenses)} licenses{count}")
        return 0
    if args.command == "models" and args.formats:
        print(format_formats(registry))
        return 0
    if args.command == "models" and args.tenant is None:
        if args.tenants is not None:  # asked for by name: say what it is used for
            print("gateway models: the tenants file is checked; --tenant NAME shows one tenant's view",
                  file=sys.stderr)
        print(format_model_table(registry))
        return 0
    if tenants is None:
        print(f"gateway {args.command}: needs a tenants file: --tenants FILE or GATEWAY_TENANTS", file=sys.stderr)
        return 2
    if args.command == "policy" and args.action == "matrix":
        print(format_matrix(registry, tenants))
        return 0
    tenant = tenants.tenants.get(args.tenant)
    if tenant is None:
        print(f"unknown tenant {args.tenant!r}; the tenants file has: {', '.join(tenants.tenants)}", file=sys.stderr)
        return 2
    if args.command == "models":
        print(format_model_table(registry, tenant))
        return 0
    model = registry.model(args.model)
    if model is None:
        print(f"unknown model {args.model!r}: not in the registry files read (`gateway models` lists them)",
              file=sys.stderr)
        return 2
    decision = decide(tenant, model, registry)
    print(f"{decision.verdict.value} ({decision.rule}): {decision.reason}")
    if decision.hidden:
        print("the API answers this tenant 404 model_not_found, as for a model that does not exist")
    if decision.served_model and decision.served_model != model.id:
        print(f"served model: {decision.served_model}")
    return 0


def _usage_report(args: argparse.Namespace) -> int:
    if not args.files:
        return records.usage_report(args)
    from gateway.usage.report import build, parse_time, render

    try:
        since, until = (parse_time(t) if t else None for t in (args.since, args.until))
    except ValueError as exc:
        print(f"bad --since/--until: {exc}", file=sys.stderr)
        return 2
    # A file that cannot be read is no report at all: an empty one would read as "none used".
    unreadable = [problem for problem in map(_unreadable, args.files) if problem]
    if unreadable:
        print("\n".join(unreadable) + "\nno report: every named audit file must be readable", file=sys.stderr)
        return 1
    report = build(args.files, since, until)
    for problem in report.problems:
        print(problem, file=sys.stderr)
    print(render(report, args.format))
    return 0


def _unreadable(path: Path) -> str | None:
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return f"{path}: cannot read: {exc.strerror or exc}"


def _serve(host: str | None, port: int | None) -> int:
    import uvicorn

    settings = get_settings()
    try:
        registry, tenants = load_config(settings)  # fail here with a clean message, not inside uvicorn
        from gateway.store.url import sqlalchemy_url

        sqlalchemy_url(settings.database_url, settings.data_dir)  # a malformed GATEWAY_DATABASE_URL: stop here
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        hint = config.missing_registry_hint(settings.registry_paths)
        if hint:
            print(hint, file=sys.stderr)
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
    logging.getLogger("gateway.config").info(
        "registry %s (%d models); tenants %s", ", ".join(map(str, settings.registry_paths)), len(registry.models),
        f"{settings.tenants} ({len(tenants.tenants)} tenants)" if tenants else "none: open access")
    server_config = uvicorn.Config("gateway.api.app:create_app", factory=True, host=bind,
                            port=port or settings.port, log_level=settings.log_level, loop="uvloop",
                            http=http_protocol(settings.header_timeout_s, settings.max_connections),
                            timeout_graceful_shutdown=5,  # GATEWAY_MAX_CONNECTIONS: the protocol's 503
                            timeout_keep_alive=settings.keepalive_timeout_s,
                            access_log=False)  # ours is JSON, with the request id (gateway.access)
    DrainingServer(server_config, settings.drain_timeout_s).run()
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
