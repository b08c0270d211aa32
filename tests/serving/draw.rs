//! Values the fuzz tests draw: a pick from a pool, and texts from the ordinary to the hostile.

use rand::rngs::StdRng;
use rand::Rng;

/// One of `pool`.
pub fn pick<T: Copy>(r: &mut StdRng, pool: &[T]) -> T {
    pool[r.random_range(0..pool.len())]
}

/// A text: an ordinary sentence half the time, else one from the edges (empty, blank, one token,
/// control characters, mixed scripts, random scalars, or past every token limit).
pub fn text(r: &mut StdRng) -> String {
    match r.random_range(0..14) {
        0..7 => pick(r, &SENTENCES).into(),
        7 => String::new(),
        8 => " \t\n ".into(),
        9 => "a".into(),
        10 => "\u{0}\u{7f}\u{feff}\u{fffd}\u{200d}".into(),
        11 => "🦀 Ünïcödé 東京 ".repeat(r.random_range(1..40)),
        12 => (0..r.random_range(1..64))
            .map(|_| r.random::<char>())
            .collect(),
        _ => "word ".repeat(r.random_range(100..8000)),
    }
}

/// Sentences the tiny model's tokenizer and the learner take.
pub const SENTENCES: [&str; 4] = [
    "On 3 May 2021, Ada Lovelace opened a museum in London.",
    " Ada Lovelace",
    "The museum was opened by",
    "Visitors queued for hours to see the engines of Charles Babbage.",
];
