//! Every limit on a request's repeated fields and strings, at the limit and one past it, against a
//! real server on 127.0.0.1:0 with the tiny Llama fixture; and stop-string matching whose cost
//! per token does not grow with the number of stop strings.

mod common;
mod serving;

use serving::*;

use std::time::{Duration, Instant};

use locus::client::Client;
use locus::proto::v1 as pb;
use locus::server::{Config, Limits};
use tokio_stream::StreamExt;
use tonic::Code;

/// What one case sends: a request with `n` of the limited things.
#[derive(Debug, Clone, Copy)]
enum Send {
    Documents,
    BatchId,
    Source,
    Spans,
    Salient,
    TraceTexts,
    TraceSpans,
    TraceSalient,
    Candidates,
    PerplexityTexts,
    StopStrings,
    StopBytes,
    CompleteTokens,
}

/// The limits the cases run under; small, so that each case is cheap at its limit.
fn limits() -> Limits {
    Limits {
        max_documents: 4,
        max_candidates: 3,
        max_stop_strings: 4,
        max_stop_bytes: 32,
        max_salient: 3,
        max_spans: 3,
        max_label_bytes: 16,
        max_complete_tokens: 8,
        ..config().limits
    }
}

/// Each case: what it sends, the field the refusal names, and the limit it meets.
fn cases(l: &Limits) -> Vec<(Send, &'static str, usize)> {
    vec![
        (Send::Documents, "documents", l.max_documents),
        (Send::BatchId, "client_batch_id", l.max_label_bytes),
        (Send::Source, "documents[0].source", l.max_label_bytes),
        (Send::Spans, "documents[0].spans", l.max_spans),
        (Send::Salient, "documents[0].salient", l.max_salient),
        (Send::TraceTexts, "texts", l.max_documents),
        (Send::TraceSpans, "texts[0].spans", l.max_spans),
        (Send::TraceSalient, "texts[0].salient", l.max_salient),
        (Send::Candidates, "candidates", l.max_candidates),
        (Send::PerplexityTexts, "texts", l.max_documents),
        (Send::StopStrings, "stop", l.max_stop_strings),
        (Send::StopBytes, "stop", l.max_stop_bytes),
        (Send::CompleteTokens, "max_tokens", l.max_complete_tokens),
    ]
}

const WORDS: [&str; 6] = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"];

/// A text of six words, `n` of its words as spans.
fn word_spans(n: usize) -> (String, Vec<pb::Span>) {
    let spans = (0..n as u64)
        .map(|i| {
            let start = WORDS[..i as usize].iter().map(|w| w.len() as u64 + 1).sum();
            pb::Span {
                start,
                end: start + WORDS[i as usize].len() as u64,
            }
        })
        .collect();
    (WORDS.join(" "), spans)
}

/// The six-word text with `n` of its words as salient strings.
fn word_salient(n: usize) -> Vec<String> {
    WORDS[..n].iter().map(|w| w.to_string()).collect()
}

/// Ingests one batch and insists that every document was accepted.
async fn ingest_all(client: &mut Client, request: pb::IngestRequest) -> Result<(), tonic::Status> {
    let n = request.documents.len() as u32;
    let answers = ingest(client, vec![request]).await?;
    assert_eq!(
        answers[0].accepted,
        (0..n).collect::<Vec<_>>(),
        "{answers:?}"
    );
    Ok(())
}

/// Completes and reads the stream to its last chunk.
async fn complete_all(
    client: &mut Client,
    request: pb::CompleteRequest,
) -> Result<pb::CompleteChunk, tonic::Status> {
    let mut stream = client.complete(request).await.map_err(status)?;
    let mut last = None;
    while let Some(chunk) = stream.next().await {
        last = Some(chunk?);
    }
    Ok(last.expect("a last chunk"))
}

/// Sends the request of `what` with `n` of its limited things.
async fn send(client: &mut Client, what: Send, n: usize) -> Result<(), tonic::Status> {
    let one_doc = |d: pb::Document| batch("limits", vec![d]);
    let trace_text = |text: String, spans: Vec<pb::Span>, salient: Vec<String>| pb::TraceText {
        text,
        spans,
        salient,
    };
    let completion = |stop: Vec<String>, max_tokens: u32| pb::CompleteRequest {
        prompt: "The museum".into(),
        max_tokens,
        stop,
        seed: Some(1),
        ..Default::default()
    };
    match what {
        Send::Documents => ingest_all(client, batch("limits", vec![facts()[0].clone(); n])).await,
        Send::BatchId => ingest_all(client, batch(&"b".repeat(n), vec![facts()[0].clone()])).await,
        Send::Source => {
            let d = pb::Document {
                source: "s".repeat(n),
                ..facts()[0].clone()
            };
            ingest_all(client, one_doc(d)).await
        }
        Send::Spans => {
            let (text, spans) = word_spans(n);
            let d = pb::Document {
                text,
                spans,
                ..Default::default()
            };
            ingest_all(client, one_doc(d)).await
        }
        Send::Salient => {
            let d = pb::Document {
                text: WORDS.join(" "),
                salient: word_salient(n),
                ..Default::default()
            };
            ingest_all(client, one_doc(d)).await
        }
        Send::TraceTexts => {
            let t = trace_text(WORDS.join(" "), Vec::new(), word_salient(1));
            client.trace(vec![t; n]).await.map(drop).map_err(status)
        }
        Send::TraceSpans => {
            let (text, spans) = word_spans(n);
            let t = trace_text(text, spans, Vec::new());
            client.trace(vec![t]).await.map(drop).map_err(status)
        }
        Send::TraceSalient => {
            let t = trace_text(WORDS.join(" "), Vec::new(), word_salient(n));
            client.trace(vec![t]).await.map(drop).map_err(status)
        }
        Send::Candidates => {
            let candidates: Vec<String> = (0..n).map(|i| format!(" {i}")).collect();
            let s = client.score("Count:", &candidates).await.map_err(status)?;
            assert_eq!(s.ranked.len(), n);
            Ok(())
        }
        Send::PerplexityTexts => {
            let texts = vec!["Ada Lovelace opened a museum.".to_string(); n];
            let p = client.perplexity(texts).await.map_err(status)?;
            assert_eq!(p.texts.len(), n);
            Ok(())
        }
        Send::StopStrings => {
            let stop = (0..n).map(|i| format!("#{i}#")).collect();
            complete_all(client, completion(stop, 4)).await.map(drop)
        }
        Send::StopBytes => complete_all(client, completion(vec!["z".repeat(n)], 4))
            .await
            .map(drop),
        Send::CompleteTokens => {
            let last = complete_all(client, completion(Vec::new(), n as u32)).await?;
            assert!(last.tokens as usize <= n, "{last:?}");
            Ok(())
        }
    }
}

