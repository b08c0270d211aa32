//! Bounds-checked strided matrix products on f32 slices, for fused kernels that multiply tiles of
//! larger tensors (attention heads, query blocks) without copying them out, or reuse and
//! accumulate into their own buffers (the chunked head).

use std::mem::MaybeUninit;
use std::ops::Range;

use gemm::Parallelism;

/// A read-only matrix on a slice: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// A row-major `rows x cols` matrix whose rows start `stride` elements apart.
    pub(crate) fn rows(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Self {
        View {
            data,
            rows,
            cols,
            rs: stride,
            cs: 1,
        }
    }

    /// The transposed matrix (same data, strides swapped).
    pub(crate) fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether every element lies inside `data`, which makes the raw-pointer product sound.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = beta * a @ b`, or `dst += beta * a @ b` with `accumulate`, for a row-major `dst` whose
/// rows start `dst_stride` elements apart. Single-threaded: callers parallelise over tiles.
pub(crate) fn matmul(
    dst: &mut [f32],
    dst_stride: usize,
    a: View,
    b: View,
    beta: f32,
    accumulate: bool,
) {
    product(
        initialised(dst),
        dst_stride,
        a,
        b,
        beta,
        accumulate,
        Parallelism::None,
    )
}

/// `dst = a @ b`, or `dst += a @ b` with `accumulate`, for a contiguous row-major `dst`, on
/// candle's CPU threads: for whole matrices, where a fused kernel reuses or accumulates into a
/// buffer, which candle's `matmul` (a fresh tensor per call) cannot.
pub(crate) fn matmul_threaded(dst: &mut [f32], a: View, b: View, accumulate: bool) {
    threaded(initialised(dst), a, b, accumulate)
}

/// `a @ b` as a new contiguous row-major matrix, on candle's CPU threads. The product writes
/// every element, so the buffer is not zeroed first: a forward pass's projections fill a few
/// hundred megabytes, and zeroing reused heap memory is a pass over all of it.
pub(crate) fn matmul_new(a: View, b: View) -> Vec<f32> {
    matmul_rows_new((a.rows, b.cols), std::slice::from_ref(&(0..a.rows)), |_| {
        (a, b)
    })
}

/// The row-major `(m, n)` matrix whose rows `r` are `a @ b` for `(a, b) = views(r)`, for each of
/// the ascending, disjoint `ranges`, and zero elsewhere, on candle's CPU threads; as
/// [`matmul_new`], the rows the products fill are not zeroed first.
pub(crate) fn matmul_rows_new<'v>(
    (m, n): (usize, usize),
    ranges: &[Range<usize>],
    views: impl Fn(&Range<usize>) -> (View<'v>, View<'v>),
) -> Vec<f32> {
    let mut out = Vec::with_capacity(m * n);
    let spare = &mut out.spare_capacity_mut()[..m * n];
    let zero = MaybeUninit::new(0.0);
    let mut done = 0;
    for r in ranges {
        let (a, b) = views(r);
        assert!(
            done <= r.start && r.end <= m && (a.rows, b.cols) == (r.len(), n),
            "row products: rows {r:?} of {m} after {done}, a {} x {} product for {n} columns",
            a.rows,
            b.cols
        );
        spare[done * n..r.start * n].fill(zero);
        threaded(&mut spare[r.start * n..r.end * n], a, b, false);
        done = r.end;
    }
    spare[done * n..].fill(zero);
    // SAFETY: every row is either zeroed just above or written whole by `threaded` without
    // accumulation (the assert matches each product's shape to its rows).
    unsafe { out.set_len(m * n) };
    out
}

/// `dst` as the possibly uninitialised destination the products take.
fn initialised(dst: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and the products write only initialised
    // values, so `dst` stays initialised.
    unsafe { &mut *(dst as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// [`matmul_threaded`] into a destination that need not be initialised unless `accumulate`.
fn threaded(dst: &mut [MaybeUninit<f32>], a: View, b: View, accumulate: bool) {
    #[cfg(feature = "mkl")]
    if mkl::product(dst, a, b, accumulate) {
        return;
    }
    let threads = candle_core::utils::get_num_threads();
    let parallelism = match threads {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    };
    let mut b_rows = Vec::new();
    let b = match gathered(&b) {
        true => row_major_copy(b, &mut b_rows),
        false => b,
    };
    product(dst, b.cols, a, b, 1.0, accumulate, parallelism)
}

/// Whether the portable kernel would gather the right-hand operand `b` one scalar at a time, on
/// the calling thread alone before its threads start: it computes a row-major product as its
/// transpose and packs `b^T` in row-major panels, so it does that for a column-major `b` (a
/// weight read as `w^T`) no wider than deep (a wider one it packs on every thread). A transposed
/// copy in 8 x 8 blocks on all threads costs a fraction of that: at 512 rows, the MLP's down
/// projection `x @ w^T` from 6.1 to 4.6 ms, the attention's 576 x 576 from 1.9 to 1.8 ms with the
/// copy (AMD EPYC, 2 threads; docs/benchmarks.md, "operand layouts"). For a wider `b` the copy
/// costs more than it saves.
fn gathered(b: &View) -> bool {
    b.rs == 1 && b.cs != 1 && b.rows > 1 && 1 < b.cols && b.cols <= b.rows && b.in_bounds()
}

/// `v` copied into `buf` as a contiguous row-major matrix.
fn row_major_copy<'b>(v: View, buf: &'b mut Vec<f32>) -> View<'b> {
    let len = v.rows * v.cols;
    buf.clear();
    buf.reserve(len);
    // `v` read row by row is the row-major `(cols, rows)` matrix with rows `cs` apart.
    transpose(
        v.data,
        (v.cols, v.rows),
        v.cs,
        &mut buf.spare_capacity_mut()[..len],
    );
    // SAFETY: `transpose` writes every one of the `len` elements.
    unsafe { buf.set_len(len) };
    View::rows(buf, v.rows, v.cols, v.cols)
}

/// Dst rows each thread's piece of a [`transpose`] covers: 8-row blocks of the source are read
/// 256 bytes a row, and the piece's 64 output rows stay in the first-level cache.
const TRANSPOSE_BAND: usize = 64;

/// Writes the transpose of the row-major `(rows, cols)` matrix `src`, whose rows start `stride`
/// elements apart, into every element of `dst` as a row-major `(cols, rows)`, in bands of output
/// rows over candle's threads; `dst` need not be initialised, so a copy skips a zeroing pass.
fn transpose(
    src: &[f32],
    (rows, cols): (usize, usize),
    stride: usize,
    dst: &mut [MaybeUninit<f32>],
) {
    use rayon::prelude::*;
    assert!(
        dst.len() == rows * cols
            && (rows == 0 || cols == 0 || (rows - 1) * stride + cols <= src.len()),
        "transpose: a {rows} x {cols} matrix with rows {stride} apart does not fit its slices"
    );
    if rows == 0 || cols == 0 {
        return;
    }
    dst.par_chunks_mut(TRANSPOSE_BAND * rows)
        .enumerate()
        .for_each(|(band, out)| {
            let first = band * TRANSPOSE_BAND;
            transpose_block(&src[first..], (rows, out.len() / rows), stride, out, rows);
        });
}

/// The transpose of the row-major `(rows, cols)` matrix at the start of `src` (rows `stride`
/// apart) written, on the calling thread in 8 x 8 blocks, as `cols` rows of `dst` that start
/// `ds` elements apart, the first `rows` elements of each.
pub(super) fn transpose_block(
    src: &[f32],
    (rows, cols): (usize, usize),
    stride: usize,
    dst: &mut [MaybeUninit<f32>],
    ds: usize,
) {
    #[cfg(target_arch = "x86_64")]
    let avx = std::is_x86_feature_detected!("avx");
    for r in (0..rows).step_by(8) {
        for c in (0..cols).step_by(8) {
            let (h, w) = ((rows - r).min(8), (cols - c).min(8));
            let from = &src[r * stride + c..];
            let to = &mut dst[c * ds + r..];
            #[cfg(target_arch = "x86_64")]
            if h == 8 && w == 8 && avx {
                // SAFETY: the CPU has AVX (`avx`, checked above); the block's 8 source rows of 8
                // lie inside `from` and its 8 output rows of 8 inside `to` (slicing panics
                // otherwise).
                unsafe { transpose8_avx(from, stride, to, ds) };
                continue;
            }
            for i in 0..h {
                for j in 0..w {
                    to[j * ds + i] = MaybeUninit::new(from[i * stride + j]);
                }
            }
        }
    }
}

/// The 8 x 8 block at the start of `src` (rows `ss` apart), transposed to the start of `dst`
/// (rows `ds` apart), in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose8_avx(src: &[f32], ss: usize, dst: &mut [MaybeUninit<f32>], ds: usize) {
    use std::arch::x86_64::*;
    assert!(src.len() > 7 * ss + 7 && dst.len() > 7 * ds + 7);
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src[i * ss..].as_ptr()));
    // Interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    for i in 0..4 {
        let low = _mm256_permute2f128_ps::<0x20>(u[i], u[i + 4]);
        let high = _mm256_permute2f128_ps::<0x31>(u[i], u[i + 4]);
        _mm256_storeu_ps(dst[i * ds..].as_mut_ptr().cast(), low);
        _mm256_storeu_ps(dst[(i + 4) * ds..].as_mut_ptr().cast(), high);
    }
}

/// The whole-matrix products on MKL's threads, in the build that links MKL for candle's products,
/// so the chunked head runs on the same kernels as every other layer.
#[cfg(feature = "mkl")]
mod mkl {
    use std::mem::MaybeUninit;

    use super::{fits, View};

    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;

    extern "C" {
        fn cblas_sgemm(
            layout: i32,
            transa: i32,
            transb: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
    }

    /// How BLAS reads `v` as row-major: untransposed with rows `ld` apart, or transposed.
    /// `None` for strides BLAS cannot express (neither of them 1).
    fn blas_layout(v: &View) -> Option<(i32, usize)> {
        let fits = |ld: usize, len: usize, count: usize| count <= 1 || ld >= len;
        if v.cs == 1 && fits(v.rs, v.cols, v.rows) {
            Some((NO_TRANS, v.rs.max(v.cols).max(1)))
        } else if v.rs == 1 && fits(v.cs, v.rows, v.cols) {
            Some((TRANS, v.cs.max(v.rows).max(1)))
        } else {
            None
        }
    }

    /// `dst = a @ b` or `dst += a @ b` for a contiguous `dst` through `cblas_sgemm`; false
    /// (nothing written) where a view's strides or a size do not fit BLAS, for the portable kernel
    /// to take.
    pub(super) fn product(
        dst: &mut [MaybeUninit<f32>],
        a: View,
        b: View,
        accumulate: bool,
    ) -> bool {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let (Some((ta, lda)), Some((tb, ldb))) = (blas_layout(&a), blas_layout(&b)) else {
            return false;
        };
        let sizes = [m, n, k, lda, ldb];
        if k != b.rows
            || m == 0
            || n == 0
            || k == 0
            || sizes.iter().any(|&s| i32::try_from(s).is_err())
            || !(a.in_bounds() && b.in_bounds() && fits(dst, m, n, n))
        {
            return false;
        }
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: the three views lie inside their slices (checked above), BLAS reads `a` and `b`
        // and writes `dst` only at those views' elements, and `dst` is borrowed mutably.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                ta,
                tb,
                m as i32,
                n as i32,
                k as i32,
                1.0,
                a.data.as_ptr(),
                lda as i32,
                b.data.as_ptr(),
                ldb as i32,
                beta,
                dst.as_mut_ptr().cast::<f32>(),
                n as i32,
            )
        }
        true
    }
}

/// Whether a row-major `(m, n)` matrix with rows `stride` apart lies inside `dst`.
fn fits<T>(dst: &[T], m: usize, n: usize, stride: usize) -> bool {
    m == 0 || n == 0 || (m - 1) * stride + n <= dst.len()
}

fn product(
    dst: &mut [MaybeUninit<f32>],
    dst_stride: usize,
    a: View,
    b: View,
    beta: f32,
    accumulate: bool,
    parallelism: Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(
        k, b.rows,
        "tile product: inner dimensions {k} and {}",
        b.rows
    );
    assert!(
        a.in_bounds() && b.in_bounds() && fits(dst, m, n, dst_stride),
        "tile product: a view reaches past its slice"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_stride)
                .take(m)
                .for_each(|row| row[..n].fill(MaybeUninit::new(0.0)));
        }
        return;
    }
    // SAFETY: every index gemm touches is `r * rs + c * cs` inside the views checked just above,
    // and `dst` is borrowed mutably for the call, so no other reference aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().cast::<f32>(),
            1,
            dst_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Rows of a weight `(n, k)` as f32, for [`few_rows_times_t`]: a plain weight lends its own rows,
/// a quantized one decodes them into the caller's buffer.
pub(crate) trait WeightRows: Sync {
    /// Rows `first..first + count`, `count * k` values, in `buf` or borrowed from `self`.
    fn rows<'a>(&'a self, first: usize, count: usize, k: usize, buf: &'a mut Vec<f32>)
        -> &'a [f32];
}

impl WeightRows for [f32] {
    fn rows<'a>(&'a self, first: usize, count: usize, k: usize, _: &'a mut Vec<f32>) -> &'a [f32] {
        &self[first * k..(first + count) * k]
    }
}

/// `x @ w^T` for a few rows `x (m, k)` and a row-major weight `w (n, k)`, as a row-major `(m, n)`.
/// Each weight row is read once and dotted with every row of `x`, in parallel over weight rows.
/// At a handful of rows (generation feeds one token per pass) a general product spends most of
/// its time packing the weight, as much memory traffic as the product itself.
pub(crate) fn few_rows_times_t(
    x: &[f32],
    w: &(impl WeightRows + ?Sized),
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    assert!(
        x.len() >= m * k,
        "few-rows product: the input is shorter than its shape"
    );
    // A piece per worker and then some, so a late worker still finds work. Inside
    // [`super::on_compute_threads`] the calling thread takes pieces itself instead of waiting for a
    // sleeping worker to wake, which at a tenth of a millisecond per product is most of its time.
    let per_piece = (n / (4 * rayon::current_num_threads())).max(16);
    let mut by_weight_row = vec![0f32; n * m];
    by_weight_row
        .par_chunks_mut(per_piece * m)
        .enumerate()
        .for_each(|(p, piece)| {
            let first_row = p * per_piece;
            let mut buf = Vec::new();
            for (b, out) in piece.chunks_mut(4 * m).enumerate() {
                let (j, r) = (first_row + 4 * b, out.len() / m);
                let rows = w.rows(j, r, k, &mut buf);
                for first in (0..m).step_by(4) {
                    let take = (m - first).min(4);
                    let sums = dots(&x[first * k..(first + take) * k], take, rows, r);
                    for (row, sums) in out.chunks_mut(m).zip(sums) {
                        row[first..first + take].copy_from_slice(&sums[..take]);
                    }
                }
            }
        });
    if m == 1 {
        return by_weight_row;
    }
    let mut out = vec![0f32; m * n];
    for (j, col) in by_weight_row.chunks(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}

/// The dot products of each of the `r` (at most 4) rows of `rows` with each of the `m` (at most 4)
/// rows of `xs`, all rows `k` long: `out[j][i] = rows[j] . xs[i]`. Four weight rows against four
/// input rows keep sixteen sums in registers for eight loads, where one against one needs two.
fn dots(xs: &[f32], m: usize, rows: &[f32], r: usize) -> [[f32; 4]; 4] {
    let k = rows.len() / r.max(1);
    assert!(m <= 4 && r <= 4 && xs.len() >= m * k && rows.len() >= r * k);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above) and the slices hold the rows (the
        // assert above).
        return unsafe { dots_avx512(xs, m, rows, r, k) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { dots_avx2(xs, m, rows, r, k) };
    }
    dots_portable(xs, m, rows, r, k)
}

/// [`dots_portable`] built for AVX2, the widest vectors of most CPUs without AVX-512: the same
/// sums in the same order as the baseline build's four-lane vectors, in eight; at 4 and 8 rows a
/// tenth to a quarter faster than those (docs/benchmarks.md, "CPUs without AVX-512").
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dots_avx2(xs: &[f32], m: usize, rows: &[f32], r: usize, k: usize) -> [[f32; 4]; 4] {
    dots_portable(xs, m, rows, r, k)
}

/// [`dots`] in plain Rust, in sixteen lanes the compiler vectorises for the target it builds for
/// (inlined, with what it calls, into [`dots_avx2`] to be built for AVX2 there).
#[inline(always)]
fn dots_portable(xs: &[f32], m: usize, rows: &[f32], r: usize, k: usize) -> [[f32; 4]; 4] {
    let mut out = [[0f32; 4]; 4];
    for (out, row) in out.iter_mut().zip(rows.chunks_exact(k)).take(r) {
        for (o, x) in out.iter_mut().zip(xs.chunks_exact(k)).take(m) {
            *o = dot(x, row);
        }
    }
    out
}

/// `sum(a[i] * b[i])` over slices of one length, in sixteen lanes: a plain `sum` over `f32` is one
/// chain of dependent adds the compiler may not reorder, several cycles an element, where the lanes
/// vectorise (a forward's 61 RMS norms of 512 x 576 went from 15-17 ms to 7 ms on 2 threads).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (lanes, tail) = lane_products(a, b);
    lanes.iter().sum::<f32>() + tail
}

/// The sixteen lane sums of `a[i] * b[i]` over whole groups of sixteen, and the sum of the
/// products left over, for callers that add the lanes up in their own precision.
#[inline(always)]
pub(crate) fn lane_products(a: &[f32], b: &[f32]) -> ([f32; 16], f32) {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    (acc, tail)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512(xs: &[f32], m: usize, rows: &[f32], r: usize, k: usize) -> [[f32; 4]; 4] {
    macro_rules! by_rows {
        ($m:literal) => {
            match r {
                1 => dots_avx512_n::<$m, 1>(xs, rows, k),
                2 => dots_avx512_n::<$m, 2>(xs, rows, k),
                3 => dots_avx512_n::<$m, 3>(xs, rows, k),
                _ => dots_avx512_n::<$m, 4>(xs, rows, k),
            }
        };
    }
    match m {
        1 => by_rows!(1),
        2 => by_rows!(2),
        3 => by_rows!(3),
        _ => by_rows!(4),
    }
}

/// [`dots`] for exactly `M` input rows and `R` weight rows, so the sums stay in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512_n<const M: usize, const R: usize>(
    xs: &[f32],
    rows: &[f32],
    k: usize,
) -> [[f32; 4]; 4] {
    use std::arch::x86_64::*;
    let (px, pw) = (xs.as_ptr(), rows.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); M]; R];
    let mut c = 0;
    while c + 16 <= k {
        let mut xv = [_mm512_setzero_ps(); M];
        for (i, v) in xv.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(px.add(i * k + c));
        }
        for (j, acc) in acc.iter_mut().enumerate() {
            let wv = _mm512_loadu_ps(pw.add(j * k + c));
            for (a, &v) in acc.iter_mut().zip(&xv) {
                *a = _mm512_fmadd_ps(v, wv, *a);
            }
        }
        c += 16;
    }
    let mut out = [[0f32; 4]; 4];
    for j in 0..R {
        for i in 0..M {
            let mut total = _mm512_reduce_add_ps(acc[j][i]);
            for t in c..k {
                total += *px.add(i * k + t) * *pw.add(j * k + t);
            }
            out[j][i] = total;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 37 + seed) % 101) as f32 / 25.0 - 2.0)
            .collect()
    }

    #[test]
    fn dot_matches_a_sum_in_f64_on_and_off_the_lanes() {
        for len in [0, 1, 15, 16, 17, 576, 1000] {
            let (a, b) = (values(len, 3), values(len, 11));
            let want: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            let got = f64::from(dot(&a, &b));
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "length {len}: {got} against {want}"
            );
        }
    }

    #[test]
    fn transpose_matches_element_by_element() {
        // Sizes on and off the 8 x 8 blocks and the 64-row bands, with padded rows.
        for (rows, cols, pad) in [(1, 1, 0), (8, 8, 0), (13, 70, 3), (130, 9, 1), (64, 200, 0)] {
            let stride = cols + pad;
            let src = values(rows * stride, rows);
            let mut dst = vec![f32::NAN; rows * cols];
            transpose(&src, (rows, cols), stride, initialised(&mut dst));
            for (r, c) in (0..rows).flat_map(|r| (0..cols).map(move |c| (r, c))) {
                assert_eq!(
                    dst[c * rows + r],
                    src[r * stride + c],
                    "{rows}x{cols} at {r},{c}"
                );
            }
        }
    }

    #[test]
    fn threaded_products_of_every_layout_agree() {
        let at = |v: &View, r: usize, c: usize| v.data[r * v.rs + c * v.cs];
        let (m, k) = (37, 29);
        let a_data = values(m * k, 1);
        // Each operand row-major and column-major (a column-major `b` is copied before the
        // product where it is no wider than deep: 21 is, 45 is not).
        let a_layouts = [
            View::rows(&a_data, m, k, k),
            View::rows(&a_data, k, m, m).t(),
        ];
        for n in [21, 45] {
            let b_data = values(k * n, n);
            let b_layouts = [
                View::rows(&b_data, k, n, n),
                View::rows(&b_data, n, k, k).t(),
            ];
            for (a, b) in a_layouts
                .iter()
                .flat_map(|a| b_layouts.iter().map(move |b| (a, b)))
            {
                let mut dst = vec![1f32; m * n];
                matmul_threaded(&mut dst, *a, *b, false);
                for (i, got) in dst.iter().enumerate() {
                    let want: f32 = (0..k).map(|j| at(a, i / n, j) * at(b, j, i % n)).sum();
                    assert!((got - want).abs() < 1e-4, "{got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn row_products_fill_their_rows_and_zero_the_rest() {
        let (m, k, n) = (40, 6, 5);
        let (a_data, b_data) = (values(m * k, 3), values(k * n, 4));
        let b = View::rows(&b_data, k, n, n);
        let rows = |r: &Range<usize>| View::rows(&a_data[r.start * k..r.end * k], r.len(), k, k);
        // A gap, a first range away from row 0 and zero rows at the end; then no ranges at all.
        let out = matmul_rows_new((m, n), &[3..10, 10..12, 20..33], |r| (rows(r), b));
        let live = |i: usize| (3..12).contains(&i) || (20..33).contains(&i);
        for (i, row) in out.chunks(n).enumerate() {
            for (j, &got) in row.iter().enumerate() {
                let want: f32 = match live(i) {
                    true => (0..k).map(|c| a_data[i * k + c] * b_data[c * n + j]).sum(),
                    false => 0.0,
                };
                assert!(
                    (got - want).abs() < 1e-5,
                    "row {i} column {j}: {got} vs {want}"
                );
            }
        }
        let none = matmul_rows_new((m, n), &[], |r| (rows(r), b));
        assert!(none.len() == m * n && none.iter().all(|&v| v == 0.0));
        let empty = View::rows(&[], m, 0, 0);
        assert!(matmul_new(empty, View::rows(&[], 0, n, n))
            .iter()
            .all(|&v| v == 0.0));
    }

    #[test]
    fn dot_products_agree_with_and_without_avx512() {
        let k = 77;
        let xs: Vec<f32> = (0..4 * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let rows: Vec<f32> = (0..4 * k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 24.0)
            .collect();
        for (m, r) in (1..=4).flat_map(|m| (1..=4).map(move |r| (m, r))) {
            let w = &rows[..r * k];
            let (fast, plain) = (dots(&xs, m, w, r), dots_portable(&xs, m, w, r, k));
            for (j, i) in (0..4).flat_map(|j| (0..4).map(move |i| (j, i))) {
                if j >= r || i >= m {
                    assert_eq!((fast[j][i], plain[j][i]), (0.0, 0.0));
                    continue;
                }
                let exact: f32 = xs[i * k..][..k]
                    .iter()
                    .zip(&w[j * k..][..k])
                    .map(|(a, b)| a * b)
                    .sum();
                assert!((fast[j][i] - exact).abs() < 1e-4 && (plain[j][i] - exact).abs() < 1e-4);
            }
        }
    }
}
