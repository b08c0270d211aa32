//! Panics anywhere in the process and ERROR events the server logs, for the fuzz tests: a server
//! that answers every hostile request but panicked or logged its own fault on the way has failed.

use std::fmt::Write as _;
use std::sync::Mutex;

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// Panics anywhere in the process: server tasks, the blocking pool and the learner thread.
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Events the server logged at ERROR: its own faults, even where no client is told.
static ERRORS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records ERROR events in [`ERRORS`].
struct RecordErrors;

impl<S: tracing::Subscriber> Layer<S> for RecordErrors {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = Fields(event.metadata().target().to_string());
        event.record(&mut fields);
        ERRORS.lock().unwrap().push(fields.0);
    }
}

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

/// Records every panic and ERROR event from now on (once a process).
pub fn watch_panics_and_errors() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.lock().unwrap().push(info.to_string());
        default(info);
    }));
    let subscriber =
        tracing_subscriber::registry().with(RecordErrors.with_filter(LevelFilter::ERROR));
    tracing::subscriber::set_global_default(subscriber).unwrap();
}

/// Fails `case` if anything panicked or logged an error so far.
pub fn assert_quiet(case: &str) {
    let panics = PANICS.lock().unwrap();
    assert!(panics.is_empty(), "{case}: panicked: {panics:?}");
    let errors = ERRORS.lock().unwrap();
    assert!(errors.is_empty(), "{case}: the server logged {errors:?}");
}
