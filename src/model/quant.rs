//! A weight kept in the quantized blocks it was loaded from (GGUF's Q4_1 and Q8_0), beside its f32
//! tensor, for the few-row products of generation and scoring.
//!
//! Decoding one token reads every weight once, so its speed is the memory traffic of the weights:
//! 4.6 bits a weight in Q4_1 against 32 in f32. The rows are decoded into a small buffer with
//! exactly the arithmetic of the loader's dequantization (`q * d + m`, rounded after each
//! operation) and dotted by the same kernel as the f32 rows, so a product from the blocks equals
//! the product from the f32 tensor bit for bit. A serving snapshot keeps a weight's blocks only
//! while its tensor equals them (`matches`); learning that changes a weight drops them.

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use half::f16;

use super::tile::WeightRows;

/// Values per block in both formats.
const BLOCK: usize = 32;

/// The block formats kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Scale and minimum (f16 each), then 32 four-bit values: `q * d + m`.
    Q4_1,
    /// Scale (f16), then 32 signed bytes: `q * d`.
    Q8_0,
}

impl Format {
    /// The format of GGUF's `dtype`, if it is one kept.
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_1 => Some(Format::Q4_1),
            GgmlDType::Q8_0 => Some(Format::Q8_0),
            _ => None,
        }
    }

    /// Bytes of one block.
    fn block_bytes(self) -> usize {
        match self {
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }
}

/// A row-major `(rows, cols)` weight as quantized blocks, each row its own run of blocks.
pub struct QuantRows {
    format: Format,
    rows: usize,
    cols: usize,
    /// The buffer that holds the blocks, from `start` on; possibly shared with other weights.
    data: Arc<Vec<u8>>,
    start: usize,
}

impl QuantRows {
    /// The blocks of a `(rows, cols)` weight, or `None` where `cols` is not whole blocks or the
    /// bytes are not the blocks of that shape.
    pub fn new(format: Format, rows: usize, cols: usize, bytes: Vec<u8>) -> Option<Self> {
        let fits = cols > 0
            && cols.is_multiple_of(BLOCK)
            && bytes.len() == rows * cols / BLOCK * format.block_bytes();
        fits.then_some(QuantRows {
            format,
            rows,
            cols,
            data: Arc::new(bytes),
            start: 0,
        })
    }

    /// The same weights with their blocks moved into one buffer. The buffer of a whole model is
    /// larger than glibc's largest mmap threshold, so it is a mapping of its own: a few hundred
    /// separate buffers would sit in the heap among those a training step frees and reuses,
    /// which made the step measurably slower (docs/benchmarks.md).
    pub fn into_one_buffer<K>(weights: Vec<(K, QuantRows)>) -> Vec<(K, QuantRows)> {
        let total = weights.iter().map(|(_, w)| w.bytes().len()).sum();
        let mut data = Vec::with_capacity(total);
        let starts: Vec<usize> = weights
            .iter()
            .map(|(_, w)| {
                let start = data.len();
                data.extend_from_slice(w.bytes());
                start
            })
            .collect();
        let data = Arc::new(data);
        weights
            .into_iter()
            .zip(starts)
            .map(|((k, w), start)| {
                let data = Arc::clone(&data);
                (k, QuantRows { data, start, ..w })
            })
            .collect()
    }

    /// This weight's blocks.
    fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.start + self.rows * self.row_bytes()]
    }

    /// The same weight with its rows reordered: row `i` of the result is row `order[i]` of this.
    pub fn reorder_rows(&self, order: &[usize]) -> Option<Self> {
        let width = self.row_bytes();
        if order.len() != self.rows || order.iter().any(|&r| r >= self.rows) {
            return None;
        }
        let bytes = self.bytes();
        let bytes = order
            .iter()
            .flat_map(|&r| &bytes[r * width..(r + 1) * width])
            .copied()
            .collect();
        QuantRows::new(self.format, self.rows, self.cols, bytes)
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.format.block_bytes()
    }

    /// Decodes rows `first..first + count` into `out` (`count * cols` values).
    fn decode(&self, first: usize, count: usize, out: &mut [f32]) {
        let width = self.row_bytes();
        let blocks = &self.bytes()[first * width..(first + count) * width];
        let out = &mut out[..count * self.cols];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has both features (checked just above); `blocks` holds whole blocks
            // and `out` their values (the shapes `new` checked).
            return unsafe {
                match self.format {
                    Format::Q4_1 => avx512::q4_1(blocks, out),
                    Format::Q8_0 => avx512::q8_0(blocks, out),
                }
            };
        }
        decode_portable(self.format, blocks, out);
    }

    /// Whether `w`, a row-major `(rows, cols)` f32 weight, is exactly what these blocks decode to.
    pub fn matches(&self, w: &[f32]) -> bool {
        if w.len() != self.rows * self.cols {
            return false;
        }
        let mut row = vec![0f32; self.cols];
        w.chunks_exact(self.cols).enumerate().all(|(r, want)| {
            self.decode(r, 1, &mut row);
            row.iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        })
    }
}

impl WeightRows for QuantRows {
    fn rows<'a>(
        &'a self,
        first: usize,
        count: usize,
        k: usize,
        buf: &'a mut Vec<f32>,
    ) -> &'a [f32] {
        assert_eq!(k, self.cols, "quantized rows: width {k} for {}", self.cols);
        buf.resize(buf.len().max(count * k), 0.0);
        self.decode(first, count, buf);
        &buf[..count * k]
    }
}

