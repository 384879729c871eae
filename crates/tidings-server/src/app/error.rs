//! One error type for the HTTP edge: a status, a stable code and a message a person can act
//! on, always as `{"error":{"code","message"}}`. Internal causes are logged, never sent.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tidings_core::{BrokerError, CursorError, NameError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The `Allow` header of a 405 that the router does not add itself (routes taking `any`).
    pub allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            allow: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route; see the HTTP API in docs/protocol.md",
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not take that method",
        )
    }

    /// A 405 from a handler that takes every method itself, naming the ones it serves.
    pub fn method_not_allowed_allowing(allow: &'static str) -> Self {
        Self {
            allow: Some(allow),
            ..Self::method_not_allowed()
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is over max_message_bytes ({limit} bytes)"),
        )
    }

    /// A request body that did not arrive within `request_body_timeout`.
    pub fn body_timeout(timeout: std::time::Duration) -> Self {
        // The lean path answers the same 408 itself, from the same words.
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            crate::net::h1::body_timeout_message(timeout),
        )
    }

    /// Prefixes the message, e.g. with the batch entry it is about (`messages[3]: …`).
    pub fn context(mut self, prefix: &str) -> Self {
        self.message = format!("{prefix}: {}", self.message);
        self
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        let code = match e {
            NameError::Channel(_) => "invalid_channel",
            NameError::Event(_) => "invalid_event",
        };
        Self::bad_request(code, e.to_string())
    }
}

impl From<CursorError> for ApiError {
    fn from(e: CursorError) -> Self {
        Self::bad_request("invalid_cursor", e.to_string())
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        tracing::warn!(error = %e, "broker error");
        match e {
            BrokerError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                "the broker is unavailable; nothing was stored, retry later",
            ),
            BrokerError::Storage(_) => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "storage_failed",
                "the data dir could not store the message (disk full or an I/O error); nothing was stored, retry later",
            ),
            BrokerError::TooManyChannels(max) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_channels",
                format!(
                    "the server holds its maximum of {max} channels (server.max_channels); nothing was published, publish to an existing channel or retry once idle channels are reclaimed"
                ),
            ),
            BrokerError::OutcomeUnknown(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "outcome_unknown",
                "the broker's answer was lost: the message may or may not have been stored; \
                 retry with the same Idempotency-Key to publish it at most once",
            ),
            BrokerError::Unsupported(what) => Self::new(
                StatusCode::NOT_IMPLEMENTED,
                "unsupported",
                format!("the configured broker does not support {what}"),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut res = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE
            || self.status == StatusCode::TOO_MANY_REQUESTS
        {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Some(allow) = self.allow {
            res.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        // RFC 6750: every 401 names the scheme; a rejected token says so, nothing more.
        if self.status == StatusCode::UNAUTHORIZED {
            let value = if self.code == "invalid_token" {
                "Bearer realm=\"tidings\", error=\"invalid_token\""
            } else {
                "Bearer realm=\"tidings\""
            };
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(value));
        }
        res
    }
}
