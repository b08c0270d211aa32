//! The progress bar of a streamed ingestion, shared by `locus client ingest` and `locus demo`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use locus::proto::v1 as pb;
use tokio_stream::{Stream, StreamExt};

/// Documents acknowledged and sent out of a total, with the model version and the last loss.
// On stderr, which indicatif leaves untouched when it is not a terminal: logs and tests see only
// the lines printed through `println`.
pub struct IngestProgress {
    bar: ProgressBar,
    sent: Arc<AtomicU64>,
    loss: Option<f64>,
}

impl IngestProgress {
    /// A bar over `total` documents.
    pub fn new(total: u64) -> Self {
        let sent = Arc::new(AtomicU64::new(0));
        let shown = Arc::clone(&sent);
        let style = ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} documents learned, {sent} sent  {msg}",
        )
        .expect("the template is a valid indicatif template")
        .with_key("sent", move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{}", shown.load(Ordering::Relaxed));
        })
        .progress_chars("=> ");
        let bar = ProgressBar::new(total).with_style(style);
        // A batch can take the learner seconds: ticks keep the elapsed time and sent count moving.
        bar.enable_steady_tick(Duration::from_millis(250));
        IngestProgress {
            bar,
            sent,
            loss: None,
        }
    }

    /// The request stream of `batches`, counting each batch's documents as the transport takes it.
    pub fn counting(
        &self,
        batches: Vec<pb::IngestRequest>,
    ) -> impl Stream<Item = pb::IngestRequest> + Send + 'static {
        let sent = Arc::clone(&self.sent);
        tokio_stream::iter(batches).map(move |b| {
            sent.fetch_add(b.documents.len() as u64, Ordering::Relaxed);
            b
        })
    }

    /// Counts an answered batch's documents and shows its version and last loss.
    pub fn answered(&mut self, r: &pb::IngestResponse) {
        self.bar.inc((r.accepted.len() + r.rejected.len()) as u64);
        // A batch whose documents were all rejected took no step: the previous loss still holds.
        self.loss = r
            .steps
            .last()
            .map(|s| s.loss_after.unwrap_or(s.loss_before))
            .or(self.loss);
        let loss = self
            .loss
            .map(|l| format!(", loss {l:.3}"))
            .unwrap_or_default();
        self.bar.set_message(format!("version {}{loss}", r.version));
    }

    /// Prints a line on stderr above the bar.
    pub fn println(&self, line: &str) {
        // `ProgressBar::println` prints nothing while the bar is hidden; suspending prints either way.
        self.bar.suspend(|| eprintln!("{line}"));
    }
}

impl Drop for IngestProgress {
    /// Clears the bar, so what is printed next (a summary, or an error) is not drawn over.
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
