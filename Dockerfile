# The gateway image; the seq2seq worker (FLAN-T5) and the weights downloader (`hf download`) run from
# it too, with another command (deploy/models/*). Build: docker build -t llm-gateway:0.1.0 .
# Build stage: a virtualenv with the gateway and its seq2seq extra (torch's CPU wheel: the worker
# runs on CPU, and the CUDA wheel would add gigabytes).
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu ".[seq2seq]"

# Final stage: no compilers, no pip cache, no sources beyond the installed package; a non-root user.
FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
COPY --from=build /opt/venv /opt/venv
# The registry and tenants come from a ConfigMap and a Secret (deploy/base): none is baked in.
USER 65532:65532
EXPOSE 8080
CMD ["gateway", "serve", "--host", "0.0.0.0", "--port", "8080"]
