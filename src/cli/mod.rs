//! Subcommands of the `locus` binary.

mod client;
mod demo;
mod eval;
mod eval_stream;
mod export;
mod inproc;
mod malloc;
mod probes;
mod progress;
mod select;
mod serve;
mod trace;

use std::time::Instant;

use std::ffi::OsString;

use anyhow::Context;
use candle_core::Device;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use locus::model::{load, Model};

/// locus: finds where new knowledge belongs in a language model and updates only those layers.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure per-layer relative gradient norms of salient spans (the paper's localization).
    Trace(trace::TraceArgs),
    /// Apply a selection rule to the JSON output of `locus trace --json`.
    Select(select::SelectArgs),
    /// Train every strategy on a drift set from the same weights and measure uptake and forgetting.
    Eval(eval::EvalArgs),
    /// Stream a drift set once through a real server at its defaults and measure uptake along the
    /// stream and after it, retention and general perplexity.
    EvalStream(Box<eval_stream::StreamArgs>),
    /// Serve the model over gRPC, learning from streamed documents while answering queries.
    Serve(Box<serve::ServeArgs>),
    /// Talk to a running `locus serve`: ingest, score, complete, perplexity, info, versions, checkpoint.
    Client(client::ClientArgs),
    /// Start a server on a free port, stream drifted facts through gRPC, and compare probe answers.
    Demo(demo::DemoArgs),
    /// Write the model (with a data directory's newest checkpoint) as a Hugging Face directory.
    Export(export::ExportArgs),
}

/// The exit status of a failed command: 2 for a usage error (the command line, a settings file, a
/// file the client was asked to send), 3 when the server answered with an error, 4 when it could
/// not be reached or the connection broke, 1 for anything else.
pub fn exit_status(e: &anyhow::Error) -> u8 {
    use locus::client::ClientError;
    for cause in e.chain() {
        if cause.is::<Usage>() {
            return 2;
        }
        if let Some(c) = cause.downcast_ref::<ClientError>() {
            return match c {
                ClientError::Address { .. } | ClientError::Tls { .. } | ClientError::Token => 2,
                ClientError::Connect { .. } => 4,
                // A status the server sent has no source; one tonic made of a broken connection does.
                ClientError::Status(s) if std::error::Error::source(s).is_some() => 4,
                ClientError::Status(_) => 3,
            };
        }
    }
    1
}

/// A usage error: a command line or settings file that does not parse, or a file the client was
/// asked to send that it cannot read or parse.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// Parses the command line (exiting on a usage error or `--help`); `locus serve` also takes the
/// settings of its file that no flag or environment variable gives.
pub fn parse() -> anyhow::Result<Cli> {
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    let command = Cli::command();
    let matches = command.clone().get_matches_from(&argv);
    if let (Some(("serve", given)), Some(serve)) =
        (matches.subcommand(), command.find_subcommand("serve"))
    {
        if let Some((file, flags)) = serve::config_flags(serve, given)? {
            // The command line alone parsed, so an error now comes from the file's values.
            argv.extend(flags.into_iter().map(OsString::from));
            return Cli::try_parse_from(argv)
                .map_err(|e| Usage(e.render().to_string()))
                .with_context(|| format!("settings from {}", file.display()));
        }
    }
    Ok(Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

impl Cli {
    /// Whether the command runs a server, whose queries must not wait behind its learner.
    pub fn serves(&self) -> bool {
        matches!(
            self.command,
            Command::Serve(_) | Command::Demo(_) | Command::EvalStream(_)
        )
    }

    /// Applies the allocator flags of a long-running command (the others keep glibc's defaults).
    pub fn tune_malloc(&self) -> anyhow::Result<()> {
        match &self.command {
            Command::Serve(a) => a.malloc.apply(),
            Command::Demo(a) => a.malloc.apply(),
            Command::EvalStream(a) => a.malloc.apply(),
            _ => Ok(()),
        }
    }
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Trace(a) => trace::run(a),
        Command::Select(a) => select::run(a),
        Command::Eval(a) => eval::run_eval(a),
        Command::EvalStream(a) => eval_stream::run(*a),
        Command::Serve(a) => serve::run(*a),
        Command::Client(a) => client::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Export(a) => export::run(a),
    }
}

/// `--device`, flattened into every subcommand that loads a model.
#[derive(Args)]
pub struct DeviceArg {
    /// Where the model runs: `cpu`, or `cuda:N` for the N-th GPU (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", env = "LOCUS_DEVICE")]
    device: String,
}

impl DeviceArg {
    /// Opens the device; subcommands call it before anything slow, so a bad `--device` fails first.
    pub fn open(&self) -> anyhow::Result<Device> {
        Ok(locus::model::device::open(&self.device)?)
    }
}

/// Loads `--model` onto `device` and says how long it took.
fn load_model(spec: &str, device: &Device) -> anyhow::Result<Model> {
    let start = Instant::now();
    let model = load::load(spec, device)?;
    eprintln!(
        "locus: loaded {} ({} layers) from {} on {} in {:.1} s",
        model.arch.name(),
        model.arch.num_layers(),
        model.source.path,
        locus::model::device::name(device),
        start.elapsed().as_secs_f64()
    );
    Ok(model)
}
