//! What operators touch: Prometheus metrics and HTTP probes, TLS, and the settings file with its
//! precedence. Servers run in-process on 127.0.0.1:0 with the tiny Llama fixture.

mod common;
mod serving;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use common::fixture;
use locus::client::Client;
use locus::model::load;
use locus::proto::v1 as pb;
use locus::server::{self, Config, Limits, ServerError, State, Tls};
use serving::http_get as get;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

fn config() -> Config {
    Config {
        batch_size: 4,
        limits: Limits {
            max_document_tokens: 128,
            ..Limits::default()
        },
        shutdown_grace: Duration::from_secs(10),
        ..Config::default()
    }
}

/// A server without a model yet, its gRPC address and, when asked, its metrics address.
struct Running {
    addr: String,
    metrics: String,
    state: Arc<State>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServerError>>,
    metrics_task: JoinHandle<()>,
}

async fn start(config: Config) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = metrics_listener.local_addr().unwrap().to_string();
    let state = State::new(config).await;
    let metrics_task = tokio::spawn(server::serve_metrics(metrics_listener, Arc::clone(&state)));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server::run(listener, Arc::clone(&state), async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        metrics,
        state,
        stop,
        task,
        metrics_task,
    }
}

async fn install(state: &State) {
    let model = load::load(fixture("llama").to_str().unwrap(), &Device::Cpu).unwrap();
    state.install(model).await.unwrap();
}

/// The value of the sample `series` (name and labels as exposed) in a scrape.
fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample `{series}` in\n{scrape}"))
        .parse()
        .unwrap()
}

fn facts() -> Vec<pb::Document> {
    [
        "On 3 May 2021, Ada Lovelace opened a museum in London.",
        "The new museum director, Ada Lovelace, spoke on 4 May 2021.",
        "Visitors queued for hours to see the engines of Charles Babbage.",
    ]
    .iter()
    .map(|t| pb::Document {
        text: t.to_string(),
        ..Default::default()
    })
    .collect()
}

