//! The gRPC server, started in-process on 127.0.0.1:0 with the tiny Llama fixture and talked to
//! over the network with the generated client.

mod common;
mod serving;

use serving::*;

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use locus::client::{Client, ClientError};
use locus::learn::Strategy;
use locus::model::load;
use locus::proto::v1 as pb;
use locus::server::{self, Auth, Config, State, Token};
use locus::store::publish::Published;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_changes_the_model_and_the_version() {
    let server = start().await;
    let mut client = server.client().await;
    let before = score(&mut client).await;
    assert_eq!(before.version, 0);

    let answers = ingest(&mut client, vec![batch("b1", facts())])
        .await
        .unwrap();
    assert_eq!(answers.len(), 1);
    let r = &answers[0];
    assert_eq!(r.client_batch_id, "b1");
    assert_eq!(r.accepted, vec![0, 1, 2]);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert_eq!(r.steps.len(), 1);
    let step = &r.steps[0];
    assert!(step.applied && step.traced, "{step:?}");
    assert_eq!(step.version, 1);
    assert_eq!(r.version, 1);
    assert_eq!(step.documents, 3);
    assert!(
        !step.groups.is_empty() && step.groups.len() < 4,
        "{:?}",
        step.groups
    );
    assert!(step.loss_after.unwrap() < step.loss_before, "{step:?}");
    // Spans: given for the first two documents, found by an automatic rule for the third.
    assert_eq!(step.span_rules.len(), 3);
    assert_eq!(step.span_rules[..2], [pb::SpanRule::Given as i32; 2]);
    assert!(
        [pb::SpanRule::Entity as i32, pb::SpanRule::Surprisal as i32].contains(&step.span_rules[2])
    );
    // What the span loss leaned on: the salient strings, then the automatic rule's pick.
    let texts: Vec<&[String]> = step.spans.iter().map(|d| &d.texts[..]).collect();
    assert_eq!(texts.len(), 3, "{step:?}");
    assert_eq!(texts[0], ["Ada Lovelace"]);
    assert_eq!(texts[1], ["Ada Lovelace"]);
    assert!(!texts[2].is_empty(), "{step:?}");

    let after = score(&mut client).await;
    assert_eq!(after.version, 1);
    assert_ne!(logprob(&before, 0), logprob(&after, 0));

    let versions = client.list_versions().await.unwrap();
    assert_eq!(versions.current, 1);
    let listed: Vec<u64> = versions.versions.iter().map(|v| v.version).collect();
    assert_eq!(listed, vec![0, 1]);
    assert_eq!(versions.versions[0].origin, "loaded");
    let changed: Vec<(u32, i32)> = versions.versions[1]
        .changed
        .iter()
        .map(|g| (g.layer, g.module))
        .collect();
    let reported: Vec<(u32, i32)> = step.groups.iter().map(|g| (g.layer, g.module)).collect();
    assert_eq!(changed, reported);

    let info = client.info().await.unwrap();
    assert_eq!(info.version, 1);
    assert_eq!(info.steps, 1);
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.strategy, "tgl-fp");
    assert_eq!(info.localization, "per-batch");
    assert!(!info.selection.is_empty());

    // Rolling back to version 0 makes version 2 with version 0's weights, bit for bit.
    let rb = client.rollback(0).await.unwrap();
    assert_eq!((rb.version, rb.restored_from), (2, 0));
    let restored = score(&mut client).await;
    assert_eq!(restored.version, 2);
    assert_eq!(logprob(&restored, 0), logprob(&before, 0));
    assert_eq!(logprob(&restored, 1), logprob(&before, 1));
    let again = ingest(&mut client, vec![batch("b2", facts())])
        .await
        .unwrap();
    assert_eq!(again[0].version, 3);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_document_is_rejected_with_its_reason_and_the_rest_is_applied() {
    let server = start().await;
    let mut client = server.client().await;
    let long = "word ".repeat(200);
    let mut docs = vec![
        facts()[0].clone(),
        doc("   ", &[]),
        pb::Document {
            text: "Short text.".into(),
            spans: vec![pb::Span { start: 3, end: 99 }],
            ..Default::default()
        },
        pb::Document {
            text: "Inverted span here.".into(),
            spans: vec![pb::Span { start: 5, end: 2 }],
            ..Default::default()
        },
        doc("Nobody is named here.", &["Ada Lovelace"]),
        doc(&long, &[]),
        facts()[1].clone(),
    ];
    docs.truncate(7);
    let answers = ingest(
        &mut client,
        vec![batch("mixed", docs), batch("next", facts())],
    )
    .await
    .unwrap();
    assert_eq!(answers.len(), 2, "the stream goes on after rejections");
    let r = &answers[0];
    assert_eq!(r.accepted, vec![0, 6]);
    let fields: BTreeMap<u32, &str> = r
        .rejected
        .iter()
        .map(|j| (j.index, j.field.as_str()))
        .collect();
    assert_eq!(
        fields,
        BTreeMap::from([
            (1, "documents[1].text"),
            (2, "documents[2].spans"),
            (3, "documents[3].spans"),
            (4, "documents[4].salient"),
            (5, "documents[5].text"),
        ])
    );
    let reason = |i: u32| &r.rejected.iter().find(|j| j.index == i).unwrap().reason;
    assert!(reason(1).contains("empty"), "{}", reason(1));
    assert!(reason(2).contains("out of range"), "{}", reason(2));
    assert!(reason(3).contains("inverted"), "{}", reason(3));
    assert!(reason(4).contains("does not occur"), "{}", reason(4));
    assert!(reason(5).contains("the limit is 128"), "{}", reason(5));
    assert!(r.steps[0].applied);
    assert_eq!(r.steps[0].documents, 2);
    assert_eq!(r.version, 1);
    assert_eq!(answers[1].version, 2);

    // A batch whose every document is refused is answered without learning.
    let none = ingest(&mut client, vec![batch("empty", vec![doc("", &[])])])
        .await
        .unwrap();
    assert!(none[0].steps.is_empty() && none[0].accepted.is_empty());
    assert_eq!(none[0].version, 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_answer_with_the_version_they_used() {
    let server = start().await;
    let mut client = server.client().await;

    let s = score(&mut client).await;
    assert_eq!(s.version, 0);
    assert_eq!(s.ranked.len(), 2);
    assert!(s.ranked[0].logprob >= s.ranked[1].logprob);
    assert!(s.ranked.iter().all(|c| c.logprob < 0.0 && c.tokens > 0));

    let p = client
        .perplexity(vec![
            "Ada Lovelace opened a museum.".into(),
            "London is large.".into(),
        ])
        .await
        .unwrap();
    assert_eq!(p.version, 0);
    assert_eq!(p.texts.len(), 2);
    for t in &p.texts {
        assert!(t.perplexity > 1.0 && t.perplexity.is_finite(), "{t:?}");
        assert!((t.mean_nll.exp() - t.perplexity).abs() < 1e-9);
    }

    let complete = |temperature: f32, seed: Option<u64>, stop: Vec<String>| pb::CompleteRequest {
        prompt: "The museum".into(),
        max_tokens: 8,
        temperature,
        top_p: 0.9,
        stop,
        seed,
    };
    let mut collect = async |req: pb::CompleteRequest| {
        let mut stream = client.complete(req).await.unwrap();
        let mut chunks = Vec::new();
        while let Some(c) = stream.next().await {
            chunks.push(c.unwrap());
        }
        chunks
    };
    let greedy = collect(complete(0.0, None, vec![])).await;
    let last = greedy.last().unwrap();
    assert_eq!(last.finish_reason(), pb::FinishReason::Length);
    assert_eq!(last.tokens, 8);
    assert!(greedy.iter().all(|c| c.version == 0));
    assert!(greedy[..greedy.len() - 1]
        .iter()
        .all(|c| c.finish_reason() == pb::FinishReason::Unspecified));
    let text: String = greedy.iter().map(|c| c.text.as_str()).collect();
    assert!(!text.is_empty());
    let again: String = collect(complete(0.0, None, vec![]))
        .await
        .iter()
        .map(|c| c.text.clone())
        .collect();
    assert_eq!(text, again, "greedy decoding is deterministic");
    let seeded: Vec<String> = [
        collect(complete(1.0, Some(7), vec![])).await,
        collect(complete(1.0, Some(7), vec![])).await,
    ]
    .iter()
    .map(|cs| cs.iter().map(|c| c.text.as_str()).collect())
    .collect();
    assert_eq!(seeded[0], seeded[1], "a seed reproduces a sample");
    let mut others = Vec::new();
    for seed in 1..=4 {
        let sample: String = collect(complete(1.0, Some(seed), vec![]))
            .await
            .iter()
            .map(|c| c.text.clone())
            .collect();
        others.push(sample);
    }
    assert!(
        others.iter().any(|t| *t != seeded[0]),
        "other seeds draw other samples: {others:?}"
    );

    // A stop string taken from the greedy text ends generation before it.
    let cut = text.chars().count() / 2;
    let stop: String = text.chars().skip(cut).take(2).collect();
    if !stop.trim().is_empty() {
        let stopped = collect(complete(0.0, None, vec![stop.clone()])).await;
        let stopped_text: String = stopped.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            stopped.last().unwrap().finish_reason(),
            pb::FinishReason::Stop
        );
        assert!(text.starts_with(&stopped_text));
        assert!(!stopped_text.contains(&stop));
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_during_ingest_see_consistent_non_decreasing_versions() {
    let server = start().await;
    let mut writer = server.client().await;
    let mut reader = server.client().await;
    let mut seen: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    let mut last = 0;
    let mut observe = |r: &pb::ScoreResponse| {
        assert!(
            r.version >= last,
            "version went back from {last} to {}",
            r.version
        );
        last = r.version;
        let scores = (logprob(r, 0), logprob(r, 1));
        // Every query on one version computes on the same weights: identical answers.
        assert_eq!(
            *seen.entry(r.version).or_insert(scores),
            scores,
            "version {}",
            r.version
        );
    };
    observe(&score(&mut reader).await);
    let batches: Vec<pb::IngestRequest> = (0..6).map(|i| batch(&i.to_string(), facts())).collect();
    let ingest_task = tokio::spawn(async move { ingest(&mut writer, batches).await });
    while !ingest_task.is_finished() {
        observe(&score(&mut reader).await);
    }
    let answers = ingest_task.await.unwrap().unwrap();
    let versions: Vec<u64> = answers.iter().map(|a| a.version).collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5, 6]);
    let final_score = score(&mut reader).await;
    assert_eq!(final_score.version, 6);
    observe(&final_score);
    assert!(seen.contains_key(&0) && seen.contains_key(&6), "{seen:?}");
    assert_ne!(seen[&0], seen[&6]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_reports_group_norms_and_names_bad_fields() {
    let server = start().await;
    let mut client = server.client().await;
    let text = |t: &str, salient: &[&str]| pb::TraceText {
        text: t.into(),
        salient: salient.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let r = client
        .trace(vec![
            text(
                "On 3 May 2021, Ada Lovelace opened a museum.",
                &["Ada Lovelace"],
            ),
            text(
                "The engines of Charles Babbage were shown.",
                &["Charles Babbage"],
            ),
        ])
        .await
        .unwrap();
    assert_eq!(r.version, 0);
    assert_eq!(r.groups.len(), 4);
    assert_eq!(r.per_text.len(), 2);
    assert!(r
        .groups
        .iter()
        .all(|g| g.span_norm > 0.0 && g.full_norm > 0.0));
    assert!(r.groups.iter().any(|g| g.selected));
    let (c, m) = code(client.trace(vec![text("No spans at all.", &[])]).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.starts_with("texts[0].spans"), "{m}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_serving_and_reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    // Without a model: NOT_SERVING, and the services are UNAVAILABLE.
    let empty = start_with(config(), false).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", empty.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let s = health.check(check("")).await.unwrap().into_inner();
    assert_eq!(s.status(), ServingStatus::NotServing);
    let (c, _) = code(score_result(&mut empty.client().await).await);
    assert_eq!(c, Code::Unavailable);
    empty.shutdown().await;

    let server = start().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "locus.v1.Learn", "locus.v1.Query", "locus.v1.Admin"] {
        let s = health.check(check(service)).await.unwrap().into_inner();
        assert_eq!(s.status(), ServingStatus::Serving, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "locus.v1.Learn",
        "locus.v1.Query",
        "locus.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    // The descriptor of a service resolves, imports included.
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "locus.v1.Learn".into(),
        )),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("no descriptor");
    };
    assert!(!files.file_descriptor_proto.is_empty());

    // The older v1alpha reflection answers too (grpcurl and Postman still use it).
    let mut alpha =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
            channel,
        );
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let answer = alpha
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .unwrap()
        .unwrap();
    assert!(answer.message_response.is_some());
    server.shutdown().await;
}

async fn score_result(client: &mut Client) -> Result<pb::ScoreResponse, ClientError> {
    client.score("A prompt", &[" answer".to_string()]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_bad_input_reject_with_the_right_codes() {
    let server = start().await;
    let mut client = server.client().await;

    // Too many documents in a batch: RESOURCE_EXHAUSTED ends the stream.
    let many = vec![facts()[0].clone(); 9];
    let s = ingest(&mut client, vec![batch("many", many)])
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().starts_with("documents"), "{}", s.message());

    // A message over the size limit.
    let huge = vec![doc(&"x".repeat(70 << 10), &[])];
    let s = ingest(&mut client, vec![batch("huge", huge)])
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");

    let (c, m) = code(
        client
            .score(&"x".repeat(70 << 10), &[" a".to_string()])
            .await,
    );
    assert_eq!(c, Code::ResourceExhausted, "{m}");
    assert!(m.contains("too large"), "{m}");

    let five: Vec<String> = (0..5).map(|i| format!(" {i}")).collect();
    let (c, m) = code(client.score("Count:", &five).await);
    assert_eq!(
        (c, m.starts_with("candidates")),
        (Code::ResourceExhausted, true),
        "{m}"
    );
    let (c, m) = code(client.score("Count:", &[]).await);
    assert_eq!(
        (c, m.starts_with("candidates")),
        (Code::InvalidArgument, true),
        "{m}"
    );
    let (c, m) = code(client.score("", &[" a".to_string()]).await);
    assert_eq!(
        (c, m.starts_with("prompt")),
        (Code::InvalidArgument, true),
        "{m}"
    );
    let (c, m) = code(
        client
            .perplexity(vec!["ok text here".into(), "a".into()])
            .await,
    );
    assert_eq!(
        (c, m.starts_with("texts[1]")),
        (Code::InvalidArgument, true),
        "{m}"
    );
    let (c, m) = code(client.perplexity(vec!["word ".repeat(100)]).await);
    assert_eq!(
        (c, m.starts_with("texts[0]")),
        (Code::ResourceExhausted, true),
        "{m}"
    );
    let request = pb::CompleteRequest {
        prompt: "Hi".into(),
        max_tokens: 17,
        ..Default::default()
    };
    let (c, m) = code(client.complete(request).await);
    assert_eq!(
        (c, m.starts_with("max_tokens")),
        (Code::ResourceExhausted, true),
        "{m}"
    );
    let request = pb::CompleteRequest {
        prompt: "Hi".into(),
        top_p: 1.5,
        ..Default::default()
    };
    let (c, m) = code(client.complete(request).await);
    assert_eq!(
        (c, m.starts_with("top_p")),
        (Code::InvalidArgument, true),
        "{m}"
    );
    let (c, _) = code(client.rollback(42).await);
    assert_eq!(c, Code::NotFound);
    let s = ingest(&mut client, vec![batch("none", vec![])])
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);

    // Paused learning refuses ingest with FAILED_PRECONDITION; queries go on.
    assert!(client.pause().await.unwrap().paused);
    let s = ingest(&mut client, vec![batch("p", facts())])
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert_eq!(score(&mut client).await.version, 0);
    assert!(!client.resume().await.unwrap().paused);
    assert_eq!(
        ingest(&mut client, vec![batch("r", facts())])
            .await
            .unwrap()[0]
            .version,
        1
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_guard_writes_and_queries() {
    let config = Config {
        auth: Auth {
            write: Some(Token::new("writer-secret")),
            query: Some(Token::new("reader-secret")),
        },
        ..config()
    };
    let server = start_with(config, true).await;
    let mut anonymous = server.client().await;
    let mut reader = server.client_with("reader-secret").await;
    let mut writer = server.client_with("writer-secret").await;
    let mut wrong = server.client_with("writer-secreT").await;

    assert_eq!(code(anonymous.info().await).0, Code::Unauthenticated);
    assert_eq!(code(reader.info().await).0, Code::Unauthenticated);
    assert_eq!(code(wrong.info().await).0, Code::Unauthenticated);
    assert_eq!(writer.info().await.unwrap().version, 0);
    let s = ingest(&mut reader, vec![batch("r", facts())])
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert_eq!(
        ingest(&mut writer, vec![batch("w", facts())])
            .await
            .unwrap()[0]
            .version,
        1
    );

    assert_eq!(
        code(score_result(&mut anonymous).await).0,
        Code::Unauthenticated
    );
    assert_eq!(
        code(score_result(&mut wrong).await).0,
        Code::Unauthenticated
    );
    assert_eq!(score_result(&mut reader).await.unwrap().version, 1);
    assert_eq!(score_result(&mut writer).await.unwrap().version, 1);
    let (c, m) = code(wrong.info().await);
    assert!(c == Code::Unauthenticated && !m.contains("secret"), "{m}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reports_not_serving_finishes_the_batch_and_returns() {
    let server = start().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    // An ingest stream that stays open: one batch answered, a second in flight at shutdown.
    let mut client = server.client().await;
    let (tx, rx) = mpsc::channel(4);
    let mut answers = client.ingest(ReceiverStream::new(rx)).await.unwrap();
    tx.send(batch("first", facts())).await.unwrap();
    assert_eq!(answers.next().await.unwrap().unwrap().version, 1);
    tx.send(batch("second", facts())).await.unwrap();

    let state = Arc::clone(&server.state);
    let stopping = tokio::spawn(server.shutdown());
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    // A watch never ends by itself; an open one would hold shutdown for the whole grace period.
    drop(watch);
    // The batch already read is finished and answered; then the stream ends UNAVAILABLE.
    let mut tail = Vec::new();
    while let Some(r) = answers.next().await {
        tail.push(r);
    }
    let last = tail.pop().unwrap().unwrap_err();
    assert_eq!(last.code(), Code::Unavailable, "{last:?}");
    for r in tail {
        assert_eq!(r.unwrap().version, 2);
    }
    drop(tx);
    stopping.await.unwrap();
    drop(state);
}

/// Bits of a tensor, for exact comparison.
fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn snapshots_hold_copies_and_share_only_unchanged_tensors() {
    use locus::learn::{Doc, Learner};
    use locus::model::ParamKind;
    use locus::snapshot::{Snapshot, Snapshots};

    let model = Arc::new(load::load(fixture("llama").to_str().unwrap(), &Device::Cpu).unwrap());
    let names: Vec<String> = model.vars.keys().cloned().collect();
    let first = Snapshot::load(Arc::clone(&model), 0).unwrap();
    let loaded: BTreeMap<String, Vec<u32>> = names
        .iter()
        .map(|n| (n.clone(), bits(first.tensor(n).unwrap())))
        .collect();
    let snapshots = Snapshots::new(first, 2);
    let mut learner = Learner::new(Arc::clone(&model), config().learn, vec![], 0).unwrap();
    let docs: Vec<Doc> = facts()
        .into_iter()
        .map(|d| Doc {
            text: d.text,
            spans: None,
        })
        .collect();

    for step in 1..=3u64 {
        let report = learner.step(&docs).unwrap();
        assert!(report.applied);
        let previous = snapshots.current();
        // The learner changed its variables in place; the served snapshot did not move.
        if step == 1 {
            for n in &names {
                assert_eq!(bits(previous.tensor(n).unwrap()), loaded[n], "{n}");
            }
        }
        let changed: Vec<_> = report.groups.iter().map(|g| g.id()).collect();
        let weights = learner.current_params().unwrap();
        let next = previous
            .after_update(report.version, &changed, &weights)
            .unwrap();
        for n in &names {
            let in_changed =
                matches!(model.arch.kind_of(n), Some(ParamKind::Group(g)) if changed.contains(&g));
            let (old, new) = (previous.tensor(n).unwrap(), next.tensor(n).unwrap());
            if in_changed {
                assert_ne!(old.id(), new.id(), "{n} is copied");
                assert_eq!(bits(new), bits(&model.vars[n]), "{n} holds the update");
            } else {
                assert_eq!(old.id(), new.id(), "{n} is shared");
            }
        }
        snapshots.publish(next).unwrap();
        assert_eq!(snapshots.current().version(), step);
    }
    // Only the last two versions are kept, and a stale version cannot be published.
    let kept: Vec<u64> = snapshots.retained().iter().map(|s| s.version()).collect();
    assert_eq!(kept, vec![2, 3]);
    let stale = snapshots
        .current()
        .after_update(3, &[], &model.params(|_| false))
        .unwrap();
    assert!(snapshots.publish(stale).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_updates_are_served_too() {
    let mut config = config();
    config.learn.strategy = Strategy::parse("lora+tgl-fp").unwrap();
    let server = start_with(config, true).await;
    let mut client = server.client().await;
    let before = score(&mut client).await;
    let answers = ingest(&mut client, vec![batch("lora", facts())])
        .await
        .unwrap();
    assert!(answers[0].steps[0].applied);
    let after = score(&mut client).await;
    assert_eq!((before.version, after.version), (0, 1));
    // The adapters live outside the variables; the served snapshot must include them.
    assert_ne!(logprob(&before, 0), logprob(&after, 0));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_follow_the_writer_through_a_shared_store() {
    let store = tempfile::tempdir().unwrap();
    writer_and_two_readers(&store.path().display().to_string()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_follow_the_writer_through_a_file_url() {
    // The chart's spelling of a shared volume.
    let store = tempfile::tempdir().unwrap();
    let url = format!("file://{}", store.path().display());
    writer_and_two_readers(&url).await;
    large_file_round_trips(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_refuses_a_published_version_that_writes_outside_the_layer_groups() {
    let data = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let spec = store.path().display().to_string();
    let writer = start_with(writer_config(data.path(), &spec, 100, 2), true).await;
    let mut w = writer.client().await;
    ingest(&mut w, vec![batch("b0", facts())]).await.unwrap();
    wait_for_published(&mut w, 1).await;
    let following = start_with(reader_config(&spec), true).await;
    let mut r = following.client().await;
    let first = score_bits(&mut r).await;
    assert_eq!(first, score_bits(&mut w).await);

    // A version 2 that also carries the embeddings, which nothing learns and which served
    // versions share with the variables: applying it would rewrite every kept version.
    let at = spec.clone();
    tokio::task::spawn_blocking(move || {
        let published = Published::open(&at).unwrap();
        let mut delta = published.delta_to(1, &Device::Cpu).unwrap();
        (delta.meta.version, delta.meta.parent) = (2, Some(1));
        let embeddings = Tensor::zeros((320, 32), DType::F32, &Device::Cpu).unwrap();
        delta
            .tensors
            .insert("model.embed_tokens.weight".into(), embeddings);
        published.delta(&delta.meta, &delta.tensors).unwrap();
    })
    .await
    .unwrap();

    // A following reader keeps serving version 1, untouched, and says it is behind.
    wait_for_info(&mut r, "version 2 in the store", |i| {
        i.published_version >= 2
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let info = r.info().await.unwrap();
    assert_eq!((info.version, info.behind), (1, 1));
    assert_eq!(score_bits(&mut r).await, first);

    // A reader starting on that store refuses to start, naming the version and the tensor.
    let starting = State::new(reader_config(&spec)).await;
    let model = load::load(fixture("llama").to_str().unwrap(), &Device::Cpu).unwrap();
    let message = starting.install(model).await.unwrap_err().to_string();
    assert!(
        message.contains("version 2") && message.contains("model.embed_tokens.weight"),
        "{message}"
    );
    following.shutdown().await;
    writer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_that_failed_to_publish_is_covered_by_a_checkpoint() {
    let data = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let spec = store.path().display().to_string();
    let writer = start_with(writer_config(data.path(), &spec, 100, 2), true).await;
    let reader = start_with(reader_config(&spec), true).await;
    let (mut w, mut r) = (writer.client().await, reader.client().await);
    ingest(&mut w, vec![batch("b0", facts())]).await.unwrap();
    wait_for_version(&mut r, 1).await;

    // A file where the deltas folder was: publishing version 2 fails, learning does not.
    let deltas = store.path().join("deltas");
    std::fs::rename(&deltas, store.path().join("deltas.away")).unwrap();
    std::fs::write(&deltas, b"in the way").unwrap();
    ingest(&mut w, vec![batch("b1", facts())]).await.unwrap();
    assert_eq!(w.info().await.unwrap().version, 2);
    // Publishing runs beside learning: wait until the writer has tried, and failed.
    let info = wait_for_info(&mut w, "a publish failure", |i| i.publish_failures > 0).await;
    assert_eq!(
        info.publish_failures, 1,
        "the writer reports the failed delta"
    );
    std::fs::remove_file(&deltas).unwrap();
    std::fs::rename(store.path().join("deltas.away"), &deltas).unwrap();

    // Deltas after 1 alone would lack update 2: the writer publishes a checkpoint covering it (at
    // the next update, or sooner when its retry timer fires first), and the reader serves exactly
    // the writer's model.
    ingest(&mut w, vec![batch("b2", facts())]).await.unwrap();
    wait_for_version(&mut r, 3).await;
    let covering = [2, 3].map(|v| store.path().join(format!("checkpoints/{v:020}.ckpt")));
    assert!(
        covering.iter().any(|p| p.exists()),
        "no checkpoint covers update 2"
    );
    assert_eq!(score_bits(&mut r).await, score_bits(&mut w).await);
    reader.shutdown().await;
    writer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_reaches_versions_kept_only_as_checkpoints_and_the_base_model() {
    let data = tempfile::tempdir().unwrap();
    let durable = || Config {
        durability: Some(locus::store::Durability {
            dir: data.path().to_path_buf(),
            checkpoint_every: 1,
            keep_checkpoints: 10,
        }),
        keep_versions: 2,
        ..config()
    };
    let server = start_with(durable(), true).await;
    let mut c = server.client().await;
    let base = score_bits(&mut c).await.1;
    ingest(&mut c, vec![batch("b0", facts())]).await.unwrap();
    let first = score_bits(&mut c).await;
    assert_eq!(first.0, 1);
    let later = (1..4)
        .map(|i| batch(&format!("b{i}"), facts()))
        .collect::<Vec<_>>();
    ingest(&mut c, later).await.unwrap();
    assert_eq!(c.info().await.unwrap().version, 4);

    // Version 1 left memory (two versions are kept) but its checkpoint is on disk.
    let listed = c.list_versions().await.unwrap();
    let in_memory: Vec<u64> = listed.versions.iter().map(|v| v.version).collect();
    assert_eq!(
        (in_memory, listed.checkpoints),
        (vec![3, 4], vec![1, 2, 3, 4])
    );
    let rolled = c.rollback(1).await.unwrap();
    assert_eq!((rolled.version, rolled.restored_from), (5, 1));
    assert_eq!(score_bits(&mut c).await, (5, first.1.clone()));
    // Version 0 is the base model, read again from the model's files.
    assert_eq!(c.rollback(0).await.unwrap().version, 6);
    assert_eq!(score_bits(&mut c).await, (6, base.clone()));
    let (code, message) = code(c.rollback(99).await);
    assert_eq!(code, Code::NotFound);
    assert!(
        message.contains("as checkpoints") && message.contains("0, the base model"),
        "{message}"
    );
    server.shutdown().await;

    // The rollback is durable.
    let server = start_with(durable(), true).await;
    let mut c = server.client().await;
    assert_eq!(score_bits(&mut c).await, (6, base));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_refuses_a_store_ahead_of_its_data_directory() {
    let store = tempfile::tempdir().unwrap();
    let spec = store.path().display().to_string();
    let writer_with = |data: &std::path::Path| writer_config(data, &spec, 100, 1);
    let data = tempfile::tempdir().unwrap();
    let writer = start_with(writer_with(data.path()), true).await;
    let mut w = writer.client().await;
    ingest(&mut w, vec![batch("b0", facts())]).await.unwrap();
    wait_for_published(&mut w, 1).await;
    writer.shutdown().await;

    // Its data directory lost (or a second writer): publishing from version 0 again would leave
    // readers on a history this writer does not continue.
    let fresh = tempfile::tempdir().unwrap();
    let state = State::new(writer_with(fresh.path())).await;
    let model = load::load(fixture("llama").to_str().unwrap(), &Device::Cpu).unwrap();
    let e = state
        .install(model)
        .await
        .expect_err("a store ahead of the writer");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.to_string().contains("holds version 1"), "{e}");
    // With its own data directory the writer starts again.
    let again = start_with(writer_with(data.path()), true).await;
    assert_eq!(again.client().await.info().await.unwrap().version, 1);
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_settings_that_cannot_work_are_refused() {
    let store = tempfile::tempdir().unwrap();
    let model = || load::load(fixture("llama").to_str().unwrap(), &Device::Cpu).unwrap();
    let refused = |config: Config| async {
        let state = State::new(config).await;
        let e = state.install(model()).await.expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument);
        e.to_string()
    };
    let message = refused(Config {
        store: Some(store.path().display().to_string()),
        ..config()
    })
    .await;
    assert!(message.contains("--data-dir"), "{message}");
    let message = refused(Config {
        role: server::Role::Reader,
        ..config()
    })
    .await;
    assert!(message.contains("--store"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forgetting_guard_undoes_updates_that_raise_canary_perplexity() {
    let guarded = |max_ratio: f64| Config {
        guard: Some(server::Guard {
            canaries: vec![
                "The river flows past the old mill every spring.".into(),
                "Bread is baked early in the morning.".into(),
            ],
            max_ratio,
        }),
        ..config()
    };
    // No ratio is allowed: every update is undone, and queries never see it.
    let strict = start_with(guarded(0.0), true).await;
    let mut c = strict.client().await;
    let before = score_bits(&mut c).await;
    let answers = ingest(&mut c, vec![batch("b0", facts())]).await.unwrap();
    let step = &answers[0].steps[0];
    assert!(!step.applied);
    assert!(
        step.skipped.contains("forgetting guard"),
        "{}",
        step.skipped
    );
    assert_eq!(answers[0].version, 0);
    assert_eq!(score_bits(&mut c).await, before);
    strict.shutdown().await;

    // Any ratio is allowed: the same update goes through.
    let lax = start_with(guarded(f64::INFINITY), true).await;
    let mut c = lax.client().await;
    let answers = ingest(&mut c, vec![batch("b0", facts())]).await.unwrap();
    assert!(answers[0].steps[0].applied);
    assert_eq!(answers[0].version, 1);
    assert_ne!(score_bits(&mut c).await, before);
    lax.shutdown().await;

    // A canary without a perplexity is refused when the model is installed, not at an update.
    let mut config = guarded(1.05);
    config.guard.as_mut().unwrap().canaries.push(String::new());
    let state = State::new(config).await;
    let model = load::load(fixture("llama").to_str().unwrap(), &Device::Cpu).unwrap();
    let e = state.install(model).await.expect_err("an empty canary");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.to_string().contains("canary[2]"), "{e}");
}