/// Whole blocks of `format` into their values, one value at a time.
fn decode_portable(format: Format, blocks: &[u8], out: &mut [f32]) {
    let size = format.block_bytes();
    for (block, values) in blocks.chunks_exact(size).zip(out.chunks_exact_mut(BLOCK)) {
        let half = |at: usize| f16::from_le_bytes([block[at], block[at + 1]]).to_f32();
        match format {
            Format::Q4_1 => {
                let (d, m) = (half(0), half(2));
                let (low, high) = values.split_at_mut(BLOCK / 2);
                for ((&q, lo), hi) in block[4..].iter().zip(low).zip(high) {
                    *lo = f32::from(q & 0x0F) * d + m;
                    *hi = f32::from(q >> 4) * d + m;
                }
            }
            Format::Q8_0 => {
                let d = half(0);
                for (&q, v) in block[2..].iter().zip(values) {
                    *v = f32::from(q as i8) * d;
                }
            }
        }
    }
}

/// The decoders in sixteen lanes: the same multiply then add as the scalar forms, so the same
/// values; the scales converted from f16 exactly by the F16C instruction.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// The f16 pair at the start of `block` as f32 lanes `[a, b, ..]`.
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn halves(block: &[u8]) -> __m128 {
        let bits = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))
    }

    /// Whole Q4_1 blocks into their values: the low nibbles are values 0-15, the high ones 16-31.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn q4_1(blocks: &[u8], out: &mut [f32]) {
        assert_eq!(blocks.len() / 20 * 32, out.len());
        let nibble = _mm512_set1_epi32(0x0F);
        for (block, values) in blocks.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
            let dm = halves(block);
            let (d, m) = (
                _mm512_broadcastss_ps(dm),
                _mm512_broadcastss_ps(_mm_movehdup_ps(dm)),
            );
            let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(block.as_ptr().add(4).cast()));
            let low = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, nibble));
            let high = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(bytes));
            let at = values.as_mut_ptr();
            _mm512_storeu_ps(at, _mm512_add_ps(_mm512_mul_ps(low, d), m));
            _mm512_storeu_ps(at.add(16), _mm512_add_ps(_mm512_mul_ps(high, d), m));
        }
    }

    /// Whole Q8_0 blocks into their values.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn q8_0(blocks: &[u8], out: &mut [f32]) {
        assert_eq!(blocks.len() / 34 * 32, out.len());
        for (block, values) in blocks.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
            // The scale is the block's first two bytes; the next two are its first values.
            let d = _mm512_broadcastss_ps(halves(block));
            let at = values.as_mut_ptr();
            for half in 0..2 {
                let q = _mm_loadu_si128(block.as_ptr().add(2 + 16 * half).cast());
                let v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d);
                _mm512_storeu_ps(at.add(16 * half), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    use super::*;

    /// A `(rows, cols)` weight quantized by candle, its blocks and candle's f32 decoding of them.
    fn quantized(dtype: GgmlDType, rows: usize, cols: usize) -> (QuantRows, Vec<f32>) {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 317.0)
            .collect();
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let f32s = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        let format = Format::of(dtype).unwrap();
        let rows_ = QuantRows::new(format, rows, cols, q.data().unwrap().into_owned()).unwrap();
        (rows_, f32s.to_vec1().unwrap())
    }

    #[test]
    fn blocks_decode_to_the_loaders_values_bit_for_bit() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (q, w) = quantized(dtype, 6, 96);
            assert!(q.matches(&w), "{dtype:?}");
            let mut changed = w.clone();
            changed[100] = f32::from_bits(changed[100].to_bits() ^ 1);
            assert!(
                !q.matches(&changed),
                "{dtype:?}: a one-ulp change goes unseen"
            );
        }
    }

    #[test]
    fn the_portable_decoder_gives_the_same_values() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (q, w) = quantized(dtype, 3, 64);
            let mut out = vec![0f32; w.len()];
            decode_portable(q.format, q.bytes(), &mut out);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&w), "{dtype:?}");
        }
    }

    #[test]
    fn products_from_the_blocks_equal_those_from_the_f32_weight() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (n, k) = (37, 64);
            let (q, w) = quantized(dtype, n, k);
            for m in [1, 3, 5] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 31 % 17) as f32 - 8.0) / 9.0)
                    .collect();
                let plain = super::super::tile::few_rows_times_t(&x, &w[..], m, n, k);
                let blocks = super::super::tile::few_rows_times_t(&x, &q, m, n, k);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&plain), bits(&blocks), "{dtype:?}, {m} rows");
            }
        }
    }

    #[test]
    fn rows_reorder_and_shapes_that_are_not_blocks_are_refused() {
        let (q, w) = quantized(GgmlDType::Q4_1, 4, 32);
        let swapped = q.reorder_rows(&[1, 0, 3, 2]).unwrap();
        let want: Vec<f32> = [1, 0, 3, 2]
            .iter()
            .flat_map(|&r| w[r * 32..(r + 1) * 32].to_vec())
            .collect();
        assert!(swapped.matches(&want));
        assert!(q.reorder_rows(&[0, 1, 2]).is_none());
        assert!(q.reorder_rows(&[0, 1, 2, 4]).is_none());
        assert!(QuantRows::new(Format::Q4_1, 4, 33, vec![0; 80]).is_none());
        assert!(QuantRows::new(Format::Q8_0, 4, 32, vec![0; 80]).is_none());
        // In one buffer each weight still decodes to its own values.
        let (q8, w8) = quantized(GgmlDType::Q8_0, 3, 64);
        let one = QuantRows::into_one_buffer(vec![(0, swapped), (1, q8)]);
        assert!(one[0].1.matches(&want) && one[1].1.matches(&w8));
        assert!(Arc::ptr_eq(&one[0].1.data, &one[1].1.data));
    }
}
