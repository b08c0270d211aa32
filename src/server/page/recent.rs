//! The recent learning steps, as the learner reported them, in a ring of fixed size: the status
//! page shows what learning did lately without anything growing with the server's uptime.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use crate::learn::UpdateReport;
use crate::live::Check;
use crate::model::GroupId;

/// Steps kept; older ones fall out.
pub(crate) const KEPT: usize = 50;

/// One learning step, as the page shows it.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    /// When the learner finished it.
    pub at: SystemTime,
    /// The version served after it.
    pub version: u64,
    /// Why it changed no weights, if so.
    pub skipped: Option<String>,
    /// Documents learned from (replay excluded).
    pub documents: usize,
    /// Tokens in the step's batch.
    pub tokens: usize,
    /// Mean NLL of the batch before the update.
    pub loss_before: f64,
    /// Mean NLL of the batch after it, when measured.
    pub loss_after: Option<f64>,
    /// The groups updated, with the relative norm that selected each when norms were measured.
    pub groups: Vec<(GroupId, Option<f64>)>,
    /// The forgetting guard's canary perplexity before and after the update, when it checked.
    pub canary: Option<Check>,
    /// Wall-clock seconds of the step.
    pub seconds: f64,
}

impl Step {
    /// Whether the step's update is served (not skipped, not undone by the guard).
    pub fn applied(&self) -> bool {
        self.skipped.is_none()
    }
}

/// The last [`KEPT`] steps, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Recent {
    steps: Mutex<VecDeque<Step>>,
}

impl Recent {
    /// Records a step the learner finished, with the guard's canary check of it.
    pub fn record(&self, report: &UpdateReport, canary: Option<Check>) {
        let step = Step {
            at: SystemTime::now(),
            version: report.version,
            skipped: match (&report.skipped, report.applied) {
                (Some(why), _) => Some(why.clone()),
                (None, true) => None,
                (None, false) => Some("no update".to_string()),
            },
            documents: report.documents,
            tokens: report.tokens,
            loss_before: report.loss_before,
            loss_after: report.loss_after,
            groups: report.groups.iter().map(|g| (g.id(), g.relative)).collect(),
            canary,
            seconds: report.seconds,
        };
        let mut steps = self.steps.lock().unwrap_or_else(PoisonError::into_inner);
        if steps.len() == KEPT {
            steps.pop_front();
        }
        steps.push_back(step);
    }

    /// The steps kept, oldest first.
    pub fn steps(&self) -> Vec<Step> {
        let steps = self.steps.lock().unwrap_or_else(PoisonError::into_inner);
        steps.iter().cloned().collect()
    }
}
