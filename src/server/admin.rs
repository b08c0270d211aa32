//! The Admin service: info, pause and resume, versions, rollback and checkpoints.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::{ServerError, State};
use crate::live::Job;
use crate::proto::v1 as pb;
use crate::proto::v1::admin_server::Admin;

/// The Admin service.
pub struct AdminService {
    state: Arc<State>,
}

impl AdminService {
    /// The service over the shared state.
    pub fn new(state: Arc<State>) -> Self {
        AdminService { state }
    }

    fn set_paused(&self, paused: bool) -> Result<pb::PauseResponse, ServerError> {
        self.state.writable("pause and resume")?;
        let loaded = self.state.loaded()?;
        loaded.paused.store(paused, Ordering::SeqCst);
        tracing::info!(
            paused,
            "learning {}",
            if paused { "paused" } else { "resumed" }
        );
        Ok(pb::PauseResponse {
            paused,
            version: loaded.snapshots.current().version(),
        })
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    #[tracing::instrument(skip_all, name = "Info")]
    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let loaded = self.state.loaded()?;
        let model = &loaded.model;
        let learn = &self.state.config.learn;
        let progress = loaded.learner.progress();
        let version = loaded.snapshots.current().version();
        let published = loaded.published.load(Ordering::SeqCst);
        let config = serde_json::json!({
            "model": model.info(),
            "learn": learn,
            "batch_size": self.state.config.batch_size,
            "keep_versions": self.state.config.keep_versions,
        });
        Ok(Response::new(pb::InfoResponse {
            architecture: model.arch.name().to_string(),
            layers: model.arch.num_layers() as u32,
            parameters: model.vars.values().map(|v| v.elem_count() as u64).sum(),
            vocab_size: model.arch.vocab_size() as u32,
            source: model.source.path.clone(),
            version,
            strategy: learn.strategy.name.clone(),
            localization: convert::localization(&learn.localization).to_string(),
            lr: learn.lr,
            batch_size: self.state.config.batch_size as u32,
            paused: loaded.paused.load(Ordering::SeqCst),
            selection: progress
                .selection
                .iter()
                .map(|&g| convert::group(g))
                .collect(),
            steps: progress.steps,
            queue_depth: loaded.learner.queued() as u32,
            config_json: config.to_string(),
            role: self.state.config.role.name().to_string(),
            published_version: published,
            behind: published.saturating_sub(version),
            publish_failures: self.state.metrics.publish_failures(),
            learning_blocked: progress.blocked.clone().unwrap_or_default(),
            store_error: loaded.store_health.error().unwrap_or_default(),
            seconds_since_store: loaded.store_health.seconds_since_reached(),
        }))
    }

    #[tracing::instrument(skip_all, name = "Pause")]
    async fn pause(
        &self,
        _request: Request<pb::PauseRequest>,
    ) -> Result<Response<pb::PauseResponse>, Status> {
        Ok(Response::new(self.set_paused(true)?))
    }

    #[tracing::instrument(skip_all, name = "Resume")]
    async fn resume(
        &self,
        _request: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::PauseResponse>, Status> {
        Ok(Response::new(self.set_paused(false)?))
    }

    #[tracing::instrument(skip_all, name = "ListVersions")]
    async fn list_versions(
        &self,
        _request: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        let loaded = self.state.loaded()?;
        let checkpoints = match &self.state.config.durability {
            Some(d) => crate::store::checkpoint::list_in(&crate::store::checkpoints_in(&d.dir))
                .map_err(ServerError::from)?
                .into_iter()
                .rev()
                .map(|c| c.0)
                .collect(),
            None => Vec::new(),
        };
        Ok(Response::new(pb::ListVersionsResponse {
            current: loaded.snapshots.current().version(),
            versions: loaded
                .snapshots
                .retained()
                .iter()
                .map(|s| convert::version(s))
                .collect(),
            checkpoints,
        }))
    }

    #[tracing::instrument(skip_all, name = "Rollback", fields(version = request.get_ref().version))]
    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackResponse>, Status> {
        self.state.writable("rollbacks")?;
        let loaded = self.state.loaded()?;
        let version = request.into_inner().version;
        let (new, restored) = loaded
            .learner
            .ask(|reply| Job::Rollback { version, reply })
            .await
            .map_err(ServerError::from)?;
        tracing::info!(new, restored, "rolled back");
        Ok(Response::new(pb::RollbackResponse {
            version: new,
            restored_from: restored,
        }))
    }

    #[tracing::instrument(skip_all, name = "Checkpoint")]
    async fn checkpoint(
        &self,
        _request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        self.state.writable("checkpoint requests")?;
        let loaded = self.state.loaded()?;
        let written = loaded
            .learner
            .ask(|reply| Job::Checkpoint { reply })
            .await
            .map_err(ServerError::from)?
            .ok_or_else(|| {
                ServerError::invalid(
                    "data_dir",
                    "the server keeps no data directory; start it with --data-dir",
                )
            })?;
        Ok(Response::new(pb::CheckpointResponse {
            version: written.meta.version,
            parent: written.meta.parent,
            journal_seq: written.meta.journal_seq,
            path: written.path.display().to_string(),
            bytes: written.bytes,
            groups: written.meta.groups,
        }))
    }
}
