"""The weights downloaders' own rendered commands, offline (no hub is reachable here): a pinned one gets
as far as asking the hub for its repo at its commit, for the engine's files only; one whose model has no
verified commit refuses before any network, naming the field to pin; one whose volume already holds
the download starts with no network at all (a restarted pod survives a hub outage)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from gateway.weights.download import MARKER
from tests.support.deploy import engine_workloads, objects, pod_spec
from tests.support.local_cluster import Cluster

OFFLINE = {"HF_HUB_OFFLINE": "1"}


def _downloaders(overlay: str, tmp: Path):
    cluster = Cluster(objects(overlay), tmp)
    for workload in engine_workloads(cluster.docs):
        (container,) = pod_spec(workload)["initContainers"]
        argv, env = cluster.argv_env(workload, container)
        yield workload, argv, env


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env={**os.environ, **env, **OFFLINE}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_each_downloader_asks_for_its_pinned_commit_or_refuses(overlay: str, tmp_path: Path) -> None:
    refused = []
    for workload, argv, env in _downloaders(overlay, tmp_path):
        result = _run(argv, env)
        said = result.stdout + result.stderr
        repo = argv[argv.index("--repo") + 1]
        if "--revision" not in argv:  # the model's commit is not verified: nothing is downloaded
            assert result.returncode == 2 and "refusing to download" in said and "hf_revision" in said, said
            refused.append(workload["metadata"]["labels"]["llm-gateway/model"])
            continue
        revision = argv[argv.index("--revision") + 1]
        # Offline, huggingface_hub stops at the hub: proof the flags parsed and the repo and commit are asked for.
        assert result.returncode == 1 and f"cannot download {repo}" in said and revision in said, said
        assert "offline" in said.lower() or "LocalEntryNotFoundError" in said, said  # not a usage error
    if overlay == "prod":  # the two whose commit could not be verified offline (README, model_registry.yaml)
        assert sorted(refused) == ["falcon-7b-instruct", "mpt-7b-instruct"]
    else:
        assert not refused


def test_a_volume_that_holds_the_download_needs_no_network(tmp_path: Path) -> None:
    for workload, argv, env in _downloaders("dev", tmp_path):
        target = Path(argv[argv.index("--dir") + 1])
        target.mkdir(parents=True, exist_ok=True)
        includes = sorted(argv[i + 1] for i, a in enumerate(argv) if a == "--include")
        file = argv[argv.index("--file") + 1] if "--file" in argv else None
        marker = {"repo": argv[argv.index("--repo") + 1], "revision": argv[argv.index("--revision") + 1],
                  "include": includes, "file": file}
        (target / MARKER).write_text(json.dumps(marker))
        result = _run(argv, env)
        assert result.returncode == 0 and "nothing to download" in result.stdout, result.stdout + result.stderr
        marker["revision"] = "0" * 40  # another commit on the volume: the download runs again
        (target / MARKER).write_text(json.dumps(marker))
        again = _run(argv, env)
        said = again.stdout + again.stderr
        assert "nothing to download" not in said and ("cannot download" in said or "downloaded into" in said), said
