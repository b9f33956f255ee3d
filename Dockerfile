# Two images from one file, both running as UID 65532 (no root, no /etc/passwd entry needed):
#   docker build --target gateway -t REGISTRY/llm-gateway:0.1.0 .          the gateway and the weights
#                                                                          downloader (no torch)
#   docker build --target worker  -t REGISTRY/llm-gateway-worker:0.1.0 .   the FLAN-T5 worker (CPU torch)
# A plain `docker build .` builds the gateway (the last stage). deploy/fleet.yaml names both images.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway

# The gateway: its own dependencies and huggingface_hub for the downloader; no torch, no transformers.
FROM build AS build-gateway
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir ".[download]"

# The worker: torch's CPU wheel (the worker runs on CPU; the CUDA wheel would add gigabytes).
FROM build AS build-worker
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu ".[seq2seq]"

# Final stages: no compilers, no pip cache, no sources beyond the installed package; a non-root user.
# HOME is /tmp, which the pods mount as an emptyDir (the root filesystem is read-only there).
FROM python:3.11-slim-bookworm AS worker
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp USER=worker
COPY --from=build-worker /opt/venv /opt/venv
USER 65532:65532
EXPOSE 8000
CMD ["python", "-m", "gateway.workers.seq2seq", "--help"]

FROM python:3.11-slim-bookworm AS gateway
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp USER=gateway
COPY --from=build-gateway /opt/venv /opt/venv
# The registry and tenants come from a ConfigMap and a Secret (deploy/base): none is baked in.
USER 65532:65532
EXPOSE 8080
CMD ["gateway", "serve", "--host", "0.0.0.0", "--port", "8080"]
