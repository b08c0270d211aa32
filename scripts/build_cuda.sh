#!/usr/bin/env bash
# Builds `locus` with the `cuda` feature where there is no GPU and no CUDA install: NVIDIA's
# toolkit wheels from PyPI (CUDA 13.0, whose PTX the 580-series drivers load) and, for the link
# step only, a stand-in for the driver's libcuda.so. The binary starts only where an NVIDIA driver
# provides libcuda.so.1; deploy/Dockerfile.cuda is the build for images.
#
#   scripts/build_cuda.sh [TOOLKIT_DIR] [-- CARGO ARGS]   (default target/cuda-toolkit, about
#   1.2 GB; default cargo args: build --locked --release --features cuda --bin locus)
#   CUDA_COMPUTE_CAP=90 (H100/H200) by default; CARGO_TARGET_DIR is honoured.
#
# At run time the binary needs libcudart.so.13, libcublas(Lt).so.13 and libcurand.so.10 on the
# library path (TOOLKIT_DIR/nvidia/cu13/lib, or the cu13 folder of a PyTorch install's `nvidia`
# package) and the driver's libcuda.so.1. A cold build takes about 12 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
root=target/cuda-toolkit
if [[ $# -gt 0 && $1 != -- ]]; then root=$1; shift; fi
[[ ${1:-} == -- ]] && shift
root=$(realpath -m "$root")
cu=$root/nvidia/cu13

if [[ ! -x $cu/bin/nvcc ]]; then
  python3 -m pip install -q --no-deps --target "$root" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 \
    nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
fi
# The wheels ship versioned names only; the linker looks for the plain ones, cudarc for lib64.
for lib in cudart cublas cublasLt nvrtc; do ln -sf "lib$lib.so.13" "$cu/lib/lib$lib.so"; done
ln -sf libcurand.so.10 "$cu/lib/libcurand.so"
ln -sfn lib "$cu/lib64"

# candle links cudarc with -lcuda; only the driver ships libcuda. The stand-in defines every
# driver function cudarc declares and is never on a run-time library path.
stub=$cu/lib/stubs/libcuda.so
if [[ ! -f $stub ]]; then
  cargo fetch --locked
  cudarc=$(cargo metadata --locked --features cuda --format-version 1 | python3 -c '
import json, sys
pkgs = json.load(sys.stdin)["packages"]
print(next(p["manifest_path"] for p in pkgs if p["name"] == "cudarc").rsplit("/", 1)[0])')
  mkdir -p "$cu/lib/stubs"
  grep -ohP 'pub unsafe fn \Kcu\w+' "$cudarc/src/driver/sys/mod.rs" | sort -u |
    sed 's/.*/int &(void) { return 999; }/' >"$root/libcuda_stub.c"
  gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$stub" "$root/libcuda_stub.c"
fi

export CUDA_HOME=$cu CUDA_PATH=$cu PATH=$cu/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH=$cu/lib:$cu/lib/stubs
unset LD_LIBRARY_PATH
if [[ $# -gt 0 ]]; then
  cargo "$@"
  exit
fi
cargo build --locked --release --features cuda --bin locus
bin=${CARGO_TARGET_DIR:-target}/release/locus
echo "built $bin ($(du -h "$bin" | cut -f1)); run-time libraries:"
ldd "$bin" | grep -E 'cuda|cublas|curand' || true
