//! Query latency of the live server: `Query.Score` p50/p99 over a fixed number of requests on the
//! default model, first idle, then while an ingest stream keeps the learner busy, and the rate of
//! greedy generation (idle). The goal is a p99 under ingest at most twice the idle p99.
//! `cargo bench --bench load` prints one JSON object.
//!
//! The server runs in-process on 127.0.0.1:0 and is spoken to over gRPC with the public client,
//! one request at a time, so each latency is a full round trip.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use locus::client::Client;
use locus::model::load;
use locus::proto::v1 as pb;
use locus::server::{self, Config, State};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

mod support;
use support::{batches, machine, probes, summary};

/// Score requests measured in each phase at least (after `WARMUP` unmeasured ones); under
/// ingest, measuring goes on until `STEPS` learning steps have finished during it.
const REQUESTS: usize = 40;
/// Score requests measured idle: about as many as under ingest, so that both p99s rank alike
/// (at 200 the idle p99 was the second-slowest request, and moved 40% between runs).
const IDLE_REQUESTS: usize = 1200;
const WARMUP: usize = 10;
const STEPS: u64 = 3;
/// Documents per ingest batch.
const BATCH: usize = 8;

/// The prompt of the generation measurement (scripts/reference/bench_torch.py uses the same).
const GENERATE_PROMPT: &str = "The history of the city began";
/// Tokens each greedy completion asks for.
const GENERATE_TOKENS: u32 = 64;

/// Tokens per second of three greedy completions, one at a time, after an unmeasured one.
async fn generation(client: &mut Client) -> anyhow::Result<Vec<f64>> {
    let request = pb::CompleteRequest {
        prompt: GENERATE_PROMPT.into(),
        max_tokens: GENERATE_TOKENS,
        temperature: 0.0,
        ..Default::default()
    };
    let mut rates = Vec::new();
    for i in 0..4 {
        let start = Instant::now();
        let mut stream = client.complete(request.clone()).await?;
        let mut tokens = 0;
        while let Some(chunk) = stream.message().await? {
            tokens = chunk.tokens;
        }
        if i > 0 {
            rates.push(f64::from(tokens) / start.elapsed().as_secs_f64());
        }
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates)
}

/// Latencies in milliseconds of `n` sequential Score calls after `warmup` unmeasured ones, on
/// the next probes from `probes`.
async fn measure<'p>(
    client: &mut Client,
    probes: &mut impl Iterator<Item = &'p (String, Vec<String>)>,
    warmup: usize,
    n: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for (i, (prompt, candidates)) in probes.take(warmup + n).enumerate() {
        let start = Instant::now();
        client.score(prompt, candidates).await?;
        if i >= warmup {
            out.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    locus::compute::configure_threads(true);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let model = load::load("default", &Device::Cpu)?;
        let model_name = model.arch.name().to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        // `LOCUS_LEARNER_NICE` as for `locus serve`, to compare priorities.
        let mut config = Config::default();
        if let Ok(nice) = std::env::var("LOCUS_LEARNER_NICE") {
            config.learner_nice = nice.parse()?;
        }
        let learner_nice = config.learner_nice;
        let state = State::new(config).await;
        state.install(model).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(server::run(listener, Arc::clone(&state), async {
            let _ = stopped.await;
        }));

        let probes = probes();
        let mut client = Client::connect(&addr, None).await?;
        let idle = measure(
            &mut client,
            &mut probes.iter().cycle(),
            WARMUP,
            IDLE_REQUESTS,
        )
        .await?;
        let generated = generation(&mut client).await?;

        // Keep the learner busy: batches go out as fast as flow control admits them.
        let (tx, rx) = mpsc::channel(1);
        let mut ingest_client = client.clone();
        let answers = ingest_client.ingest(ReceiverStream::new(rx)).await?;
        let feeder = tokio::spawn(async move {
            for batch in batches("load", BATCH).into_iter().cycle() {
                if tx.send(batch).await.is_err() {
                    break;
                }
            }
        });
        // Measure only once the first update is under way, not while the queue fills.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let steps_before = client.info().await?.steps;
        let busy_start = Instant::now();
        // One walk through the probes, as idle: probes differ in length by up to 2.5 times, so both
        // phases must measure the same mix.
        let mut next = probes.iter().cycle();
        let mut busy = measure(&mut client, &mut next, WARMUP, REQUESTS).await?;
        while client.info().await?.steps < steps_before + STEPS {
            busy.extend(measure(&mut client, &mut next, 0, REQUESTS / 4).await?);
        }
        let busy_seconds = busy_start.elapsed().as_secs_f64();
        let info = client.info().await?;
        // Ending the feeder and the answers ends the stream; queued batches are still learned.
        feeder.abort();
        drop(answers);

        let _ = stop.send(());
        // The learner finishes the queued batches before `run` returns; that is not measured.
        server.await??;

        let idle = summary(idle);
        let busy = summary(busy);
        let ratio = busy["p99_ms"].as_f64().unwrap_or(f64::NAN)
            / idle["p99_ms"].as_f64().unwrap_or(f64::NAN);
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "machine": machine(),
                "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
                "model": model_name,
                "rpc": "Score",
                "learner_nice": learner_nice,
                "candidates": 2,
                "idle": idle,
                "during_ingest": busy,
                "update_steps_during_measurement": info.steps - steps_before,
                "measurement_seconds": busy_seconds,
                "final_version": info.version,
                "p99_ratio": ratio,
                "generation": {
                    "prompt": GENERATE_PROMPT,
                    "max_tokens": GENERATE_TOKENS,
                    "tokens_per_s": generated,
                    "median_tokens_per_s": generated[generated.len() / 2],
                },
                "goal_p99_ratio_at_most_2": ratio <= 2.0,
            }))?
        );
        anyhow::Ok(())
    })
}
