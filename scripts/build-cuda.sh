#!/usr/bin/env bash
# Build hypersphere with `--features cuda` on a machine with no GPU and no CUDA install, offline
# from the package registry's nvidia-* CUDA 13.0 wheels (issue 14):
#   - nvcc, the headers and the libraries come from pinned wheels, unpacked into $CUDA_HOME;
#   - the driver library (libcuda.so) comes only with a driver, so the link uses a stub: a
#     shared library named libcuda.so.1 that defines every cu* function cudarc declares and is
#     never run (at run time the real driver is loaded by that name);
#   - kernels are built for sm_90 (H100/H200), whose driver is CUDA 13.0: the toolkit must not
#     be newer than 13.0, or the driver cannot load the PTX.
# The binary lands in target/cuda/release/hypersphere. On the GPU machine, run it with
#   LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/cuda-13.0/targets/x86_64-linux/lib
# About 20 CPU-minutes on 2 cores. Usage: [FEATURES=cuda,nccl] scripts/build-cuda.sh [extra cargo args]
# FEATURES=cuda,nccl adds NCCL between GPU ranks (DISTRIBUTED.md): the link uses libnccl from the
# nvidia-nccl-cu13 wheel; at run time any libnccl.so.2 will do (PyTorch's wheels carry one).
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_HOME="${CUDA_HOME:-${HYPERSPHERE_CACHE:-$HOME/.cache/hypersphere}/cuda-13.0}"
WHEELS=(
  "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-nvrtc==13.0.88"
  "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35"
)

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "fetching the CUDA 13.0 wheels into $CUDA_HOME" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$tmp/whl" "${WHEELS[@]}"
  for w in "$tmp"/whl/*.whl; do python3 -m zipfile -e "$w" "$tmp/unpacked"; done
  mkdir -p "$(dirname "$CUDA_HOME")"
  rm -rf "$CUDA_HOME.partial"
  mv "$tmp/unpacked/nvidia/cu13" "$CUDA_HOME.partial"
  chmod +x "$CUDA_HOME.partial"/bin/* "$CUDA_HOME.partial"/nvvm/bin/*
  # Unversioned names for the linker; lib64, where build scripts look.
  for lib in "$CUDA_HOME.partial"/lib/lib*.so.*; do
    base="${lib##*/}"; ln -sf "$base" "$CUDA_HOME.partial/lib/${base%%.so.*}.so"
  done
  ln -sfn lib "$CUDA_HOME.partial/lib64"
  mv "$CUDA_HOME.partial" "$CUDA_HOME"
fi

stub="$CUDA_HOME/lib/stubs/libcuda.so"
if [ ! -f "$stub" ]; then
  echo "writing the libcuda.so link stub" >&2
  sys="$(cargo metadata --format-version 1 --features cuda 2>/dev/null \
    | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')"
  sys="$(dirname "$sys")/src/driver/sys/mod.rs"
  mkdir -p "$(dirname "$stub")"
  grep -oE '\bpub (unsafe )?fn (cu[A-Za-z0-9_]+)' "$sys" | awk '{print $NF}' | sort -u \
    | sed 's/.*/int &(void) { return 100; }/' > "$CUDA_HOME/lib/stubs/libcuda.c"
  # Every function answers CUDA_ERROR_NO_DEVICE (100), so a binary started against the stub
  # (LD_LIBRARY_PATH=$CUDA_HOME/lib/stubs:$CUDA_HOME/lib, for a dry run) runs on the CPU and
  # reports a CUDA device as missing.
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$CUDA_HOME/lib/stubs/libcuda.c"
  ln -sf libcuda.so "$CUDA_HOME/lib/stubs/libcuda.so.1"
fi

FEATURES="${FEATURES:-cuda}"
if [[ ",$FEATURES," == *",nccl,"* ]] && [ ! -f "$CUDA_HOME/nccl/lib/libnccl.so" ]; then
  echo "fetching the NCCL wheel into $CUDA_HOME/nccl" >&2
  ntmp="$(mktemp -d)"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$ntmp/whl" "nvidia-nccl-cu13==2.27.7"
  python3 -m zipfile -e "$ntmp"/whl/*.whl "$ntmp/unpacked"
  rm -rf "$CUDA_HOME/nccl"
  mv "$ntmp/unpacked/nvidia/nccl" "$CUDA_HOME/nccl"
  rm -rf "$ntmp"
  ln -sf libnccl.so.2 "$CUDA_HOME/nccl/lib/libnccl.so"
fi

export CUDA_HOME CUDA_PATH="$CUDA_HOME" CUDA_ROOT="$CUDA_HOME" CUDA_COMPUTE_CAP=90
export PATH="$CUDA_HOME/bin:$PATH"
export LIBRARY_PATH="$CUDA_HOME/lib/stubs:$CUDA_HOME/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$CUDA_HOME/lib/stubs -L native=$CUDA_HOME/lib -L native=$CUDA_HOME/nccl/lib"
nvcc --version | tail -2 >&2
cargo build --release --features "$FEATURES" --target-dir target/cuda "$@"
ls -la target/cuda/release/hypersphere
