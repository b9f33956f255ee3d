"""`gateway` command line: serve, check the registry, list models."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gateway.registry import Registry, RegistryError, load_registry
from gateway.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="License-aware OpenAI-compatible LLM gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    for name, help_text in (("check", "validate the registry files"), ("models", "print the model table")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--registry", action="append", type=Path,
                         help="registry file (repeat for overlays); default: GATEWAY_REGISTRY")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args.host, args.port)
    try:
        registry = load_registry(args.registry or get_settings().registry_paths)
    except RegistryError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.command == "check":
        print(f"ok: {len(registry.models)} models, {len(registry.licenses)} licenses")
    else:
        print(format_model_table(registry))
    return 0


def format_model_table(registry: Registry) -> str:
    header = ("id", "family", "params", "context", "license", "commercial", "min GPU", "backends")
    rows = [header]
    for model in registry.models.values():
        gpu = model.hardware.min_gpu
        rows.append((
            model.id,
            model.family,
            f"{model.params_b:g}B",
            str(model.context_length),
            model.license,
            registry.license_of(model).commercial_use.value,
            "none" if gpu.count == 0 else f"{gpu.count}x {gpu.type}",
            ", ".join(f"{b.engine.value}:{b.role.value}" for b in model.backends) or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _serve(host: str | None, port: int | None) -> int:
    import uvicorn

    settings = get_settings()
    try:
        load_registry(settings.registry_paths)  # fail here with a clean message, not inside uvicorn
    except RegistryError as exc:
        print(exc, file=sys.stderr)
        return 1
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        "gateway.api.app:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        log_level=settings.log_level,
        loop="uvloop",
        http="httptools",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
