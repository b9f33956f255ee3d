"""Download a model's weights once, at a pinned commit, limited to the files its engine loads.

    python -m gateway.weights --repo ORG/NAME --revision COMMIT --dir DIR [--include PATTERN ...]
    python -m gateway.weights --repo ORG/NAME --revision COMMIT --dir DIR --file NAME.gguf

* A revision must be a commit hash: a branch (`main`) moves, so pods started on different days would
  serve different weights. Without one the command refuses, naming the registry field to pin.
* `--include` patterns (e.g. `*.safetensors`, `*.json`) keep out the second copy many 2023 repos hold
  (.bin beside .safetensors) and anything else the engine never reads.
* A finished download leaves a marker (repo, revision, patterns); a restarted pod with the same marker
  starts without touching the network, so a hub outage never keeps an engine down. A changed revision
  or pattern list downloads again (files already there and unchanged are kept by huggingface_hub).
* Gated repos (Llama 2): the token file named by HF_TOKEN_PATH (a mounted Secret), never an env var.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gateway.registry.schema import COMMIT_HASH

MARKER = ".llm-gateway-download.json"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gateway.weights", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, help="Hugging Face repo id")
    parser.add_argument("--revision", help="the commit to download (40 hex digits)")
    parser.add_argument("--dir", required=True, type=Path, help="where the files go (the weights volume)")
    parser.add_argument("--include", action="append", default=[], help="glob of files to fetch (repeatable)")
    parser.add_argument("--file", help="one file of the repo instead of a snapshot (a GGUF)")
    parser.add_argument("--model", default="", help="registry model id, for messages")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    what = f"{args.repo}" + (f" ({args.model})" if args.model else "")
    if not args.revision or not COMMIT_HASH.match(args.revision):
        print(f"refusing to download {what}: no pinned revision (got {args.revision or 'none'!r}). Pin the "
              f"commit hash in the registry (`hf_revision`, or `gguf.revision` for a GGUF file) and render "
              f"again: a branch would download whatever it points to on the day a pod starts.", file=sys.stderr)
        return 2
    wanted = {"repo": args.repo, "revision": args.revision, "include": sorted(args.include), "file": args.file}
    marker = args.dir / MARKER
    if _read_marker(marker) == wanted:
        print(f"{what}@{args.revision}: already on the volume, nothing to download")
        return 0
    try:
        _download(args)
    except Exception as exc:  # huggingface_hub's errors name the repo, revision and cause
        print(f"cannot download {what} at {args.revision}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    marker.write_text(json.dumps(wanted, sort_keys=True), encoding="utf-8")
    print(f"{what}@{args.revision}: downloaded into {args.dir}")
    return 0


def _download(args: argparse.Namespace) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download  # the downloader image's own dependency

    args.dir.mkdir(parents=True, exist_ok=True)
    if args.file:
        hf_hub_download(args.repo, args.file, revision=args.revision, local_dir=args.dir)
    else:
        snapshot_download(args.repo, revision=args.revision, local_dir=args.dir,
                          allow_patterns=args.include or None)


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
