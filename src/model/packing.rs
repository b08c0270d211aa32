//! Whole documents packed into the rows of one batch, each attending only to itself.
//!
//! Padding every document to the longest one spends the forward pass on padding; packing puts
//! several short documents into one row instead. Each token keeps the position it has in its own
//! document and sees only the keys of its own document, so every document's losses and gradients
//! are those it has alone in a row.

use std::sync::Arc;

use candle_core::{Device, Result, Tensor};

/// Where one document lies in a packed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The row it is in.
    pub row: usize,
    /// The index in that row of its first token.
    pub offset: usize,
}

/// The token-level layout of a packed batch `(rows, len)`.
#[derive(Debug, Clone)]
pub struct Packing {
    rows: usize,
    len: usize,
    /// Per token, row-major, the index in its row where its document begins (a padding token
    /// counts as a document of its own).
    starts: Arc<[u32]>,
}

impl Packing {
    /// Packs documents of `lengths` tokens into as few token slots (rows times row length) as
    /// first-fit, longest first, reaches with rows of any length from the longest document's up to
    /// `capacity`; at worst that is one document a row, as padding would place them. Returns the
    /// layout, its rows as long as the fullest, and each document's placement, in the order given.
    pub fn pack(lengths: &[usize], capacity: usize) -> (Packing, Vec<Placement>) {
        let longest = lengths.iter().copied().max().unwrap_or(0);
        let mut order: Vec<usize> = (0..lengths.len()).collect();
        // Stable, so equal lengths keep their given order and a layout is reproducible.
        order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        let slots = |(used, _): &(Vec<usize>, _)| used.len() * used.iter().max().unwrap_or(&0);
        // From a row as long as all documents together on, every row length gives one row.
        let widest = capacity.min(lengths.iter().sum()).max(longest);
        let (used, placements) = (longest..=widest)
            .map(|cap| first_fit(lengths, &order, cap))
            .min_by_key(slots)
            .unwrap_or_default();
        let len = used.iter().copied().max().unwrap_or(0);
        let mut starts = vec![0u32; used.len() * len];
        for (p, &n) in placements.iter().zip(lengths) {
            starts[p.row * len + p.offset..][..n].fill(p.offset as u32);
        }
        for (row, &u) in used.iter().enumerate() {
            // Padding after the last document sees only itself: a row of documents stays exact
            // whatever the padding holds.
            for i in u..len {
                starts[row * len + i] = i as u32;
            }
        }
        let packing = Packing {
            rows: used.len(),
            len,
            starts: starts.into(),
        };
        (packing, placements)
    }

    /// Rows of the batch.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Tokens per row.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch has no token.
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Per token, row-major `(rows, len)`, the first key it may attend to.
    pub fn starts(&self) -> &[u32] {
        &self.starts
    }

    /// Each token's position within its own document, `(rows, len)`.
    pub fn positions(&self, device: &Device) -> Result<Tensor> {
        let pos: Vec<u32> = self
            .starts
            .iter()
            .enumerate()
            .map(|(i, &s)| (i % self.len.max(1)) as u32 - s)
            .collect();
        Tensor::from_vec(pos, (self.rows, self.len), device)
    }

    /// Checks that `b` rows of `t` queries over `s` keys are the batch this layout describes.
    pub fn check(&self, b: usize, t: usize, s: usize) -> Result<()> {
        if (b, t, s) != (self.rows, self.len, self.len) {
            candle_core::bail!(
                "packed attention: {b} rows of {t} queries over {s} keys for a layout of {} rows of {}",
                self.rows,
                self.len
            );
        }
        Ok(())
    }

    /// Additive mask `(rows, 1, len, len)`: 0 where a query may see a key (its own document, not
    /// after itself, within `window`), -inf elsewhere.
    pub fn mask(&self, window: Option<usize>, device: &Device) -> Result<Tensor> {
        let n = self.len;
        let queries = (0..self.rows * n).map(|q| (q % n, self.starts[q] as usize));
        let mask = super::ops::mask_rows(queries, n, window);
        Tensor::from_vec(mask, (self.rows, 1, n, n), device)
    }
}

/// Places documents of `lengths`, taken in `order`, each into the first row of at most `cap`
/// tokens with room for it; returns the tokens used per row and each document's placement.
fn first_fit(lengths: &[usize], order: &[usize], cap: usize) -> (Vec<usize>, Vec<Placement>) {
    let mut used: Vec<usize> = Vec::new();
    let mut placements = vec![Placement { row: 0, offset: 0 }; lengths.len()];
    for &i in order {
        let row = match used.iter().position(|&u| u + lengths[i] <= cap) {
            Some(row) => row,
            None => {
                used.push(0);
                used.len() - 1
            }
        };
        placements[i] = Placement {
            row,
            offset: used[row],
        };
        used[row] += lengths[i];
    }
    (used, placements)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_takes_the_row_length_with_the_fewest_token_slots() {
        let (p, at) = Packing::pack(&[3, 8, 5, 2, 4], 4);
        // Rows of 8: [8], [5, 3], [4, 2] + 2 padding tokens.
        assert_eq!((p.rows(), p.len()), (3, 8));
        assert_eq!(at[1], Placement { row: 0, offset: 0 });
        assert_eq!(at[2], Placement { row: 1, offset: 0 });
        assert_eq!(at[4], Placement { row: 2, offset: 0 });
        assert_eq!(at[0], Placement { row: 1, offset: 5 });
        assert_eq!(at[3], Placement { row: 2, offset: 4 });
        assert_eq!(&p.starts()[16..], &[0, 0, 0, 0, 4, 4, 6, 7]);
        let pos = p.positions(&Device::Cpu).unwrap().to_vec2::<u32>().unwrap();
        assert_eq!(pos[1], vec![0, 1, 2, 3, 4, 0, 1, 2]);
        // Up to 12 a row: rows of 11 hold [8, 3] and [5, 4, 2], 22 slots for 22 tokens (rows of
        // 12 would take [8, 4] and [5, 3, 2], 24).
        let (p, at) = Packing::pack(&[3, 8, 5, 2, 4], 12);
        assert_eq!((p.rows(), p.len()), (2, 11));
        assert_eq!(at[0], Placement { row: 0, offset: 8 });
        // Documents that no row length lets share stay one a row, padded.
        let (p, at) = Packing::pack(&[71, 69, 64, 45], 128);
        assert_eq!((p.rows(), p.len()), (4, 71));
        assert!(at.iter().all(|p| p.offset == 0));
    }

    #[test]
    fn mask_keeps_documents_apart() {
        let (p, _) = Packing::pack(&[2, 1], 0);
        let m = p.mask(None, &Device::Cpu).unwrap();
        let m = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(m, vec![0.0, inf, 0.0, 0.0, 0.0, inf, inf, 0.0]);
    }
}
