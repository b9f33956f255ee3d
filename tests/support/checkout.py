"""A fresh clone of this repository, as a new user gets it, for the tests that walk `make run` and the README.

`git clone` of the repository the tests run from, plus the uncommitted changes to tracked files (so a
test run checks the tree being worked on, never a stale commit); untracked files are left out, as a
clone would leave them out. Its `.venv` is a link to the virtualenv running the tests: the clone
installs nothing. Processes started in it get `PYTHONPATH` = the clone, so its `gateway` is the one
imported, and no `GATEWAY_*` variable of the test's own environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def fresh_clone(target: Path) -> Path:
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(target)], check=True, timeout=120)
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=ROOT, check=True, capture_output=True,
                          timeout=60).stdout
    if diff.strip():
        subprocess.run(["git", "apply", "--whitespace=nowarn", "-"], cwd=target, input=diff, check=True, timeout=60)
    (target / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return target


def clone_env(clone: Path, **extra: str) -> dict[str, str]:
    """The environment a user's shell in the clone would have: no GATEWAY_* settings of ours, and no
    make variables of a `make test` around the tests (its jobserver is not this make's)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("GATEWAY_") and key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "RUN_DIR")}
    env["PYTHONPATH"] = str(clone)
    env.update(extra)
    return env
