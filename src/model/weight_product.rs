//! `x @ w^T` for a row-major weight `(n, k)` read where it lies, on CPUs with AVX-512.
//!
//! The `gemm` crate packs the weight of every such product into panels first: a pass over every
//! weight of the model, from memory, in every forward (about 6% of one; docs/benchmarks.md), and
//! for the narrow weights a transposed copy besides. This kernel broadcasts the weight's elements
//! straight from its rows and packs the input instead, once for all the projections that read it
//! (query, key and value; gate and up): `m x k` values just written, which for a batch of 4 x 128
//! tokens is less than the weights that read them, and 1% of the head's.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Input rows per register tile: two 16-lane vectors.
const MR: usize = 32;
/// Weight rows per register tile: 12 broadcasts against the 2 vectors fill 24 of the 32 registers.
const NR: usize = 12;
/// The packed input block a thread sweeps for each weight tile stays within the second-level
/// cache (1 MiB or more on the CPUs with AVX-512), so only the weight comes from memory.
const BLOCK_BYTES: usize = 512 << 10;

/// Whether this CPU runs the kernel.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// An input `(m, k)` packed for products with any number of weights `(n, k)`: a layer's
/// projections that read one input (query, key, value; gate, up) pack it once.
pub(crate) struct Packed {
    /// `ceil(m / MR)` panels of `k x MR`, rows past `m` zero.
    panels: Vec<f32>,
    m: usize,
    k: usize,
}

impl Packed {
    /// The row-major `(m, k)` matrix `x` packed on the current rayon pool's threads; `None` where
    /// the CPU lacks AVX-512 (see [`available`]).
    pub(crate) fn of(x: &[f32], m: usize, k: usize) -> Option<Packed> {
        if !available() {
            return None;
        }
        assert!(
            x.len() >= m * k,
            "weight product: a {m} x {k} input does not fit its slice"
        );
        let len = m.div_ceil(MR) * MR * k;
        let mut panels = Vec::with_capacity(len);
        #[cfg(target_arch = "x86_64")]
        if k > 0 {
            panels.spare_capacity_mut()[..len]
                .par_chunks_mut(MR * k)
                .enumerate()
                .for_each(|(p, panel)| x86::pack(x, (m, k), p * MR, panel));
        }
        // SAFETY: `pack` writes every element of every panel (and there are none when `k` is 0).
        unsafe { panels.set_len(len) };
        Some(Packed { panels, m, k })
    }

