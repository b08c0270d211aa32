//! Conversions between the API's messages and the library's types.

use std::time::SystemTime;

use crate::learn::engine::UpdatedGroup as DomainGroup;
use crate::learn::Localization;
use crate::learn::UpdateReport as DomainReport;
use crate::model::{GroupId, Module as DomainModule};
use crate::proto::v1 as pb;
use crate::select::SelectionReport;
use crate::snapshot::{Origin, Snapshot};
use crate::spans::SpanRule as DomainRule;
use crate::trace::Trace;

/// The API's module enum.
pub fn module(m: DomainModule) -> pb::Module {
    match m {
        DomainModule::Attn => pb::Module::Attn,
        DomainModule::Mlp => pb::Module::Mlp,
    }
}

/// A layer group as the API reports it, with no norm.
pub fn group(g: GroupId) -> pb::UpdatedGroup {
    pb::UpdatedGroup {
        layer: g.layer as u32,
        module: module(g.module) as i32,
        relative: None,
        lr_scale: 1.0,
    }
}

fn updated_group(g: &DomainGroup) -> pb::UpdatedGroup {
    pb::UpdatedGroup {
        layer: g.layer as u32,
        module: module(g.module) as i32,
        relative: g.relative,
        lr_scale: g.lr_scale,
    }
}

fn span_rule(r: DomainRule) -> pb::SpanRule {
    match r {
        DomainRule::Given => pb::SpanRule::Given,
        DomainRule::Entity => pb::SpanRule::Entity,
        DomainRule::Surprisal => pb::SpanRule::Surprisal,
        DomainRule::Novel => pb::SpanRule::Novel,
        DomainRule::Trending => pb::SpanRule::Trending,
    }
}

/// One learning step's report.
pub fn report(r: &DomainReport) -> pb::UpdateReport {
    pb::UpdateReport {
        batch: r.batch,
        version: r.version,
        applied: r.applied,
        skipped: r.skipped.clone().unwrap_or_default(),
        documents: r.documents as u32,
        replay: r.replay as u32,
        tokens: r.tokens as u64,
        span_rules: r.span_rules.iter().map(|&s| span_rule(s) as i32).collect(),
        loss_before: r.loss_before,
        span_loss: r.span_loss,
        loss_after: r.loss_after,
        grad_norm: r.grad_norm,
        groups: r.groups.iter().map(updated_group).collect(),
        traced: r.traced,
        seconds: r.seconds,
        rehearsed: r.rehearsed as u32,
        span_fallbacks: r.span_fallbacks as u32,
        units_selected: r.units.map(|(selected, _)| selected as u32),
        units_total: r.units.map(|(_, total)| total as u32),
        spans: r
            .spans
            .iter()
            .map(|texts| pb::DocumentSpans {
                texts: texts.clone(),
            })
            .collect(),
    }
}

/// A trace with the TGL-FP selection marked.
pub fn trace(
    version: u64,
    t: &Trace,
    selection: &SelectionReport,
    seconds: f64,
) -> pb::TraceResponse {
    pb::TraceResponse {
        version,
        groups: t
            .groups
            .iter()
            .map(|g| pb::GroupNorm {
                layer: g.layer as u32,
                module: module(g.module) as i32,
                span_norm: g.span_norm,
                full_norm: g.full_norm,
                relative: g.relative,
                selected: selection.tgl_fp.contains(&g.id()),
            })
            .collect(),
        other: t
            .other
            .iter()
            .map(|o| pb::OtherNorm {
                name: o.name.to_string(),
                span_norm: o.span_norm,
                full_norm: o.full_norm,
                relative: o.relative,
            })
            .collect(),
        per_text: t
            .per_text
            .iter()
            .map(|s| pb::TextLoss {
                tokens: s.tokens as u64,
                span_targets: s.span_targets as u64,
                span_loss: s.span_loss,
                full_loss: s.full_loss,
            })
            .collect(),
        mean_relative: selection.mean_relative,
        seconds,
    }
}

/// The name of a localization mode, as Admin.Info and the status page show it.
pub fn localization(l: &Localization) -> &'static str {
    match l {
        Localization::Static => "static",
        Localization::PerBatch { .. } => "per-batch",
    }
}

/// A timestamp for the API.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A retained version.
pub fn version(s: &Snapshot) -> pb::VersionInfo {
    pb::VersionInfo {
        version: s.version(),
        created: Some(timestamp(s.created())),
        changed: s.changed().iter().map(|&g| group(g)).collect(),
        origin: match s.origin() {
            Origin::Loaded => "loaded".to_string(),
            Origin::Update => "update".to_string(),
            Origin::Rollback(v) => format!("rollback to {v}"),
        },
    }
}

/// API spans as the `[start, end]` pairs the span validator reads.
pub fn spans(spans: &[pb::Span]) -> Vec<Vec<i64>> {
    spans
        .iter()
        .map(|s| {
            vec![
                i64::try_from(s.start).unwrap_or(i64::MAX),
                i64::try_from(s.end).unwrap_or(i64::MAX),
            ]
        })
        .collect()
}
