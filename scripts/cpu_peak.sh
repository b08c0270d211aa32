#!/usr/bin/env bash
# This CPU's peak f32 multiply-add rate on one core: twelve independent AVX-512 fused multiply-add
# chains (enough to cover the instruction's latency), timed over 2.4e9 instructions. Prints
# GFLOP/s for one core; times the cores the benchmarks use is the ceiling of any matrix product
# (docs/benchmarks.md, "What bounds the forward"). Needs gcc and an AVX-512 CPU.
set -euo pipefail
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat > "$dir/peak.c" <<'C'
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

int main(void) {
  __m512 acc[12];
  const __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(0.999999f);
  for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps((float)i);
  const long n = 200000000;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long k = 0; k < n; k++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) acc[i] = _mm512_fmadd_ps(acc[i], b, c);
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
  float sink = 0;  /* keeps the chains live */
  for (int i = 0; i < 12; i++) sink += _mm512_reduce_add_ps(acc[i]);
  printf("%.1f GFLOP/s on one core (checksum %g)\n", n * 12 * 32.0 / s / 1e9, sink);
  return 0;
}
C
gcc -O2 -mavx512f "$dir/peak.c" -o "$dir/peak"
"$dir/peak"
