#!/usr/bin/env bash
# Idempotent setup of a fresh machine: a virtualenv in .venv with the CPU build of torch, ChatStream with its dev
# tools and Ray Serve (the ray extra: chatstream.ray and its tests), Debian's chromium for the browser tests and
# Debian's redis-server for the Redis store's tests, and vLLM's CPU build in a second venv, .venv-vllm, for the tests
# marked vllm (scripts/setup_vllm.sh; CHATSTREAM_SKIP_VLLM=1 skips it). Re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pinned first: an unpinned torch would pull a CUDA build of several GB.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev,ray]"

# A Japanese font so that screenshots of Japanese text show glyphs, not boxes.
if [ "${CHATSTREAM_SKIP_BROWSER:-0}" != "1" ] && { ! command -v chromium >/dev/null 2>&1 || ! fc-list 2>/dev/null | grep -qi ipa; }; then
  if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-ipafont-gothic >/dev/null
  else
    echo "note: chromium is not installed; browser tests will be skipped (sudo apt-get install chromium)" >&2
  fi
fi

# redis-server for the Redis store's tests (they start their own on a free port and never use a system service).
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "note: redis-server is not installed; the Redis store's tests will be skipped (sudo apt-get install redis-server)" >&2
  fi
fi

# vLLM's CPU build beside ChatStream in a venv of its own (it pins releases .venv outgrows): about 5 minutes the first
# time, nothing once built; it logs the time of each step.
if [ "${CHATSTREAM_SKIP_VLLM:-0}" != "1" ]; then
  bash scripts/setup_vllm.sh
else
  echo "note: CHATSTREAM_SKIP_VLLM=1: no .venv-vllm; the tests marked vllm will be skipped" >&2
fi
