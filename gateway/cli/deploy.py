"""`gateway deploy render [--check]`: wiring only; the renderer is `gateway.deploy`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.deploy import drift, render, write
from gateway.errors import ConfigError


def add_parser(commands: argparse._SubParsersAction) -> None:
    deploy = commands.add_parser("deploy", help="Kubernetes manifests from the registry")
    deploy.add_argument("action", choices=["render"])
    deploy.add_argument("--fleet", type=Path, default=Path("deploy/fleet.yaml"),
                        help="which models each overlay runs (default: deploy/fleet.yaml)")
    deploy.add_argument("--root", type=Path, default=Path("."), help="repository root (default: .)")
    deploy.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming every generated file that differs")


def run(args: argparse.Namespace) -> int:
    root = args.root
    fleet = args.fleet if args.fleet.is_absolute() else root / args.fleet
    try:
        files = render(root, fleet)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.check:
        changed = drift(root, files)
        for rel in changed:
            print(f"{rel}: differs from `gateway deploy render` (run it and commit the result)", file=sys.stderr)
        if not changed:
            print(f"ok: the {len(files)} generated files match the registry and {args.fleet}")
        return 1 if changed else 0
    changed = write(root, files)
    print(f"rendered {len(files)} files, {len(changed)} changed")
    return 0
