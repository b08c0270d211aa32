//! `x @ w^T` for a row-major weight `(n, k)` read where it lies, on CPUs with AVX-512.
//!
//! The `gemm` crate packs the weight of every such product into panels first: a pass over every
//! weight of the model, from memory, in every forward (about 6% of one; docs/benchmarks.md), and
//! for the narrow weights a transposed copy besides. This kernel broadcasts the weight's elements
//! straight from its rows and packs the input instead, once for all the projections that read it
//! (query, key and value; gate and up): `m x k` values just written, which for a batch of 4 x 128
//! tokens is less than the weights that read them, and 1% of the head's.
// The kernel is x86-64 only: elsewhere `Packed::of` declines, and the tiling goes unused.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_imports))]

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Input rows per register tile: two 16-lane vectors.
const MR: usize = 32;
/// Weight rows per register tile: 12 broadcasts against the 2 vectors fill 24 of the 32 registers.
const NR: usize = 12;

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
        #[cfg(target_arch = "x86_64")]
        return Some(Packed {
            panels: x86::panels(x, (m, k)),
            m,
            k,
        });
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    /// The packed matrix's `(rows, columns)`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.m, self.k)
    }

    /// `x @ w^T` as a new row-major `(m, n)` matrix for a contiguous weight `w` `(n, k)`, on the
    /// current rayon pool's threads.
    pub(crate) fn times_t(&self, w: &[f32], n: usize) -> Vec<f32> {
        self.product(Weights::Plain(w), n)
    }

    /// `silu(x @ gate^T) * (x @ up^T)` for contiguous weights `(n, k)`, without either projection
    /// ever held whole: the SwiGLU MLP's forward where no backward follows.
    pub(crate) fn gated_times_t(&self, gate: &[f32], up: &[f32], n: usize) -> Vec<f32> {
        self.product(Weights::Gated(gate, up), n)
    }

    fn product(&self, weights: Weights, n: usize) -> Vec<f32> {
        let (m, k) = (self.m, self.k);
        for w in weights.all() {
            assert!(
                w.len() >= n * k,
                "weight product: a {n} x {k} weight does not fit its slice"
            );
        }
        let mut out = Vec::with_capacity(m * n);
        let dst = &mut out.spare_capacity_mut()[..m * n];
        if k == 0 {
            // An empty sum: 0, and silu(0) * 0 = 0.
            dst.fill(MaybeUninit::new(0.0));
        } else {
            #[cfg(target_arch = "x86_64")]
            x86::product(&self.panels, weights, (m, n, k), dst);
        }
        // SAFETY: `product` writes every element of the `m x n` output (as does the fill).
        unsafe { out.set_len(m * n) };
        out
    }
}

/// The weights a product reads, and what its register tiles make of them.
#[derive(Clone, Copy)]
enum Weights<'a> {
    /// `x @ w^T`: a tile's `NR` weight rows give as many output columns.
    Plain(&'a [f32]),
    /// `silu(x @ gate^T) * (x @ up^T)`: `NR / 2` rows of each give `NR / 2` output columns.
    Gated(&'a [f32], &'a [f32]),
}

