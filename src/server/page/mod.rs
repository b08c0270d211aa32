//! The status page at `/` of the metrics listener: the model, its version and learning settings,
//! the queue and the store, the recent updates and a heat map of the layer groups they touched.
//! Server-rendered HTML with inline SVG that reloads itself; the numbers come from the live state
//! and the learner's step reports (the same as Admin.Info's), never from the metrics text.

mod heatmap;
mod html;

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::{convert, Loaded, Role, State};
use crate::model::GroupId;

use crate::learn::history::Step;

/// What the page shows, read from the live state when it is asked for.
pub(crate) struct Overview {
    /// Where the model was loaded from.
    pub model: String,
    /// Its architecture's name.
    pub architecture: String,
    /// The version served.
    pub version: u64,
    /// The learning strategy's name.
    pub strategy: String,
    /// How the strategy localizes (`static` or `per-batch`).
    pub localization: &'static str,
    /// `writer` or `reader`.
    pub role: &'static str,
    /// Batches waiting for the learner.
    pub queue: usize,
    /// Whether learning is paused.
    pub paused: bool,
    /// Why batches cannot be learned now, if so.
    pub blocked: Option<String>,
    /// With a store: the newest version in it, and how far the served version is behind it.
    pub store: Option<(u64, u64)>,
    /// With the forgetting guard: the largest canary perplexity ratio it lets through.
    pub guard: Option<f64>,
    /// Every layer group of the model, in layer order.
    pub groups: Vec<GroupId>,
    /// The groups the strategy updates now.
    pub selection: Vec<GroupId>,
    /// The recent learning steps, oldest first.
    pub steps: Vec<Step>,
}

/// The page as HTML: the overview, or a notice while the model loads (either reloads itself).
pub(super) fn render(state: &State) -> String {
    match state.loaded() {
        Ok(loaded) => html::page(&overview(state, loaded), SystemTime::now()),
        Err(_) => html::loading(),
    }
}

fn overview(state: &State, loaded: &Loaded) -> Overview {
    let config = &state.config;
    let progress = loaded.learner.progress();
    let version = loaded.snapshots.current().version();
    let published = loaded.published.load(Ordering::SeqCst);
    Overview {
        model: loaded.model.source.path.clone(),
        architecture: loaded.model.arch.name().to_string(),
        version,
        strategy: config.learn.strategy.name.clone(),
        localization: convert::localization(&config.learn.localization),
        role: config.role.name(),
        queue: loaded.learner.queued(),
        paused: loaded.paused.load(Ordering::SeqCst),
        blocked: progress.blocked,
        store: config
            .store
            .as_ref()
            .map(|_| (published, published.saturating_sub(version))),
        guard: config
            .guard
            .as_ref()
            .filter(|_| config.role == Role::Writer)
            .map(|g| g.max_ratio),
        groups: loaded.model.groups(),
        selection: progress.selection,
        steps: loaded.history.steps(),
    }
}
