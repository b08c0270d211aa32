#!/usr/bin/env bash
# Fills DIR (default target/mkl-root) with the static Intel MKL and OpenMP runtime from PyPI (the
# `mkl-static`, `mkl-include` and `intel-openmp` wheels, about 300 MB to download), and prints the
# `MKLROOT=...` that a `cargo build --features mkl` needs. Only the four libraries that the LP64
# OpenMP configuration links are kept, so the binary carries MKL and needs nothing at run time.
set -euo pipefail
dir=$(realpath -m "${1:-target/mkl-root}")
if [[ -f "$dir/lib/libmkl_core.a" && -f "$dir/include/mkl.h" ]]; then
  echo "MKLROOT=$dir"
  exit 0
fi
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
python3 -m pip download --quiet --no-deps --dest "$wheels" mkl-static==2026.2.0 mkl-include==2026.2.1 intel-openmp==2026.2.0 >&2
for w in "$wheels"/*.whl; do
  python3 -m zipfile -e "$w" "$wheels/unpacked" >&2
done
mkdir -p "$dir/include" "$dir/lib"
data="$wheels/unpacked"
cp "$data"/mkl_include-*.data/data/include/mkl*.h "$dir/include/"
cp "$data"/mkl_static-*.data/data/lib/libmkl_{core,intel_lp64,intel_thread}.a "$dir/lib/"
# The static runtime only: with libiomp5.so beside it the linker would pick the shared one.
cp "$data"/intel_openmp-*.data/data/lib/libiomp5.a "$dir/lib/"
echo "MKLROOT=$dir"
