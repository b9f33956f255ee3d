"""The clients built on the Responses API, against the gateway in front of real llama.cpp (SmolLM2): the
OpenAI Agents SDK (its default model talks Responses) and LangChain's `ChatOpenAI(use_responses_api=True)`.
The same checks run against vLLM in tests/test_responses_vllm.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LOCAL_MODEL, RESEARCH_KEY
from tests.support.processes import Server
from tests.support.responses import check_agents_sdk, check_langchain, llama_cpp_gateway

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def gateway(llama_cpp: Server, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from llama_cpp_gateway(llama_cpp, log_dir, tmp_path_factory.mktemp("responses-clients"),
                                 "gateway-responses-clients")


def test_agents_sdk_run_stream_and_continue(gateway: Server) -> None:
    check_agents_sdk(gateway.url + "/v1", RESEARCH_KEY, LOCAL_MODEL)


def test_langchain_invoke_and_stream(gateway: Server) -> None:
    check_langchain(gateway.url + "/v1", RESEARCH_KEY, LOCAL_MODEL)
