//! An OpenAI-style HTTP API beside gRPC: `POST /v1/completions` and `GET /v1/models`, and the
//! tokenizer as vLLM serves it, so that OpenAI clients and evaluation harnesses
//! (lm-evaluation-harness's `local-completions`) query the live model. A thin adapter: requests take the Query service's path (its snapshot, slots,
//! limits, sampling and generation), the query token admits them, and errors are the same domain
//! errors, as `{"error": {"message", "type", "code", "param"}}` with an HTTP status.

mod completions;
mod request;
mod tokenizer;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::auth::Bearer;
use super::{ServerError, State};

/// The name this server serves its model under (`model` in requests and `/v1/models`).
pub const MODEL: &str = "locus";

/// The response header that names the model version an answer was computed on.
pub const VERSION_HEADER: &str = "x-locus-version";

/// The API on `listener`, over TLS when the server has `--tls-cert`: a future that serves until
/// it is dropped, or the error of a certificate or key that rustls refuses.
pub fn serve(
    listener: TcpListener,
    state: Arc<State>,
) -> Result<impl std::future::Future<Output = ()>, ServerError> {
    let tls = match &state.config.tls {
        Some(tls) => Some(tokio_rustls::TlsAcceptor::from(
            crate::tls::http_server_config(&tls.cert_pem, &tls.key_pem)?,
        )),
        None => None,
    };
    let bearer = Bearer::query(&state.config.auth);
    let patience = state.config.limits.send_timeout;
    Ok(super::http::serve(
        listener,
        "openai",
        patience,
        tls,
        move |request| {
            let state = Arc::clone(&state);
            let bearer = bearer.clone();
            async move { respond(&state, &bearer, request).await }
        },
    ))
}

/// Why a request got no answer: a domain error, or a path or method this API does not have.
enum Refusal {
    Error(ServerError),
    Route(StatusCode, &'static str, String),
}

impl From<ServerError> for Refusal {
    fn from(e: ServerError) -> Self {
        Refusal::Error(e)
    }
}

/// The answer to one request: JSON, with the version it was computed on in a header and in the
/// body (an error carries the version being served, when a model is loaded).
async fn respond(
    state: &Arc<State>,
    bearer: &Bearer,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (status, version, body) = match route(state, bearer, request).await {
        Ok((version, mut body)) => {
            body["system_fingerprint"] = json!(format!("locus-v{version}"));
            body["locus_version"] = json!(version);
            (StatusCode::OK, Some(version), body)
        }
        Err(refusal) => {
            let (status, body) = error(refusal);
            let version = state.loaded().ok().map(|l| l.snapshots.current().version());
            (status, version, body)
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(v) = version {
        headers.insert(VERSION_HEADER, HeaderValue::from(v));
    }
    response
}

/// The endpoints, each with its method.
const ENDPOINTS: [(&str, Method); 5] = [
    ("/v1/completions", Method::POST),
    ("/v1/models", Method::GET),
    ("/tokenizer_info", Method::GET),
    ("/tokenize", Method::POST),
    ("/detokenize", Method::POST),
];

async fn route(
    state: &Arc<State>,
    bearer: &Bearer,
    request: Request<Incoming>,
) -> Result<(u64, Value), Refusal> {
    let path = request.uri().path().to_string();
    let Some((_, method)) = ENDPOINTS.iter().find(|(p, _)| *p == path) else {
        return Err(Refusal::Route(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{path}: not found; see docs/api.md for this API's endpoints"),
        ));
    };
    if request.method() != method {
        return Err(Refusal::Route(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} {path}: use {method}", request.method()),
        ));
    }
    admit(bearer, &request)?;
    if path == "/v1/completions" {
        if *state.shutdown.borrow() {
            return Err(ServerError::ShuttingDown.into());
        }
        let _timer = state.metrics.query_timer("Completions");
        let body = body(state, request).await?;
        let (version, mut answer) =
            completions::complete(state, request::completion(&body)?).await?;
        answer["id"] = json!(format!("cmpl-{:032x}", rand::random::<u128>()));
        answer["object"] = json!("text_completion");
        answer["created"] = json!(now());
        answer["model"] = json!(MODEL);
        return Ok((version, answer));
    }
    let loaded = state.loaded()?;
    let s = loaded.snapshots.current();
    let answer = match path.as_str() {
        "/v1/models" => {
            let model = json!({
                "id": MODEL,
                "object": "model",
                "created": now(),
                "owned_by": "locus",
                "architecture": loaded.model.arch.name(),
            });
            json!({"object": "list", "data": [model]})
        }
        "/tokenizer_info" => tokenizer::info(state, &s),
        "/tokenize" => tokenizer::tokenize(state, &s, &body(state, request).await?)?,
        _ => tokenizer::detokenize(&s, &body(state, request).await?)?,
    };
    Ok((s.version(), answer))
}

/// Admits a request bearing the query token (or the write token), as the gRPC Query service does.
fn admit(bearer: &Bearer, request: &Request<Incoming>) -> Result<(), ServerError> {
    bearer.admits(
        request
            .headers()
            .get(AUTHORIZATION)
            .map(HeaderValue::as_bytes),
    )
}

/// The request body, at most `--max-message-bytes` of it, whole within `--send-timeout`.
async fn body(state: &State, request: Request<Incoming>) -> Result<Bytes, ServerError> {
    let limits = &state.config.limits;
    let max = limits.max_message_bytes;
    let collect = Limited::new(request.into_body(), max).collect();
    let collected = tokio::time::timeout(limits.send_timeout, collect)
        .await
        .map_err(|_| ServerError::SlowBody(limits.send_timeout))?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ServerError::limit("body", format!("more than {max} bytes")))
        }
        Err(e) => Err(ServerError::invalid("body", e.to_string())),
    }
}

/// Seconds since the Unix epoch.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The status and OpenAI-style body of a refusal.
fn error(refusal: Refusal) -> (StatusCode, Value) {
    let (status, message, code, param) = match refusal {
        Refusal::Error(e) => {
            e.log();
            let status =
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let param = match &e {
                ServerError::InvalidArgument { field, .. } | ServerError::Limit { field, .. } => {
                    Some(field.clone())
                }
                _ => None,
            };
            (
                status,
                e.client_message(),
                snake(&format!("{:?}", e.code())),
                param,
            )
        }
        Refusal::Route(status, code, message) => (status, message, code.to_string(), None),
    };
    let kind = match status.as_u16() {
        401 => "authentication_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    };
    let body = json!({"error": {"message": message, "type": kind, "code": code, "param": param}});
    (status, body)
}

/// `InvalidArgument` as `invalid_argument`: a gRPC code's name as an OpenAI error code.
fn snake(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_uppercase() && !out.is_empty() {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}
