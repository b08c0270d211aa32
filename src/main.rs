//! The `locus` command line.

mod cli;

fn main() -> std::process::ExitCode {
    let args = match cli::parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("locus: error: {e:#}");
            return std::process::ExitCode::from(cli::exit_status(&e));
        }
    };
    // Before any thread allocates, so that every arena is made under the settings.
    if let Err(e) = args.tune_malloc() {
        eprintln!("locus: error: {e:#}");
        return std::process::ExitCode::from(cli::exit_status(&e));
    }
    // Before any thread starts: the pools read these settings when they start.
    locus::compute::configure_threads(args.serves());
    // Dropped when main returns, which flushes the spans still waiting for export.
    let _telemetry = match locus::telemetry::init() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("locus: error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("locus: error: {e:#}");
            std::process::ExitCode::from(cli::exit_status(&e))
        }
    }
}
