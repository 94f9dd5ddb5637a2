#!/usr/bin/env bash
# Installs everything, starts `dynamo-worker up` on the tiny demo model, sends a sample chat
# request through the OpenAI-compatible frontend, then keeps serving until Ctrl-C.
# DEMO_ONCE=1 stops the stack after the sample request (used by tests and CI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_HOST_IP=127.0.0.1
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PORT=${PORT:-8000}
.venv/bin/dynamo-worker up --http-port "$PORT" "$@" &
up_pid=$!
# Ctrl-C reaches `up` directly (same process group); SIGTERM to this script is forwarded.
trap 'wait $up_pid; exit' INT
trap 'kill -TERM $up_pid 2>/dev/null; wait $up_pid; exit' TERM
for _ in $(seq 1 600); do
  if curl -fsS "http://127.0.0.1:$PORT/v1/models" 2>/dev/null | grep -q '"demo"'; then break; fi
  if ! kill -0 $up_pid 2>/dev/null; then echo "dynamo-worker up exited" >&2; wait $up_pid; exit 1; fi
  sleep 1
done
echo; echo "sample request:"
curl -sS "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "demo", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 24}'
echo
if [ "${DEMO_ONCE:-0}" = 1 ]; then
  kill -TERM $up_pid; wait $up_pid
else
  wait $up_pid
fi
