"""`make run` (deploy/local/run.sh) in a fresh clone, on ports of the test's choosing.

LLAMA_PORT and GATEWAY_PORT move both ends (the gateway's SmolLM2 backend follows LLAMA_PORT), two runs
side by side each talk to their own llama.cpp and write their own files under `.run/<GATEWAY_PORT>/`,
and a port someone else already holds stops a run at once instead of serving that someone's model.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.support.checkout import clone_env, fresh_clone
from tests.support.processes import free_port

pytestmark = pytest.mark.llamacpp

DEV_KEY = "sk-gw-local-dev"
HELLO = [{"role": "user", "content": "Say hello."}]


@dataclass
class Run:
    process: subprocess.Popen
    gateway_port: int
    llama_port: int
    output: Path
    run_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"make run exited {self.process.returncode}:\n{self.output.read_text()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"make run not ready after {timeout_s:.0f} s:\n{self.output.read_text()}")

    def stop(self) -> None:
        """Ctrl-C, as a user stops it: SIGINT to the whole foreground process group."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(45)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def chat_requests_seen_by_llama(self) -> int:
        log = self.run_dir / f"llamacpp-{self.llama_port}.log"
        return log.read_text(errors="replace").count('"POST /v1/chat/completions')


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fresh_clone(tmp_path_factory.mktemp("local-run") / "repo")


def start_run(clone: Path, gateway_port: int, llama_port: int) -> Run:
    output = clone.parent / f"make-run-{gateway_port}.out"
    process = subprocess.Popen(["deploy/local/run.sh"], cwd=clone, stdout=output.open("wb"), stderr=subprocess.STDOUT,
                               env=clone_env(clone, GATEWAY_PORT=str(gateway_port), LLAMA_PORT=str(llama_port)),
                               start_new_session=True)
    return Run(process, gateway_port, llama_port, output, clone / ".run" / str(gateway_port))


@pytest.fixture
def two_runs(clone: Path) -> Iterator[tuple[Run, Run]]:
    ports = [free_port() for _ in range(4)]
    runs = (start_run(clone, ports[0], ports[1]), start_run(clone, ports[2], ports[3]))
    try:
        for run in runs:
            run.wait_ready()
        yield runs
    finally:
        for run in runs:
            run.stop()


def test_two_runs_on_other_ports_each_answer_from_their_own_llama_cpp(two_runs: tuple[Run, Run]) -> None:
    first, second = two_runs
    for run, other in ((first, second), (second, first)):
        before = other.chat_requests_seen_by_llama()
        client = openai.OpenAI(base_url=run.url + "/v1", api_key=DEV_KEY, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="smollm2-135m-instruct", messages=HELLO,
                                                              max_tokens=4)
        assert raw.headers["x-gateway-backend"] == "llamacpp-smollm2-local"
        assert raw.parse().choices[0].message.content
        assert run.chat_requests_seen_by_llama() >= 1
        assert other.chat_requests_seen_by_llama() == before  # never answered by the other run's model


def test_each_run_keeps_its_files_in_its_own_run_directory(two_runs: tuple[Run, Run]) -> None:
    for run in two_runs:
        overlay = yaml.safe_load((run.run_dir / "llama-port.yaml").read_text())
        assert overlay["models"][0]["backends"][0]["url"] == f"http://127.0.0.1:{run.llama_port}"
        pid = int((run.run_dir / "gateway.pid").read_text())
        assert "gateway" in Path(f"/proc/{pid}/cmdline").read_bytes().decode().replace("\0", " ")
        # The audit trail goes to the run's own file, not into the terminal's log lines.
        client = openai.OpenAI(base_url=run.url + "/v1", api_key=DEV_KEY, max_retries=0)
        client.chat.completions.create(model="smollm2-135m-instruct", messages=HELLO, max_tokens=2,
                                       extra_headers={"x-request-id": f"run-dir-{run.gateway_port}"})
        deadline = time.monotonic() + 5
        while f"run-dir-{run.gateway_port}" not in (run.run_dir / "audit.jsonl").read_text():
            assert time.monotonic() < deadline, "no audit record in the run directory"
            time.sleep(0.1)
    first, second = two_runs
    assert first.run_dir != second.run_dir


def test_make_run_prints_the_console_and_the_admin_key_that_signs_in(two_runs: tuple[Run, Run]) -> None:
    run = two_runs[0]
    line = f"console: open {run.url}/console and sign in with the admin key {DEV_KEY}"
    assert line in run.output.read_text().splitlines()
    with httpx.Client(base_url=run.url, timeout=30) as http:
        form = http.get("/console/sign-in")
        token = form.text.split('name="csrf_token" value="')[1].split('"')[0]
        signed_in = http.post("/console/sign-in", data={"key": DEV_KEY, "csrf_token": token})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/console/overview"
        # "Which models may local-prod use, and why not the others": its policy page says it.
        page = http.get("/console/policy", params={"tenant": "local-prod"})
        assert page.status_code == 200
        assert 'data-model="smollm2-135m-instruct" data-verdict="allow"' in page.text
        assert 'data-model="alpaca-7b" data-verdict="deny"' in page.text and "forbids commercial use" in page.text


def test_a_port_in_use_stops_the_run_before_anything_serves(clone: Path) -> None:
    with socket.socket() as squatter:  # someone else's server on the llama.cpp port
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        run = start_run(clone, free_port(), taken)
        try:
            assert run.process.wait(60) == 1
        finally:
            run.stop()
    output = run.output.read_text()
    assert f"port {taken} is in use" in output and "GATEWAY_PORT=" in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(run.url + "/ready", timeout=2)


def test_ctrl_c_stops_llama_cpp_and_the_gateway(clone: Path) -> None:
    run = start_run(clone, free_port(), free_port())
    try:
        run.wait_ready()
        pid = int((run.run_dir / "gateway.pid").read_text())
    finally:
        run.stop()
    for port in (run.gateway_port, run.llama_port):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"
    assert not Path(f"/proc/{pid}").exists() and not (run.run_dir / "gateway.pid").exists()