    /// The packed matrix's `(rows, columns)`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.m, self.k)
    }

    /// `x @ w^T` as a new row-major `(m, n)` matrix for a contiguous weight `w` `(n, k)`, on the
    /// current rayon pool's threads.
    pub(crate) fn times_t(&self, w: &[f32], n: usize) -> Vec<f32> {
        let (m, k) = (self.m, self.k);
        assert!(
            w.len() >= n * k,
            "weight product: a {n} x {k} weight does not fit its slice"
        );
        let mut out = Vec::with_capacity(m * n);
        let dst = &mut out.spare_capacity_mut()[..m * n];
        if k == 0 {
            dst.fill(MaybeUninit::new(0.0));
        } else {
            #[cfg(target_arch = "x86_64")]
            x86::product(&self.panels, w, (m, n, k), dst);
        }
        // SAFETY: `product` writes every element of the `m x n` output (as does the fill).
        unsafe { out.set_len(m * n) };
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// A raw output pointer shared by the threads, each of which writes its own columns.
    #[derive(Clone, Copy)]
    struct Out(*mut f32);
    // SAFETY: threads write disjoint elements through it (each its own column tiles).
    unsafe impl Send for Out {}
    // SAFETY: as above.
    unsafe impl Sync for Out {}

    impl Out {
        /// The element `offset` places past the start (the caller keeps it inside the output).
        fn at(&self, offset: usize) -> *mut f32 {
            self.0.wrapping_add(offset)
        }
    }

    /// Writes `x @ w^T` into `out` (row-major `(m, n)`) from `x` packed into `panels`; the
    /// caller checked the CPU and sizes.
    pub(super) fn product(
        panels: &[f32],
        w: &[f32],
        (m, n, k): (usize, usize, usize),
        out: &mut [MaybeUninit<f32>],
    ) {
        let count = m.div_ceil(MR);
        // The last `n % NR` weight rows, padded with zero rows to a whole tile.
        let whole = n / NR;
        let tail: Vec<f32> = match n % NR {
            0 => Vec::new(),
            _ => {
                let mut t = w[whole * NR * k..n * k].to_vec();
                t.resize(NR * k, 0.0);
                t
            }
        };
        let tiles = n.div_ceil(NR);
        let per_block = (BLOCK_BYTES / (MR * k * 4)).max(1);
        let dst = Out(out.as_mut_ptr().cast::<f32>());
        let threads = rayon::current_num_threads().max(1);
        // A few pieces per thread even out the threads' speeds without a piece per tile.
        let pieces = (threads * 4).min(tiles);
        (0..pieces).into_par_iter().for_each(|piece| {
            let (first, last) = (tiles * piece / pieces, tiles * (piece + 1) / pieces);
            for block in (0..count).step_by(per_block) {
                for tile in first..last {
                    let (weight, cols) = match tile < whole {
                        true => (&w[tile * NR * k..], NR),
                        false => (&tail[..], n - whole * NR),
                    };
                    for p in block..(block + per_block).min(count) {
                        let rows = (m - p * MR).min(MR);
                        // SAFETY: the CPU has AVX-512 (checked by `Packed::of`); the panel holds
                        // `k x MR` values, the weight tile `NR` rows of `k`, and the output tile
                        // `rows x cols` lies inside the `m x n` output, written by this piece
                        // alone.
                        unsafe {
                            tile_product(
                                k,
                                panels[p * MR * k..].as_ptr(),
                                weight.as_ptr(),
                                dst.at(p * MR * n + tile * NR),
                                n,
                                (rows, cols),
                            )
                        };
                    }
                }
            }
        });
    }

    /// Rows `first..first + MR` of the row-major `(m, k)` matrix `x` into `panel` as `k x MR`
    /// (row `kk` holds column `kk` of those rows), rows past `m` as zeros.
    pub(super) fn pack(
        x: &[f32],
        (m, k): (usize, usize),
        first: usize,
        panel: &mut [MaybeUninit<f32>],
    ) {
        let rows = (m - first).min(MR);
        let src = &x[first * k..];
        let mut kk = 0;
        if rows == MR {
            while kk + 8 <= k {
                for i in (0..MR).step_by(8) {
                    // SAFETY: AVX-512 implies AVX; the 8 x 8 block lies inside both slices.
                    unsafe {
                        super::super::tile::transpose8_avx(
                            &src[i * k + kk..],
                            k,
                            &mut panel[kk * MR + i..],
                            MR,
                        )
                    };
                }
                kk += 8;
            }
        }
        for kk in kk..k {
            for i in 0..MR {
                let v = if i < rows { src[i * k + kk] } else { 0.0 };
                panel[kk * MR + i] = MaybeUninit::new(v);
            }
        }
    }

    /// The first `rows x cols` of the output tile at `c` (rows `ldc` apart) of the packed panel
    /// `a` (`k x MR`) times the transposed `NR x k` weight rows at `w`.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_product(
        k: usize,
        a: *const f32,
        w: *const f32,
        c: *mut f32,
        ldc: usize,
        (rows, cols): (usize, usize),
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; NR];
        for kk in 0..k {
            let a0 = _mm512_loadu_ps(a.add(kk * MR));
            let a1 = _mm512_loadu_ps(a.add(kk * MR + 16));
            for (j, acc) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*w.add(j * k + kk));
                acc[0] = _mm512_fmadd_ps(a0, b, acc[0]);
                acc[1] = _mm512_fmadd_ps(a1, b, acc[1]);
            }
        }
        // Columns of the tile are in the registers; the output wants rows: transpose each half's
        // 16 x 16 (columns past NR zero) and store 12 lanes of each row.
        let keep: __mmask16 = (1 << cols) - 1;
        let halves = [acc.map(|a| a[0]), acc.map(|a| a[1])];
        for (half, regs) in halves.iter().enumerate() {
            let cols: [__m512; 16] = std::array::from_fn(|j| match regs.get(j) {
                Some(&r) => r,
                None => _mm512_setzero_ps(),
            });
            let rows_here = rows.saturating_sub(half * 16).min(16);
            for (i, row) in transpose16(cols).iter().take(rows_here).enumerate() {
                _mm512_mask_storeu_ps(c.add((half * 16 + i) * ldc), keep, *row);
            }
        }
    }

    /// The 16 x 16 matrix whose rows are `r`, transposed: element `e` of every row, in order, in
    /// the `e`-th register.
    #[target_feature(enable = "avx512f")]
    pub(super) fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        // Interleave pairs of rows, then pairs of pairs: each 128-bit lane `l` of `u[4g + s]` holds
        // element `4l + s` of rows `4g..4g + 4`.
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (g, s) = (i / 4, i % 4);
            let (a, b) = (t[4 * g + s / 2], t[4 * g + 2 + s / 2]);
            if s % 2 == 0 {
                _mm512_shuffle_ps::<0x44>(a, b)
            } else {
                _mm512_shuffle_ps::<0xEE>(a, b)
            }
        });
        // Gather the lanes: `v[s]` and `v[s + 4]` hold lanes 0, 2 and 1, 3 of groups 0 and 1,
        // `v[s + 8]`, `v[s + 12]` those of groups 2 and 3; then element `4l + s` of all four groups.
        let v: [__m512; 16] = std::array::from_fn(|i| {
            let (pair, odd, s) = (i / 8, (i / 4) % 2, i % 4);
            let (a, b) = (u[8 * pair + s], u[8 * pair + 4 + s]);
            if odd == 0 {
                _mm512_shuffle_f32x4::<0x88>(a, b)
            } else {
                _mm512_shuffle_f32x4::<0xDD>(a, b)
            }
        });
        std::array::from_fn(|e| {
            let (l, s) = (e / 4, e % 4);
            // Lane `l` of the groups: lanes 0, 2 sit in `v[s]`'s halves, lanes 1, 3 in `v[s + 4]`.
            let (a, b) = (v[s + 4 * (l % 2)], v[8 + s + 4 * (l % 2)]);
            if l < 2 {
                _mm512_shuffle_f32x4::<0x88>(a, b)
            } else {
                _mm512_shuffle_f32x4::<0xDD>(a, b)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 1999) as f32 / 999.5 - 1.0)
            .collect()
    }

    #[test]
    fn products_equal_a_plain_sum_on_and_off_the_tiles() {
        if !available() {
            return;
        }
        // Rows on and off 32-row panels, weights on and off 12-row tiles, depths on and off the
        // 8-wide packing blocks.
        for (m, n, k) in [
            (1, 1, 1),
            (32, 12, 8),
            (33, 13, 9),
            (70, 25, 17),
            (64, 36, 40),
            (5, 200, 3),
            (3, 4, 0),
        ] {
            let (x, w) = (values(m * k, 1), values(n * k, 2));
            let got = Packed::of(&x, m, k).unwrap().times_t(&w, n);
            for (i, j) in (0..m).flat_map(|i| (0..n).map(move |j| (i, j))) {
                let want: f64 = (0..k)
                    .map(|kk| f64::from(x[i * k + kk]) * f64::from(w[j * k + kk]))
                    .sum();
                let got = f64::from(got[i * n + j]);
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{m}x{n}x{k} at {i},{j}: {got} against {want}"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_registers_transpose() {
        use std::arch::x86_64::*;
        if !available() {
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        // SAFETY: the CPU has AVX-512 (checked above); each load reads 16 of the 256 values.
        let rows: [__m512; 16] =
            std::array::from_fn(|i| unsafe { _mm512_loadu_ps(m[i * 16..].as_ptr()) });
        // SAFETY: as above.
        let cols = unsafe { x86::transpose16(rows) };
        let mut out = vec![0f32; 256];
        for (e, c) in cols.iter().enumerate() {
            // SAFETY: as above; each store writes 16 of the 256 values.
            unsafe { _mm512_storeu_ps(out[e * 16..].as_mut_ptr(), *c) };
        }
        for (e, i) in (0..16).flat_map(|e| (0..16).map(move |i| (e, i))) {
            assert_eq!(out[e * 16 + i], m[i * 16 + e], "element {e} of row {i}");
        }
    }
}
