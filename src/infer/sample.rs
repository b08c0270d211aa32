//! Picking the next token from a position's logits.

use rand::Rng;

/// Greedy when `temperature <= 0`, else a draw from the top-`top_p` mass of the tempered softmax.
pub(super) fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32)
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, (f64::from(l - max) / temperature).exp()))
        .filter(|(_, p)| p.is_finite())
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    if probs.is_empty() || total.is_nan() || total <= 0.0 {
        return argmax();
    }
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let keep = top_p.clamp(f64::MIN_POSITIVE, 1.0) * total;
    let mut mass = 0.0;
    let mut cut = probs.len();
    for (i, (_, p)) in probs.iter().enumerate() {
        mass += p;
        if mass >= keep {
            cut = i + 1;
            break;
        }
    }
    probs.truncate(cut);
    let mut draw = rng.random::<f64>() * mass;
    for &(id, p) in &probs {
        if draw < p {
            return id;
        }
        draw -= p;
    }
    probs[probs.len() - 1].0
}
