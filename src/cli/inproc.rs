//! A real server on a free local port inside this process: what `demo` and `eval-stream` drive
//! through the gRPC API, so they see exactly what a client of `locus serve` sees.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use locus::model::Model;
use locus::server::{self, Config, State};

use super::serve::LearnArgs;

/// Starts the server with `model` and the learning settings of `learn`, runs `body` with its
/// address, then shuts the server down.
pub fn with_server<T, F, Fut>(model: Model, learn: &LearnArgs, body: F) -> anyhow::Result<T>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let (config, replay) = learn.config()?;
    let config = Config {
        learn: config,
        batch_size: learn.batch_size,
        replay,
        shutdown_grace: Duration::from_secs(5),
        ..Config::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = State::new(config).await;
        state.install(model).await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(server::run(listener, Arc::clone(&state), async {
            let _ = stopped.await;
        }));
        eprintln!("locus: server on {addr}");
        let result = body(addr.to_string()).await;
        let _ = stop.send(());
        server.await??;
        result
    })
}
