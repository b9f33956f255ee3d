"""Run a process the way a restricted pod runs its container, as far as a test machine can:

* as the container's UID/GID (65532), with no supplementary groups and no /etc/passwd entry for it;
* on a read-only root filesystem (a private mount namespace: / remounted read-only);
* with only its volumes writable: each emptyDir and volume directory is bound at its local path, and
  mount paths that exist on this machine (/tmp, /dev/shm, /var/run/postgresql) get the volume bound
  over them, as the kubelet mounts them in the container;
* with a clean environment: the container's env, PATH and PYTHONPATH only (no HOME unless the
  manifest sets one).

What stays the machine's: the interpreter and the installed packages stand in for the image (they are
made readable to the UID by binding /root's needed subtrees into a world-readable /root, since the
machine keeps its Python under /root), the kernel, the network namespace. Needs root (unshare, mount);
tests skip without it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from tests.conftest import CACHE

SHOWN_FROM_ROOT = (".pyenv", ".cache/llm-gateway")  # the interpreter; venvs and test models


def available() -> str | None:
    """Why sandboxed runs are impossible here, or None."""
    if os.geteuid() != 0:
        return "needs root (a mount namespace)"
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} missing"
    return None


def owned_dir(path: Path, uid: int, gid: int) -> Path:
    """A writable volume for the UID (the kubelet's fsGroup does this for a pod's volumes)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    path.chmod(0o770)
    return path


def sandboxed(argv: list[str], *, uid: int, gid: int, writable: list[Path], over: dict[str, Path],
              scratch: Path) -> list[str]:
    """`argv` wrapped: unshare + mounts + setpriv. `over`: container path on this machine -> volume dir
    bound over it. `scratch`: a world-traversable directory for the /root stand-in."""
    fake_root = scratch / "fake-root"
    script = ["set -e"]
    for sub in SHOWN_FROM_ROOT:
        if (Path("/root") / sub).exists():
            (fake_root / sub).mkdir(parents=True, exist_ok=True)
            script.append(f"mount --rbind {shlex.quote('/root/' + sub)} {shlex.quote(str(fake_root / sub))}")
    for part in [fake_root, *fake_root.rglob("*")]:
        if part.is_dir():
            part.chmod(0o755)
    for path in writable:
        script.append(f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(path))}")
    for target, source in over.items():
        script.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}")
    script.append(f"mount --rbind {shlex.quote(str(fake_root))} /root")
    script.append("mount -o remount,bind,ro /")
    script.append(f"exec setpriv --reuid {uid} --regid {gid} --clear-groups -- {shlex.join(argv)}")
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", "\n".join(script)]


def clean_env(container_env: dict[str, str]) -> dict[str, str]:
    """What a container sees: its manifest's env, a PATH, and (standing in for the image's installed
    package) PYTHONPATH and the cache locations the tests' stand-ins read."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"}
    for name in ("PYTHONPATH", "LANG", "LLMGW_CACHE", "LLMGW_TEST_MODELS"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.setdefault("LLMGW_CACHE", str(CACHE))
    return {**env, **container_env}
