"""The weights downloader init container: the files the engine loads, at the registry's pinned commit.

It runs `python -m gateway.weights` (the gateway image carries it and huggingface_hub), which refuses a
missing or moving revision, fetches only `--include` patterns (or the one GGUF file), and skips the
download entirely when the volume already holds it (a restarted pod needs no network).
"""

from __future__ import annotations

from typing import Any

from gateway.deploy.fleet import Placement

WEIGHTS = "/models"  # the weights volume's mount point
# Per stored format: the weights themselves, plus configs and tokenizers (Llama/Vicuna tokenizer.model,
# T5's spiece.model, the tokenizer.json of the others). Never both formats: half the bytes.
INCLUDE = {
    "safetensors": ("*.safetensors", "*.json", "tokenizer.model", "spiece.model"),
    "bin": ("*.bin", "*.json", "tokenizer.model", "spiece.model"),
}


def download_args(placement: Placement) -> list[str]:
    model, backend = placement.model, placement.backend
    if backend.gguf is not None:
        args = ["--repo", backend.gguf.repo, "--revision", backend.gguf.revision, "--dir", WEIGHTS,
                "--file", backend.gguf.file]
    else:
        assert model.weights is not None, model.id  # checked by the renderer
        args = ["--repo", model.hf_repo, "--dir", f"{WEIGHTS}/weights"]
        if model.hf_revision:  # unpinned: the command refuses to run, naming the field to pin
            args += ["--revision", model.hf_revision]
        for pattern in INCLUDE[model.weights.format]:
            args += ["--include", pattern]
    return [*args, "--model", model.id]


def downloader(placement: Placement, image: str, security: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "download-weights",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "gateway.weights"],
        "args": download_args(placement),
        # Gated repos (Llama 2) need a token: read from the optional hf-token Secret's file (never an env
        # var, which leaks into logs and child processes); open repos need none.
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
                {"name": "HF_TOKEN_PATH", "value": "/var/run/secrets/hf/token"}],
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "1Gi"},
                      "limits": {"cpu": "2", "memory": "2Gi", "ephemeral-storage": "1Gi"}},
        "securityContext": security,
        "volumeMounts": [{"name": "weights", "mountPath": WEIGHTS}, {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "hf-token", "mountPath": "/var/run/secrets/hf", "readOnly": True}],
    }