/// A server with the test configuration under `limits`.
async fn start_under(limits: &Limits) -> Running {
    start_with(
        Config {
            limits: limits.clone(),
            ..config()
        },
        true,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limit_admits_its_maximum_and_refuses_one_more_naming_the_field() {
    let limits = limits();
    let server = start_under(&limits).await;
    let mut client = server.client().await;
    for (what, field, limit) in cases(&limits) {
        if let Err(s) = send(&mut client, what, limit).await {
            panic!("{what:?} at its limit {limit} was refused: {s:?}");
        }
        let s = send(&mut client, what, limit + 1)
            .await
            .expect_err("one past the limit");
        let m = s.message();
        assert_eq!(s.code(), Code::ResourceExhausted, "{what:?}: {s:?}");
        assert!(
            m.starts_with(&format!("{field}: {} ", limit + 1))
                && m.ends_with(&format!(", at most {limit}")),
            "{what:?}: {m}"
        );
    }
    server.shutdown().await;
}

#[test]
fn every_limit_is_a_serve_flag_with_an_environment_variable() {
    let help = common::ok(&["serve", "--help"]).stdout;
    for (flag, var) in [
        ("--max-documents", "LOCUS_MAX_DOCUMENTS"),
        ("--max-candidates", "LOCUS_MAX_CANDIDATES"),
        ("--max-stop-strings", "LOCUS_MAX_STOP_STRINGS"),
        ("--max-stop-bytes", "LOCUS_MAX_STOP_BYTES"),
        ("--max-salient", "LOCUS_MAX_SALIENT"),
        ("--max-spans", "LOCUS_MAX_SPANS"),
        ("--max-label-bytes", "LOCUS_MAX_LABEL_BYTES"),
        ("--max-complete-tokens", "LOCUS_MAX_COMPLETE_TOKENS"),
        ("--max-concurrent-streams", "LOCUS_MAX_CONCURRENT_STREAMS"),
        ("--send-timeout", "LOCUS_SEND_TIMEOUT"),
        ("--ingest-idle", "LOCUS_INGEST_IDLE"),
        ("--keepalive-interval", "LOCUS_KEEPALIVE_INTERVAL"),
        ("--keepalive-timeout", "LOCUS_KEEPALIVE_TIMEOUT"),
    ] {
        assert!(
            help.contains(flag) && help.contains(var),
            "{flag} {var}:\n{help}"
        );
    }
}

/// With every stop string it may bring, a completion is matched as one automaton over only the
/// text that can hold a new match; before, every token searched the whole text for every string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_with_the_most_stop_strings_allowed_finishes_in_time() {
    let limits = Limits {
        max_stop_strings: 50_000,
        max_stop_bytes: 1 << 20,
        max_message_bytes: 4 << 20,
        max_complete_tokens: 64,
        ..config().limits
    };
    let server = start_under(&limits).await;
    let mut client = server.client().await;
    // Strings the tiny model will not produce, so that generation runs to its length limit.
    let stop: Vec<String> = (0..limits.max_stop_strings)
        .map(|i| format!("never-{i:06}-stop"))
        .collect();
    assert!(stop.iter().map(String::len).sum::<usize>() <= limits.max_stop_bytes);
    let request = pb::CompleteRequest {
        prompt: "The museum".into(),
        max_tokens: 64,
        temperature: 1.0,
        stop,
        seed: Some(7),
        ..Default::default()
    };
    let start = Instant::now();
    let last = tokio::time::timeout(Duration::from_secs(10), complete_all(&mut client, request))
        .await
        .expect("the completion finished within its 10 s deadline")
        .unwrap();
    eprintln!(
        "{} stop strings, {} tokens: {:.2?}",
        limits.max_stop_strings,
        last.tokens,
        start.elapsed()
    );
    assert_eq!(
        last.finish_reason,
        pb::FinishReason::Length as i32,
        "{last:?}"
    );
    assert!(last.tokens > 32, "{last:?}");
    server.shutdown().await;
}
