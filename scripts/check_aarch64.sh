#!/usr/bin/env bash
# locus on 64-bit ARM (Graviton and Ampere nodes, Grace Hopper, ARM Linux workstations), checked
# from an x86-64 machine: clippy for the aarch64 target, then the exactness tests against the
# committed PyTorch and transformers fixtures (tiny models and the default model) and the library's
# unit tests, cross-built and run under QEMU's user-mode emulation of an ARM CPU. There every
# kernel takes its portable path, as it does on x86-64 CPUs without AVX-512 (.ci/run checks those).
#
#   scripts/check_aarch64.sh    (about 10 minutes cold on 2 cores, the default model's test 2 of
#                                them; CARGO_TARGET_DIR defaults to target/aarch64)
#
# Needs the aarch64 standard library from rustup and Debian's cross compiler and QEMU; installs
# them where missing. Not part of .ci/run: CI fetches no toolchain component besides the one it has.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/aarch64}
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
cargo clippy --locked --release --target "$target" --all-targets -- -D warnings
cargo test --locked --release --target "$target" --lib \
  --test reference --test fused_ops --test default_model
