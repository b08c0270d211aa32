#!/usr/bin/env bash
# This CPU's peak f32 multiply-add rate: twelve independent AVX-512 fused multiply-add chains
# (enough to cover the instruction's latency), timed over 2.4e9 instructions, on one core and then
# on every core at once (one copy pinned to each, where `taskset` exists), since cores that share
# execution units on the host would not add up. The sum is the ceiling of any matrix product on
# this machine (docs/benchmarks.md, "What bounds the forward"). Needs gcc and an AVX-512 CPU.
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
echo "one core alone:"
"$dir/peak"
cores=$(nproc)
echo "all $cores cores at once:"
for ((c = 0; c < cores; c++)); do
  if command -v taskset >/dev/null; then taskset -c "$c" "$dir/peak"; else "$dir/peak"; fi >"$dir/core$c" &
done
wait
cat "$dir"/core*
awk '{ s += $1 } END { printf "%.1f GFLOP/s on %d cores together\n", s, NR }' "$dir"/core*
