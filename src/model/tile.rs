//! Bounds-checked strided matrix products on f32 slices, for fused kernels that multiply tiles of
//! larger tensors (attention heads, query blocks) without copying them out, or reuse and
//! accumulate into their own buffers (the chunked head).

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
    product(dst, dst_stride, a, b, beta, accumulate, Parallelism::None)
}

/// `dst = a @ b`, or `dst += a @ b` with `accumulate`, for a contiguous row-major `dst`, on
/// candle's CPU threads: for whole matrices, where a fused kernel reuses or accumulates into a
/// buffer, which candle's `matmul` (a fresh tensor per call) cannot.
pub(crate) fn matmul_threaded(dst: &mut [f32], a: View, b: View, accumulate: bool) {
    let threads = candle_core::utils::get_num_threads();
    let parallelism = match threads {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    };
    product(dst, b.cols, a, b, 1.0, accumulate, parallelism)
}

fn product(
    dst: &mut [f32],
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
    let out = View::rows(dst, m, n, dst_stride);
    assert!(
        a.in_bounds() && b.in_bounds() && out.in_bounds(),
        "tile product: a view reaches past its slice"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_stride)
                .take(m)
                .for_each(|row| row[..n].fill(0.0));
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
            dst.as_mut_ptr(),
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