impl<'a> Weights<'a> {
    /// The weights themselves.
    fn all(self) -> impl Iterator<Item = &'a [f32]> {
        let (first, second) = match self {
            Weights::Plain(w) => (w, None),
            Weights::Gated(g, u) => (g, Some(u)),
        };
        std::iter::once(first).chain(second)
    }

    /// Output columns per tile.
    fn width(self) -> usize {
        match self {
            Weights::Plain(_) => NR,
            Weights::Gated(..) => NR / 2,
        }
    }

    /// The `NR` weight rows (each `k` long) of the tile whose output columns start at `first`,
    /// where all of its columns exist; the last, partial tile reads [`Weights::tail`] instead.
    fn rows(self, first: usize, k: usize) -> [&'a [f32]; NR] {
        let half = NR / 2;
        std::array::from_fn(|j| match self {
            Weights::Plain(w) => &w[(first + j) * k..][..k],
            Weights::Gated(g, _) if j < half => &g[(first + j) * k..][..k],
            Weights::Gated(_, u) => &u[(first + j - half) * k..][..k],
        })
    }

    /// The rows of the tile that starts at output column `first` of `n` and has fewer columns
    /// than [`Weights::width`], padded with zero rows into a buffer of `NR` rows of `k`.
    fn tail(self, first: usize, n: usize, k: usize) -> Vec<f32> {
        let mut buf = vec![0f32; NR * k];
        let len = (n - first) * k;
        match self {
            Weights::Plain(w) => buf[..len].copy_from_slice(&w[first * k..n * k]),
            Weights::Gated(g, u) => {
                buf[..len].copy_from_slice(&g[first * k..n * k]);
                let up = NR / 2 * k;
                buf[up..up + len].copy_from_slice(&u[first * k..n * k]);
            }
        }
        buf
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

    /// Writes the product of `x`, packed into `panels`, with `weights` into `out` (row-major
    /// `(m, n)`); the caller checked the CPU and sizes.
    pub(super) fn product(
        panels: &[f32],
        weights: Weights,
        (m, n, k): (usize, usize, usize),
        out: &mut [MaybeUninit<f32>],
    ) {
        let count = m.div_ceil(MR);
        let width = weights.width();
        let whole = n / width;
        let tail = match n % width {
            0 => Vec::new(),
            _ => weights.tail(whole * width, n, k),
        };
        let tiles = n.div_ceil(width);
        let gated = matches!(weights, Weights::Gated(..));
        let dst = Out(out.as_mut_ptr().cast::<f32>());
        let threads = rayon::current_num_threads().max(1);
        // A few pieces per thread even out the threads' speeds without a piece per tile.
        let pieces = (threads * 4).min(tiles);
        (0..pieces).into_par_iter().for_each(|piece| {
            let (first, last) = (tiles * piece / pieces, tiles * (piece + 1) / pieces);
            for tile in first..last {
                // A learner that serves queries pauses here, within a tile's time of a query.
                crate::model::turns::yield_to_foreground();
                let col = tile * width;
                let (rows, cols) = match tile < whole {
                    true => (weights.rows(col, k), width),
                    false => (std::array::from_fn(|j| &tail[j * k..][..k]), n - col),
                };
                let rows = rows.map(<[f32]>::as_ptr);
                for p in 0..count {
                    let tile_rows = (m - p * MR).min(MR);
                    // SAFETY: the CPU has AVX-512 (checked by `Packed::of`); the panel holds
                    // `k x MR` values, each weight row `k`, and the output tile
                    // `tile_rows x cols` lies inside the `m x n` output, written by this
                    // piece alone.
                    unsafe {
                        tile_product(
                            (k, gated),
                            panels[p * MR * k..].as_ptr(),
                            &rows,
                            dst.at(p * MR * n + col),
                            n,
                            (tile_rows, cols),
                        )
                    };
                }
            }
        });
    }

    /// The row-major `(m, k)` matrix `x` as `ceil(m / MR)` panels of `k x MR` (see [`pack`]),
    /// packed on the current rayon pool's threads.
    pub(super) fn panels(x: &[f32], (m, k): (usize, usize)) -> Vec<f32> {
        let len = m.div_ceil(MR) * MR * k;
        let mut panels = Vec::with_capacity(len);
        if k > 0 {
            panels.spare_capacity_mut()[..len]
                .par_chunks_mut(MR * k)
                .enumerate()
                .for_each(|(p, panel)| pack(x, (m, k), p * MR, panel));
        }
        // SAFETY: `pack` writes every element of every panel (and there are none when `k` is 0).
        unsafe { panels.set_len(len) };
        panels
    }

    /// Rows `first..first + MR` of the row-major `(m, k)` matrix `x` into `panel` as `k x MR`
    /// (row `kk` holds column `kk` of those rows), rows past `m` as zeros.
    fn pack(x: &[f32], (m, k): (usize, usize), first: usize, panel: &mut [MaybeUninit<f32>]) {
        let rows = (m - first).min(MR);
        super::super::tile::transpose_block(&x[first * k..], (rows, k), k, panel, MR);
        for row in panel.chunks_mut(MR).take(k) {
            row[rows..].fill(MaybeUninit::new(0.0));
        }
    }

    /// The first `rows x cols` of the output tile at `c` (rows `ldc` apart) of the packed panel
    /// `a` (`k x MR`) with the `NR` weight rows `w` (each `k` long): their products, or with
    /// `gated` `silu` of the first half's times the second half's.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_product(
        (k, gated): (usize, bool),
        a: *const f32,
        w: &[*const f32; NR],
        c: *mut f32,
        ldc: usize,
        (rows, cols): (usize, usize),
    ) {
        let w = *w;
        let mut acc = [[_mm512_setzero_ps(); 2]; NR];
        for kk in 0..k {
            let a0 = _mm512_loadu_ps(a.add(kk * MR));
            let a1 = _mm512_loadu_ps(a.add(kk * MR + 16));
            for (acc, row) in acc.iter_mut().zip(w) {
                let b = _mm512_set1_ps(*row.add(kk));
                acc[0] = _mm512_fmadd_ps(a0, b, acc[0]);
                acc[1] = _mm512_fmadd_ps(a1, b, acc[1]);
            }
        }
        if gated {
            // silu(g) * u as the unfused SwiGLU computes it, `(g * sigmoid(g)) * u`.
            let (gate, up) = acc.split_at_mut(NR / 2);
            for (g, u) in gate.iter_mut().zip(up) {
                for h in 0..2 {
                    let s = super::super::exp::avx512::sigmoid16(g[h]);
                    g[h] = _mm512_mul_ps(_mm512_mul_ps(g[h], s), u[h]);
                }
            }
        }
        // Columns of the tile are in the registers; the output wants rows: transpose each half's
        // 16 x 16 (columns past the tile's zero) and store `cols` lanes of each row.
        let keep: __mmask16 = (1 << cols) - 1;
        let halves = [acc.map(|a| a[0]), acc.map(|a| a[1])];
        for (half, regs) in halves.iter().enumerate() {
            let cols: [__m512; 16] = std::array::from_fn(|j| match regs.get(j) {
                Some(&r) if j < cols => r,
                _ => _mm512_setzero_ps(),
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

    /// Whether the kernel runs here; where it does not, `Packed::of` must decline, leaving the
    /// products to the `gemm` crate (`tests/fused_ops.rs` covers those).
    fn kernel_here() -> bool {
        let here = available();
        assert_eq!(Packed::of(&[1.0; 4], 2, 2).is_some(), here);
        here
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 1999) as f32 / 999.5 - 1.0)
            .collect()
    }

    #[test]
    fn products_equal_a_plain_sum_on_and_off_the_tiles() {
        if !kernel_here() {
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
            let packed = Packed::of(&x, m, k).unwrap();
            let got = packed.times_t(&w, n);
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

    #[test]
    fn gated_products_equal_silu_of_one_times_the_other() {
        if !kernel_here() {
            return;
        }
        // Output widths on and off the 6-column gated tiles.
        for (m, n, k) in [(1, 1, 3), (32, 6, 8), (33, 13, 9), (70, 20, 17), (4, 5, 0)] {
            let (x, g, u) = (values(m * k, 3), values(n * k, 4), values(n * k, 5));
            let packed = Packed::of(&x, m, k).unwrap();
            let (pg, pu) = (packed.times_t(&g, n), packed.times_t(&u, n));
            let got = packed.gated_times_t(&g, &u, n);
            let mut want = vec![0f32; m * n];
            super::super::exp::sigmoid_into(&mut want, &pg);
            for ((w, &g), &u) in want.iter_mut().zip(&pg).zip(&pu) {
                *w = g * *w * u;
            }
            // The same sums in the same order, and the activation as the unfused op applies it.
            assert_eq!(got, want, "{m}x{n}x{k}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_registers_transpose() {
        use std::arch::x86_64::*;
        if !kernel_here() {
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
