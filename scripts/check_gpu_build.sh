#!/usr/bin/env bash
# Compile-check the CUDA backend without a GPU (and without a CUDA build of torch):
#   * every csrc/cuda/*.cu with nvcc for sm_90 (-O3 -std=c++17 and torch's own nvcc flags), into a temp dir;
#   * csrc/cuda/ops_cuda.cpp (the ATen glue) with the host compiler, -fsyntax-only -DNEPENTHE_WITH_CUDA,
#     against torch's headers, the CUDA headers and Python's headers.
# Prints one line per file and exits non-zero when anything fails. Exits 0 with SKIP when nvcc is absent.
#   PYTHON  python with torch installed (default: python)
#   NVCC    nvcc to use (default: nvcc on PATH, then $CUDA_HOME/bin/nvcc, then /usr/local/cuda/bin/nvcc)
#   CXX     host compiler for the glue (default: g++)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python}"
CXX="${CXX:-g++}"

NVCC_PATH=""
if [ -n "${NVCC:-}" ]; then
    NVCC_PATH="$(command -v "$NVCC" 2>/dev/null)"
else
    for candidate in nvcc "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" /usr/local/cuda/bin/nvcc; do
        [ -n "$candidate" ] && NVCC_PATH="$(command -v "$candidate" 2>/dev/null)" && [ -n "$NVCC_PATH" ] && break
    done
fi
if [ -z "$NVCC_PATH" ]; then
    echo "check_gpu_build: SKIP: nvcc not found (put it on PATH or set NVCC / CUDA_HOME); nothing was compiled"
    exit 0
fi
NVCC="$NVCC_PATH"
CUDA_INCLUDE="$(cd "$(dirname "$(readlink -f "$NVCC")")/../include" 2>/dev/null && pwd)"
[ -f "$CUDA_INCLUDE/cuda_runtime.h" ] || CUDA_INCLUDE=/usr/local/cuda/include

shopt -s nullglob
CU_FILES=(csrc/cuda/*.cu)
GLUE=csrc/cuda/ops_cuda.cpp
if [ ${#CU_FILES[@]} -eq 0 ] && [ ! -f "$GLUE" ]; then
    echo "check_gpu_build: FAIL: no csrc/cuda/*.cu or $GLUE to check"
    exit 1
fi

# torch's nvcc flags and include dirs (the glue cannot be checked without them)
if ! TORCH_INFO="$("$PYTHON" - <<'EOF'
import os, sysconfig
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths
print(" ".join(COMMON_NVCC_FLAGS))
print(" ".join(include_paths() + [sysconfig.get_paths()["include"]]))
macros = os.path.join(include_paths()[0], "c10", "cuda", "impl", "cuda_cmake_macros.h")
print("present" if os.path.exists(macros) else "absent")
EOF
)"; then
    echo "check_gpu_build: FAIL: '$PYTHON' cannot import torch.utils.cpp_extension (set PYTHON to a python with torch)"
    exit 1
fi
TORCH_NVCC_FLAGS=($(sed -n 1p <<<"$TORCH_INFO"))
TORCH_INCLUDES=($(sed -n 2p <<<"$TORCH_INFO"))
GLUE_FLAGS=(-std=c++17 -fsyntax-only -Wall -Wextra -DNEPENTHE_WITH_CUDA)
# CPU-only torch wheels ship the c10/cuda headers without their generated config header
[ "$(sed -n 3p <<<"$TORCH_INFO")" = "absent" ] && GLUE_FLAGS+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
for inc in "${TORCH_INCLUDES[@]}" "$CUDA_INCLUDE"; do GLUE_FLAGS+=(-isystem "$inc"); done

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# all compiles run in parallel; each writes its log, exit status and duration
run_one() {  # id, command...
    local id="$1"; shift
    local start end
    start=$(date +%s.%N)
    "$@" >"$TMP/$id.log" 2>&1
    echo $? >"$TMP/$id.rc"
    end=$(date +%s.%N)
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }' >"$TMP/$id.time"
}
names=()
i=0
for f in "${CU_FILES[@]}"; do
    run_one "$i" "$NVCC" -arch=sm_90 -O3 -std=c++17 "${TORCH_NVCC_FLAGS[@]}" -c "$f" -o "$TMP/$i.o" &
    names+=("$f|nvcc -arch=sm_90")
    i=$((i + 1))
done
if [ -f "$GLUE" ]; then
    run_one "$i" "$CXX" "${GLUE_FLAGS[@]}" "$GLUE" &
    names+=("$GLUE|$CXX -fsyntax-only")
else
    echo "FAIL  $GLUE (missing)"
fi
wait

failed=0
[ -f "$GLUE" ] || failed=1
for ((k = 0; k < ${#names[@]}; k++)); do
    file="${names[$k]%%|*}"
    how="${names[$k]#*|}"
    rc="$(cat "$TMP/$k.rc" 2>/dev/null || echo 1)"
    warnings=$(grep -c -i "warning" "$TMP/$k.log" 2>/dev/null)
    if [ "$rc" = "0" ]; then
        printf 'ok    %-40s %s, %ss%s\n' "$file" "$how" "$(cat "$TMP/$k.time")" \
            "$([ "$warnings" -gt 0 ] && echo ", $warnings warning line(s)")"
        [ "$warnings" -gt 0 ] && sed 's/^/      /' "$TMP/$k.log"
    else
        failed=$((failed + 1))
        printf 'FAIL  %-40s %s (exit %s)\n' "$file" "$how" "$rc"
        sed 's/^/      /' "$TMP/$k.log"
    fi
done
total=${#names[@]}
if [ "$failed" -ne 0 ]; then
    echo "check_gpu_build: $failed file(s) failed ($("$NVCC" --version | tail -1))"
    exit 1
fi
echo "check_gpu_build: all $total files compile ($("$NVCC" --version | tail -1))"
