#!/usr/bin/env bash
# Installs everything, runs the lint checks, then the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Formatter, linter, mypy, shellcheck and actionlint (a few seconds): a failure fails the run here.
bash scripts/lint.sh
# vLLM leaves IPC sockets in the temp dir: give this run its own and clean it.
run_tmp=$(mktemp -d -t dynamo-worker-tests.XXXXXX)
trap 'rm -rf "$run_tmp"' EXIT
export TMPDIR="$run_tmp"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_HOST_IP=127.0.0.1
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
status=0
.venv/bin/python -m pytest -p no:cacheprovider -ra "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$status"
