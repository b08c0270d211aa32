//! The typed client of `locus serve`, behind `locus client` and `locus demo`.
//!
//! It speaks the public API only (`crate::proto`), never the server's internals.

use tokio_stream::Stream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status, Streaming};

use crate::proto::v1 as pb;
use crate::proto::v1::admin_client::AdminClient;
use crate::proto::v1::learn_client::LearnClient;
use crate::proto::v1::query_client::QueryClient;

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not a usable URI.
    #[error("address `{address}`: {reason}")]
    Address {
        /// The address given.
        address: String,
        /// Why it is unusable.
        reason: String,
    },
    /// The server could not be reached.
    #[error("cannot connect to {address}: {reason}")]
    Connect {
        /// The address given.
        address: String,
        /// The innermost cause (the layers above it repeat it).
        reason: String,
    },
    /// The TLS settings were refused (an unusable certificate authority, say).
    #[error("TLS for `{address}`: {reason}")]
    Tls {
        /// The address given.
        address: String,
        /// Why.
        reason: String,
    },
    /// The token cannot travel in an HTTP header.
    #[error("the bearer token contains characters an HTTP header cannot carry")]
    Token,
    /// The server answered with an error status (not a `source`, so it is printed once).
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(Status),
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        ClientError::Status(s)
    }
}

/// Adds `authorization: Bearer <token>` to every request when a token is set.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// The channel every stub shares, with the token attached.
type Svc = InterceptedService<Channel, BearerToken>;

/// A connection to a locus server.
#[derive(Clone)]
pub struct Client {
    learn: LearnClient<Svc>,
    query: QueryClient<Svc>,
    admin: AdminClient<Svc>,
}

impl Client {
    /// Connects to `address` (`host:port` or a URI such as `http://host:port`), sending `token`
    /// as a bearer token with every call when given.
    pub async fn connect(address: &str, token: Option<&str>) -> Result<Self, ClientError> {
        Self::open(address, "http", None, token).await
    }

    /// Connects over TLS to `address` (`host:port` or `https://host:port`), trusting the server
    /// certificate only if the PEM certificate authority `ca_pem` signed it.
    pub async fn connect_tls(
        address: &str,
        token: Option<&str>,
        ca_pem: &[u8],
    ) -> Result<Self, ClientError> {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        Self::open(address, "https", Some(tls), token).await
    }

    async fn open(
        address: &str,
        scheme: &str,
        tls: Option<ClientTlsConfig>,
        token: Option<&str>,
    ) -> Result<Self, ClientError> {
        let uri = if address.contains("://") {
            address.to_string()
        } else {
            format!("{scheme}://{address}")
        };
        let mut endpoint = Endpoint::from_shared(uri).map_err(|e| ClientError::Address {
            address: address.to_string(),
            reason: e.to_string(),
        })?;
        if let Some(tls) = tls {
            crate::tls::choose_provider();
            endpoint = endpoint.tls_config(tls).map_err(|e| ClientError::Tls {
                address: address.to_string(),
                reason: e.to_string(),
            })?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            let mut cause: &dyn std::error::Error = &e;
            while let Some(inner) = cause.source() {
                cause = inner;
            }
            ClientError::Connect {
                address: address.to_string(),
                reason: cause.to_string(),
            }
        })?;
        let header = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ClientError::Token)
            })
            .transpose()?;
        let bearer = BearerToken(header);
        Ok(Client {
            learn: LearnClient::with_interceptor(channel.clone(), bearer.clone()),
            query: QueryClient::with_interceptor(channel.clone(), bearer.clone()),
            admin: AdminClient::with_interceptor(channel, bearer),
        })
    }

    /// Opens an ingest stream: `batches` go out as the server accepts them, and the answers come
    /// back in order, one per batch.
    pub async fn ingest(
        &mut self,
        batches: impl Stream<Item = pb::IngestRequest> + Send + 'static,
    ) -> Result<Streaming<pb::IngestResponse>, ClientError> {
        Ok(self.learn.ingest(batches).await?.into_inner())
    }

    /// Gradient norms of texts with salient spans, without learning.
    pub async fn trace(
        &mut self,
        texts: Vec<pb::TraceText>,
    ) -> Result<pb::TraceResponse, ClientError> {
        Ok(self
            .learn
            .trace(pb::TraceRequest { texts })
            .await?
            .into_inner())
    }

    /// Log-probabilities of `candidates` as continuations of `prompt`, best first.
    pub async fn score(
        &mut self,
        prompt: &str,
        candidates: &[String],
    ) -> Result<pb::ScoreResponse, ClientError> {
        let request = pb::ScoreRequest {
            prompt: prompt.to_string(),
            candidates: candidates.to_vec(),
        };
        Ok(self.query.score(request).await?.into_inner())
    }

    /// A streamed continuation.
    pub async fn complete(
        &mut self,
        request: pb::CompleteRequest,
    ) -> Result<Streaming<pb::CompleteChunk>, ClientError> {
        Ok(self.query.complete(request).await?.into_inner())
    }

    /// Perplexity of each text.
    pub async fn perplexity(
        &mut self,
        texts: Vec<String>,
    ) -> Result<pb::PerplexityResponse, ClientError> {
        let request = pb::PerplexityRequest { texts };
        Ok(self.query.perplexity(request).await?.into_inner())
    }

    /// The model, its version and the learning settings.
    pub async fn info(&mut self) -> Result<pb::InfoResponse, ClientError> {
        Ok(self.admin.info(pb::InfoRequest {}).await?.into_inner())
    }

    /// Pauses learning.
    pub async fn pause(&mut self) -> Result<pb::PauseResponse, ClientError> {
        Ok(self.admin.pause(pb::PauseRequest {}).await?.into_inner())
    }

    /// Resumes learning.
    pub async fn resume(&mut self) -> Result<pb::PauseResponse, ClientError> {
        Ok(self.admin.resume(pb::ResumeRequest {}).await?.into_inner())
    }

    /// The versions the server retains.
    pub async fn list_versions(&mut self) -> Result<pb::ListVersionsResponse, ClientError> {
        let request = pb::ListVersionsRequest {};
        Ok(self.admin.list_versions(request).await?.into_inner())
    }

    /// Restores a retained version as a new version.
    pub async fn rollback(&mut self, version: u64) -> Result<pb::RollbackResponse, ClientError> {
        let request = pb::RollbackRequest { version };
        Ok(self.admin.rollback(request).await?.into_inner())
    }

    /// Writes a checkpoint of the served version to the server's data directory now.
    pub async fn checkpoint(&mut self) -> Result<pb::CheckpointResponse, ClientError> {
        let request = pb::CheckpointRequest {};
        Ok(self.admin.checkpoint(request).await?.into_inner())
    }
}
