"""Start real servers (engines, the gateway) as subprocesses for the tests, and stop them cleanly."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


# Under pytest-xdist (`make test` runs two workers) each worker hands out ports from a range of its own,
# below the kernel's ephemeral ports (32768+): a port the kernel picks for one worker's bind(0) could be
# picked again for the other's before the first server binds it.
def _worker_ports() -> range | None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not (worker.startswith("gw") and worker[2:].isdigit()):
        return None
    start = 20000 + 3000 * int(worker[2:])
    return range(start, start + 3000)


_WORKER_PORTS = _worker_ports()
_next_ports = itertools.cycle(_WORKER_PORTS) if _WORKER_PORTS else None


def free_port() -> int:
    """A port that nothing on this machine listens on now."""
    if _next_ports is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    for port in itertools.islice(_next_ports, len(_WORKER_PORTS)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken (a server of an earlier test, or someone else's)
            return port
    raise RuntimeError(f"no free port in this worker's range {_WORKER_PORTS}")


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    url: str
    ready_path: str
    log_path: Path

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines_with(self, needle: str, timeout_s: float = 3.0) -> list[str]:
        """Log lines containing `needle` (case-insensitive), waiting for them: the gateway writes its
        log lines in batches (every 50 ms) from a writer thread."""
        deadline = time.monotonic() + timeout_s
        while True:
            lines = [line for line in self.log_text().splitlines() if needle.lower() in line.lower()]
            if lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def stop(self, timeout_s: float = 15) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_server(
    name: str, argv: list[str], port: int, ready_path: str, log_dir: Path, env: dict[str, str] | None = None,
    inherit_env: bool = True,
) -> Server:
    """`inherit_env=False`: the process gets `env` only (a container's environment)."""
    log_path = log_dir / f"{name}.log"
    env = dict(env or {})
    if argv[1:4] == ["-m", "gateway", "serve"] and "GATEWAY_DATA_DIR" not in env:
        # Each gateway its own data directory (embedded database, spool), unless the test shares one:
        # never the user's ~/.local/share/llm-gateway, and no test sees another's ledger.
        env["GATEWAY_DATA_DIR"] = tempfile.mkdtemp(prefix=f"{name}-data-", dir=log_dir)
    log = log_path.open("wb")
    process = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**(os.environ if inherit_env else {}), **env},
        start_new_session=True,  # its own process group, so stop() takes its workers down too
    )
    return Server(name, process, f"http://127.0.0.1:{port}", ready_path, log_path)


def wait_for_port(port: int, timeout_s: float = 20) -> None:
    """For servers with no HTTP readiness path (redis-server): wait until the port accepts connections."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def start_redis(name: str, log_dir: Path, port: int | None = None) -> tuple[Server, str]:
    """A throwaway redis-server (no persistence), ready; returns it and its redis:// URL. `port`: that
    one (a Redis restarted empty where the gateways expect it), else a free one."""
    assert shutil.which("redis-server"), "redis-server missing: make test installs it"
    port = port or free_port()
    server = start_server(name, ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                          port, "", log_dir)
    wait_for_port(port)
    return server, f"redis://127.0.0.1:{port}/0"
