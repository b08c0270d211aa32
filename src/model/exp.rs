//! Exponentials over f32 slices (`scale * exp(x - shift)`, the sigmoid), sixteen lanes at a time
//! where the CPU has AVX-512.
//!
//! The softmax of attention, the cross-entropy and its gradient take one exponential per score or
//! logit, and SwiGLU one sigmoid per activation: about 10^8 per training step of the default
//! model. libm's `expf` takes them one at a time, and was 5% of the step bench's CPU time.

/// `xs[i] = scale * exp(xs[i] - shift)`; returns the sum of the new values.
pub(crate) fn exp_in_place(xs: &mut [f32], shift: f32, scale: f32) -> f32 {
    let n = xs.len();
    let p = xs.as_mut_ptr();
    // SAFETY: source and destination are the same `n` elements of one exclusively borrowed slice;
    // each lane is read before it is written.
    unsafe {
        Pass {
            src: p,
            dst: Some(p),
            n,
            shift,
            scale,
        }
        .run()
    }
}

/// `dst[i] = scale * exp(src[i] - shift)` for slices of one length; returns the sum of `dst`.
pub(crate) fn exp_into(dst: &mut [f32], src: &[f32], shift: f32, scale: f32) -> f32 {
    assert_eq!(dst.len(), src.len(), "exp_into: lengths differ");
    // SAFETY: `src` and `dst` hold `src.len()` elements each and cannot overlap (one is borrowed
    // mutably).
    unsafe {
        Pass {
            src: src.as_ptr(),
            dst: Some(dst.as_mut_ptr()),
            n: src.len(),
            shift,
            scale,
        }
        .run()
    }
}

/// `sum(exp(xs[i] - shift))`.
pub(crate) fn sum_exp(xs: &[f32], shift: f32) -> f32 {
    // SAFETY: reads the `xs.len()` elements of `xs`, writes nothing.
    unsafe {
        Pass {
            src: xs.as_ptr(),
            dst: None,
            n: xs.len(),
            shift,
            scale: 1.0,
        }
        .run()
    }
}

/// `dst[i] = 1 / (1 + exp(-src[i]))` for slices of one length.
pub(crate) fn sigmoid_into(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "sigmoid_into: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above); both slices hold `src.len()`
        // elements.
        return unsafe { avx512::sigmoid(src.as_ptr(), dst.as_mut_ptr(), src.len()) };
    }
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = 1.0 / (1.0 + (-x).exp());
    }
}

/// One pass behind the three above: `scale * exp(x - shift)` of the `n` values at `src`, written
/// to `dst` where given (which may be `src` itself).
struct Pass {
    src: *const f32,
    dst: Option<*mut f32>,
    n: usize,
    shift: f32,
    scale: f32,
}

impl Pass {
    /// Runs the pass and returns the sum of its values. The caller guarantees `n` valid elements
    /// at both pointers.
    unsafe fn run(self) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            return avx512::shifted_exp(&self);
        }
        let mut sum = 0f32;
        for i in 0..self.n {
            let y = self.scale * (*self.src.add(i) - self.shift).exp();
            if let Some(d) = self.dst {
                *d.add(i) = y;
            }
            sum += y;
        }
        sum
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    /// `exp(x)` in each lane: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, `exp(r)` by its Taylor
    /// series to `r^7` (relative error under 1e-8 there), then scaled by `2^n`. Lanes are clamped to
    /// [-104, 104], beyond which `exp` is 0 or infinite in f32 anyway.
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-104.0)),
            _mm512_set1_ps(104.0),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 in two parts, the first exact in few bits, so `n * LN2_HI` is exact.
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn shifted_exp(pass: &super::Pass) -> f32 {
        let &super::Pass {
            src,
            dst,
            n,
            shift,
            scale,
        } = pass;
        let (shift, scale) = (_mm512_set1_ps(shift), _mm512_set1_ps(scale));
        let mut sum = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let (take, mask) = lanes(n, i);
            let x = _mm512_maskz_loadu_ps(mask, src.add(i));
            let y = _mm512_mul_ps(scale, exp16(_mm512_sub_ps(x, shift)));
            if let Some(d) = dst {
                _mm512_mask_storeu_ps(d.add(i), mask, y);
            }
            sum = _mm512_mask_add_ps(sum, mask, sum, y);
            i += take;
        }
        _mm512_reduce_add_ps(sum)
    }

    /// The lanes of `n` values from `i` on: all sixteen, or the tail's.
    fn lanes(n: usize, i: usize) -> (usize, __mmask16) {
        let take = (n - i).min(16);
        (take, if take == 16 { !0 } else { (1u16 << take) - 1 })
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sigmoid(src: *const f32, dst: *mut f32, n: usize) {
        let mut i = 0;
        while i < n {
            let (take, mask) = lanes(n, i);
            let x = _mm512_maskz_loadu_ps(mask, src.add(i));
            _mm512_mask_storeu_ps(dst.add(i), mask, sigmoid16(x));
            i += take;
        }
    }

    /// `1 / (1 + exp(-x))` in each lane.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn sigmoid16(x: __m512) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_div_ps(one, _mm512_add_ps(one, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_exp_within_a_few_ulp_and_underflows_to_zero() {
        let mut xs: Vec<f32> = (-2000..=800).map(|i| i as f32 * 0.0871).collect();
        xs.extend([
            0.0,
            -0.0,
            1e-8,
            -1e-8,
            80.0,
            -87.0,
            -103.9,
            -104.5,
            -1e4,
            f32::NEG_INFINITY,
        ]);
        let mut ys = xs.clone();
        let sum = exp_in_place(&mut ys, 0.5, 2.0);
        let mut expected_sum = 0f64;
        for (&x, &y) in xs.iter().zip(&ys) {
            // The shifted argument as f32 rounds it (as every caller's does), so from there.
            let e = 2.0 * ((x - 0.5) as f64).exp();
            expected_sum += e;
            if e < 1e-36 {
                assert!(y.abs() < 1e-36, "exp({x}): {y} for {e}");
            } else {
                assert!(((y as f64 - e) / e).abs() < 4e-7, "exp({x}): {y} for {e}");
            }
        }
        assert!(((sum as f64 - expected_sum) / expected_sum).abs() < 1e-5);
        let mut into = vec![0f32; xs.len()];
        assert_eq!(exp_into(&mut into, &xs, 0.5, 2.0), sum);
        assert_eq!(into, ys);
        let plain = sum_exp(&xs, 0.5);
        assert!(((2.0 * plain - sum) / sum).abs() < 1e-6);
    }

    #[test]
    fn sigmoid_matches_f64_and_saturates() {
        let xs: Vec<f32> = (-1500..=1500)
            .map(|i| i as f32 * 0.0731)
            .chain([-200.0, 200.0, f32::INFINITY, f32::NEG_INFINITY])
            .collect();
        let mut ys = vec![0f32; xs.len()];
        sigmoid_into(&mut ys, &xs);
        for (&x, &y) in xs.iter().zip(&ys) {
            let e = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!(
                (y as f64 - e).abs() <= 4e-7 * e.max(1e-30),
                "sigmoid({x}): {y} for {e}"
            );
        }
    }
}
