//! Probes scored through the query API: what `demo` and `eval-stream` ask a real server.

use locus::client::Client;
use locus::eval::data::{StableProbe, Update};

/// One probe's (new log-probability, new tokens, old log-probability, held out).
pub type ProbeScore = (f64, usize, f64, bool);

/// Log-probabilities and token counts of two candidate continuations of `prompt`.
async fn pair(
    client: &mut Client,
    prompt: &str,
    a: &str,
    b: &str,
) -> anyhow::Result<((f64, usize), (f64, usize))> {
    let r = client.score(prompt, &[a.into(), b.into()]).await?;
    let of = |i: u32| r.ranked.iter().find(|c| c.index == i);
    let (Some(x), Some(y)) = (of(0), of(1)) else {
        anyhow::bail!("the server scored {} of 2 candidates", r.ranked.len());
    };
    Ok((
        (x.logprob, x.tokens as usize),
        (y.logprob, y.tokens as usize),
    ))
}

/// Every probe of `facts`, new answer against old, in order.
pub async fn updates(client: &mut Client, facts: &[&Update]) -> anyhow::Result<Vec<ProbeScore>> {
    let mut out = Vec::new();
    for u in facts {
        for p in &u.probes {
            let ((new, tokens), (old, _)) = pair(client, &p.prompt, &p.new, &p.old).await?;
            out.push((new, tokens, old, u.id.starts_with("test-")));
        }
    }
    Ok(out)
}

/// Every stable probe as (gold log-probability, foil log-probability).
pub async fn stable(
    client: &mut Client,
    probes: &[StableProbe],
) -> anyhow::Result<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    for s in probes {
        let ((gold, _), (foil, _)) = pair(client, &s.prompt, &s.gold, &s.foil).await?;
        out.push((gold, foil));
    }
    Ok(out)
}

/// Perplexity over all the texts' tokens together.
pub async fn perplexity(client: &mut Client, texts: &[String]) -> anyhow::Result<f64> {
    let (mut nll, mut tokens) = (0.0, 0.0);
    for chunk in texts.chunks(32) {
        for t in client.perplexity(chunk.to_vec()).await?.texts {
            nll += t.mean_nll * t.tokens as f64;
            tokens += t.tokens as f64;
        }
    }
    Ok((nll / tokens).exp())
}

/// Share of probes whose new answer wins.
pub fn preference(scores: &[ProbeScore]) -> f64 {
    scores.iter().filter(|s| s.0 > s.2).count() as f64 / scores.len().max(1) as f64
}