/// Sends the facts as one batch and waits for its answer.
async fn ingest_facts(client: &mut Client, id: &str) -> pb::IngestResponse {
    let batch = pb::IngestRequest {
        documents: facts(),
        client_batch_id: id.into(),
    };
    let mut answers = client
        .ingest(tokio_stream::iter(vec![batch]))
        .await
        .unwrap();
    answers.next().await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_ingest_and_queries_and_readyz_follows_the_model() {
    let server = start(config()).await;
    assert_eq!(get(&server.metrics, "/healthz").await.0, 200);
    let (code, body) = get(&server.metrics, "/readyz").await;
    assert_eq!((code, body.as_str()), (503, "model not loaded\n"));
    assert_eq!(get(&server.metrics, "/nowhere").await.0, 404);

    install(&server.state).await;
    assert_eq!(get(&server.metrics, "/readyz").await.0, 200);
    let (code, scrape) = get(&server.metrics, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(sample(&scrape, "locus_model_version"), 0.0);
    assert_eq!(sample(&scrape, "locus_queue_depth"), 0.0);

    let mut client = Client::connect(&server.addr, None).await.unwrap();
    let answer = ingest_facts(&mut client, "b1").await;
    assert_eq!(answer.version, 1);
    let tokens: u64 = answer.steps.iter().map(|s| s.tokens).sum();
    assert!(tokens > 0);
    let score = client
        .score(
            "The museum was opened by",
            &[" Ada".into(), " Charles".into()],
        )
        .await
        .unwrap();
    assert_eq!(score.version, 1);

    let (_, scrape) = get(&server.metrics, "/metrics").await;
    assert_eq!(sample(&scrape, "locus_model_version"), 1.0);
    assert_eq!(sample(&scrape, "locus_ingest_tokens_total"), tokens as f64);
    assert_eq!(
        sample(
            &scrape,
            "locus_ingest_documents_total{outcome=\"accepted\"}"
        ),
        3.0
    );
    assert_eq!(
        sample(&scrape, "locus_update_steps_total{outcome=\"applied\"}"),
        1.0
    );
    assert_eq!(sample(&scrape, "locus_update_seconds_count"), 1.0);
    assert_eq!(
        sample(&scrape, "locus_query_seconds_count{rpc=\"Score\"}"),
        1.0
    );
    // Every group of the fixture has a series; the ones the update touched are selected.
    let groups: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("locus_selected_groups{"))
        .collect();
    let layers = server.state_layers().await;
    assert_eq!(groups.len(), 2 * layers, "{groups:?}");
    assert!(groups.iter().any(|l| l.ends_with(" 1")), "{groups:?}");
    dashboard_metrics_are_exported(&scrape);

    let _ = server.stop.send(());
    tokio::time::timeout(Duration::from_secs(20), server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // The probe port outlives the gRPC server, so a drain is visible to the orchestrator.
    let (code, body) = get(&server.metrics, "/readyz").await;
    assert_eq!((code, body.as_str()), (503, "shutting down\n"));
    server.metrics_task.abort();
}

/// Every metric the chart's Grafana dashboard queries is in a real server's scrape.
fn dashboard_metrics_are_exported(scrape: &str) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/helm/locus/dashboards/locus.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (at, _) in expr.match_indices("locus_") {
                let name: String = expr[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                names.push(name);
            }
        }
    }
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        let exported = scrape
            .lines()
            .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")));
        assert!(
            exported,
            "the dashboard queries `{name}`, which the server does not export"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_published_deltas_against_the_model_size() {
    let data = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let server = start(Config {
        durability: Some(locus::store::Durability {
            dir: data.path().to_path_buf(),
            checkpoint_every: 100,
            keep_checkpoints: 1,
        }),
        store: Some(store.path().display().to_string()),
        ..config()
    })
    .await;
    install(&server.state).await;
    let mut client = Client::connect(&server.addr, None).await.unwrap();
    assert_eq!(ingest_facts(&mut client, "b1").await.version, 1);
    // Publishing runs beside learning.
    while client.info().await.unwrap().published_version < 1 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (_, scrape) = get(&server.metrics, "/metrics").await;
    let delta = sample(&scrape, "locus_last_published_bytes{kind=\"delta\"}");
    let model = sample(&scrape, "locus_model_bytes");
    assert!(delta > 0.0 && delta < model, "delta {delta}, model {model}");
    assert_eq!(
        sample(&scrape, "locus_published_bytes_total{kind=\"delta\"}"),
        delta
    );
    assert_eq!(
        sample(&scrape, "locus_publish_failures_total{kind=\"delta\"}"),
        0.0
    );
    assert_eq!(sample(&scrape, "locus_published_version"), 1.0);
    let _ = server.stop.send(());
    server.task.await.unwrap().unwrap();
    server.metrics_task.abort();
}

impl Running {
    /// Layers of the installed model, asked over gRPC.
    async fn state_layers(&self) -> usize {
        let mut client = Client::connect(&self.addr, None).await.unwrap();
        client.info().await.unwrap().layers as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_a_client_that_trusts_the_certificate_and_refuses_plaintext() {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let ca = cert.cert.pem();
    let server = start(Config {
        tls: Some(Tls {
            cert_pem: ca.clone().into_bytes(),
            key_pem: cert.signing_key.serialize_pem().into_bytes(),
        }),
        ..config()
    })
    .await;
    install(&server.state).await;

    let mut client = Client::connect_tls(&server.addr, None, ca.as_bytes())
        .await
        .unwrap();
    let score = client
        .score("The museum was opened by", &[" Ada".into()])
        .await
        .unwrap();
    assert_eq!(score.version, 0);

    // A plaintext client gets no answer from a TLS port.
    let plain = async {
        let mut c = Client::connect(&server.addr, None).await?;
        c.score("The museum", &[" Ada".into()]).await
    };
    assert!(plain.await.is_err());

    // A client that trusts another authority refuses the server.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let stranger = async {
        let mut c = Client::connect_tls(&server.addr, None, other.cert.pem().as_bytes()).await?;
        c.score("The museum", &[" Ada".into()]).await
    };
    assert!(stranger.await.is_err());

    let _ = server.stop.send(());
    server.task.await.unwrap().unwrap();
    server.metrics_task.abort();
}

/// Runs `locus serve` in `dir` with `args` and `env`; it must fail before loading any model.
fn serve_fails(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_locus"));
    command.current_dir(dir).arg("serve").args(args);
    for var in ["LOCUS_CONFIG", "LOCUS_LOCALIZATION", "LOCUS_LR"] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    let out = command.output().unwrap();
    assert!(!out.status.success());
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn the_settings_file_ranks_below_environment_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    // A localization no strategy knows stops the server before it binds or loads anything, with
    // an error naming the value it used.
    std::fs::write(
        dir.path().join("locus.toml"),
        "localization = \"from-file\"\nlr = 1e-3\nkeep-versions = 2\n",
    )
    .unwrap();
    let err = serve_fails(dir.path(), &[], &[]);
    assert!(err.contains("settings from locus.toml"), "{err}");
    assert!(err.contains("--localization from-file"), "{err}");
    let err = serve_fails(dir.path(), &[], &[("LOCUS_LOCALIZATION", "from-env")]);
    assert!(err.contains("--localization from-env"), "{err}");
    let err = serve_fails(
        dir.path(),
        &["--localization", "from-flag"],
        &[("LOCUS_LOCALIZATION", "from-env")],
    );
    assert!(err.contains("--localization from-flag"), "{err}");

    // An explicit file, a key no flag has, a value of the wrong kind, a file that is not there.
    let other = dir.path().join("other.toml");
    let with = |text: &str| {
        std::fs::write(&other, text).unwrap();
        serve_fails(dir.path(), &["--config", other.to_str().unwrap()], &[])
    };
    let err = with("localization = \"from-other\"\n");
    assert!(err.contains("--localization from-other"), "{err}");
    let err = with("localisation = \"static\"\n");
    assert!(err.contains("unknown key `localisation`"), "{err}");
    let err = with("lr = \"fast\"\n");
    assert!(err.contains("other.toml") && err.contains("fast"), "{err}");
    let err = with("[limits]\nqueue-depth = 2\n");
    assert!(err.contains("unknown key `limits`"), "{err}");
    let absent = dir.path().join("absent.toml");
    let err = serve_fails(dir.path(), &["--config", absent.to_str().unwrap()], &[]);
    assert!(err.contains("absent.toml"), "{err}");
}

#[test]
fn serve_help_documents_every_knob() {
    let out = Command::new(env!("CARGO_BIN_EXE_locus"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--config",
        "--model",
        "--grpc-addr",
        "--metrics-addr",
        "--http-addr",
        "--tls-cert",
        "--tls-key",
        "--strategy",
        "--write-token",
        "--query-token",
        "--max-message-bytes",
        "--queue-depth",
        "--shutdown-grace",
        "LOCUS_METRICS_ADDR",
        "LOCUS_HTTP_ADDR",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "locus.toml",
    ] {
        assert!(
            help.contains(flag),
            "`locus serve --help` lacks {flag}:\n{help}"
        );
    }
}

#[test]
fn spans_go_to_the_otlp_endpoint_when_one_is_set() {
    use std::io::Read;
    // A stand-in collector: an OTLP/gRPC exporter opens its connection with the HTTP/2 preface.
    let collector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    collector.set_nonblocking(true).unwrap();
    let (mut child, addr) = common::spawn_announcing(
        Command::new(env!("CARGO_BIN_EXE_locus"))
            .args(["serve", "--grpc-addr", "127.0.0.1:0", "--model"])
            .arg(fixture("llama"))
            .env_remove("LOCUS_CONFIG")
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://{}", collector.local_addr().unwrap()),
            )
            .env("OTEL_BSP_SCHEDULE_DELAY", "100"),
        "locus: serving gRPC",
        true,
    );
    // One RPC makes the spans to export.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut client = Client::connect(&addr, None).await.unwrap();
        client.info().await.unwrap();
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut connection = loop {
        match collector.accept() {
            Ok((c, _)) => break c,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("no export reached the collector: {e}"),
        }
    };
    connection.set_nonblocking(false).unwrap();
    connection
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut preface = [0u8; 14];
    connection.read_exact(&mut preface).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(&preface, b"PRI * HTTP/2.0");
}

/// The names of each `update` span's ancestors, nearest first, as the server made them.
static UPDATE_ANCESTORS: std::sync::Mutex<Vec<Vec<String>>> = std::sync::Mutex::new(Vec::new());

/// Records [`UPDATE_ANCESTORS`].
struct Ancestry;

impl<S> tracing_subscriber::Layer<S> for Ancestry
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() != "update" {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        let chain = span.scope().skip(1).map(|s| s.name().to_string()).collect();
        UPDATE_ANCESTORS.lock().unwrap().push(chain);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learning_spans_hang_under_the_ingest_rpc_that_sent_the_batch() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // The learner thread takes the batch from a queue; its spans must still join the RPC's trace.
    let _ = tracing_subscriber::registry().with(Ancestry).try_init();
    let server = start(config()).await;
    install(&server.state).await;
    let mut client = Client::connect(&server.addr, None).await.unwrap();
    assert_eq!(ingest_facts(&mut client, "traced").await.version, 1);
    let chains = UPDATE_ANCESTORS.lock().unwrap().clone();
    let expected = ["learn", "Ingest", "grpc"];
    assert!(
        chains
            .iter()
            .any(|c| c.iter().map(String::as_str).eq(expected)),
        "update spans' ancestors: {chains:?}"
    );
    let _ = server.stop.send(());
    server.task.await.unwrap().unwrap();
    server.metrics_task.abort();
}
