//! Bearer tokens: one for write access (Learn, Admin), optionally one for queries.
//!
//! Tokens are compared as SHA-256 digests in constant time, so neither the content nor the length
//! of the configured token leaks through timing, and they are never logged.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::ServerError;

/// A secret bearer token; its `Debug` output is redacted.
#[derive(Clone)]
pub struct Token([u8; 32]);

impl Token {
    /// A token from its text (the text itself is not kept).
    pub fn new(secret: &str) -> Self {
        Token(Sha256::digest(secret.as_bytes()).into())
    }

    fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.0.ct_eq(&digest).into()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Which tokens each service requires; `None` leaves it open.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// Required by Learn and Admin (and accepted by Query).
    pub write: Option<Token>,
    /// Required by Query.
    pub query: Option<Token>,
}

/// An interceptor that admits requests bearing one of its tokens.
#[derive(Clone)]
pub struct Bearer {
    accepted: Arc<Vec<Token>>,
    required: bool,
}

impl Bearer {
    /// Guards write access.
    pub fn write(auth: &Auth) -> Self {
        Bearer {
            accepted: Arc::new(auth.write.iter().cloned().collect()),
            required: auth.write.is_some(),
        }
    }

    /// Guards queries: the query token or the write token, when a query token is configured.
    pub fn query(auth: &Auth) -> Self {
        Bearer {
            accepted: Arc::new(auth.query.iter().chain(&auth.write).cloned().collect()),
            required: auth.query.is_some(),
        }
    }
}

impl Bearer {
    /// Whether a request whose `authorization` header is `header` may pass.
    pub(crate) fn admits(&self, header: Option<&[u8]>) -> Result<(), ServerError> {
        if !self.required {
            return Ok(());
        }
        let header = header.ok_or(ServerError::Unauthenticated(
            "missing `authorization: Bearer <token>`",
        ))?;
        let presented = std::str::from_utf8(header)
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .ok_or(ServerError::Unauthenticated(
                "`authorization` must be `Bearer <token>`",
            ))?;
        // Check every token so the time taken does not say which one matched.
        let ok = self
            .accepted
            .iter()
            .fold(false, |acc, t| acc | t.matches(presented));
        if ok {
            Ok(())
        } else {
            Err(ServerError::Unauthenticated("invalid bearer token"))
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|h| h.as_bytes());
        self.admits(header)?;
        Ok(request)
    }
}
