//! The recent learning steps, as the learner reported them, in a ring of fixed size: what the
//! status page shows of learning lately, without anything growing with the server's uptime. The
//! ring goes into checkpoints and each step into its published delta, so a restarted writer and
//! a reader following it show the same steps.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize};

use super::UpdateReport;
use crate::model::GroupId;

/// Steps kept; older ones fall out.
pub const KEPT: usize = 50;

/// The canary perplexity before and after one update.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// Before the update.
    #[serde(deserialize_with = "null_is_nan")]
    pub before: f64,
    /// After it.
    #[serde(deserialize_with = "null_is_nan")]
    pub after: f64,
}

impl Check {
    /// `after / before`.
    pub fn ratio(&self) -> f64 {
        self.after / self.before
    }

    /// Whether the update raised the canary perplexity past `max_ratio`, or made it not a
    /// number at all (weights blown up to infinities).
    pub fn fails(&self, max_ratio: f64) -> bool {
        let ratio = self.ratio();
        !ratio.is_finite() || ratio > max_ratio
    }
}

/// One learning step, as the status page shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
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
    #[serde(deserialize_with = "null_is_nan")]
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
    /// The step `report` describes, finished now, with the guard's canary check of it.
    pub fn of(report: &UpdateReport, canary: Option<Check>) -> Step {
        Step {
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
        }
    }

    /// Whether the step's update is served (not skipped, not undone by the guard).
    pub fn applied(&self) -> bool {
        self.skipped.is_none()
    }
}

/// The last [`KEPT`] steps, oldest first.
#[derive(Debug, Default)]
pub struct History {
    steps: Mutex<VecDeque<Step>>,
}

impl History {
    /// Records a finished step.
    pub fn record(&self, step: Step) {
        let mut steps = self.steps.lock().unwrap_or_else(PoisonError::into_inner);
        if steps.len() == KEPT {
            steps.pop_front();
        }
        steps.push_back(step);
    }

    /// Replaces the steps with `steps` (oldest first), as a checkpoint kept them.
    pub fn restore(&self, steps: &[Step]) {
        let mut kept = self.steps.lock().unwrap_or_else(PoisonError::into_inner);
        *kept = steps[steps.len().saturating_sub(KEPT)..]
            .iter()
            .cloned()
            .collect();
    }

    /// The steps kept, oldest first.
    pub fn steps(&self) -> Vec<Step> {
        let steps = self.steps.lock().unwrap_or_else(PoisonError::into_inner);
        steps.iter().cloned().collect()
    }
}

/// JSON has no NaN or infinity: they are written as `null`, and read back as NaN.
fn null_is_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Reads what a file says of its steps, leaving out any it cannot read: a step must never make
/// its checkpoint unreadable.
pub fn lenient_steps<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Step>, D::Error> {
    let values = Option::<Vec<serde_json::Value>>::deserialize(d)?.unwrap_or_default();
    Ok(values
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect())
}

/// [`lenient_steps`] for a single step.
pub fn lenient_step<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Step>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(value.and_then(|v| serde_json::from_value(v).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Module;

    fn step(version: u64, loss_before: f64) -> Step {
        Step {
            at: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123),
            version,
            skipped: None,
            documents: 2,
            tokens: 64,
            loss_before,
            loss_after: None,
            groups: vec![(
                GroupId {
                    layer: 3,
                    module: Module::Mlp,
                },
                Some(1.5),
            )],
            canary: Some(Check {
                before: 10.0,
                after: 10.5,
            }),
            seconds: 0.25,
        }
    }

    #[derive(Serialize, Deserialize)]
    struct File {
        #[serde(default, deserialize_with = "lenient_steps")]
        recent: Vec<Step>,
        #[serde(default, deserialize_with = "lenient_step")]
        step: Option<Step>,
    }

    #[test]
    fn steps_round_trip_and_an_unreadable_one_is_left_out() {
        let file = File {
            recent: vec![step(1, 2.5), step(2, f64::NAN), step(3, 2.0)],
            step: Some(step(4, f64::INFINITY)),
        };
        let json = serde_json::to_string(&file).unwrap();
        let read: File = serde_json::from_str(&json).unwrap();
        let versions: Vec<u64> = read.recent.iter().map(|s| s.version).collect();
        assert_eq!(versions, [1, 2, 3]);
        assert!(read.recent[1].loss_before.is_nan());
        assert!(read.step.unwrap().loss_before.is_nan());
        assert_eq!(read.recent[0].at, file.recent[0].at);
        assert_eq!(read.recent[0].groups, file.recent[0].groups);
        let damaged = json.replacen("\"version\":1", "\"version\":\"one\"", 1);
        let read: File = serde_json::from_str(&damaged).unwrap();
        assert_eq!(read.recent.len(), 2);
        let old: File = serde_json::from_str("{}").unwrap();
        assert!(old.recent.is_empty() && old.step.is_none());
    }

    #[test]
    fn the_ring_keeps_the_newest_steps() {
        let history = History::default();
        for v in 0..(KEPT as u64 + 5) {
            history.record(step(v, 1.0));
        }
        let steps = history.steps();
        assert_eq!(steps.len(), KEPT);
        assert_eq!(steps[0].version, 5);
        let many: Vec<Step> = (0..(KEPT as u64 * 2)).map(|v| step(v, 1.0)).collect();
        history.restore(&many);
        assert_eq!(history.steps()[0].version, KEPT as u64);
    }
}
