//! Entry points for the fuzz targets (`fuzz/`): the synchronous parsing halves of request
//! paths whose own functions take server state or an HTTP body. Each calls exactly what the
//! server calls, so a target fuzzes the code that runs. Not an API: hidden from the docs and
//! free to change with the targets.

use axum::http::{HeaderMap, HeaderValue, header};
use bytes::Bytes;
use tidings_core::{ChannelName, Data, EventName};

use crate::app::error::ApiError;
use crate::app::publish::{self, Parsed};

/// Why input was refused: what the client is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Self {
            status: e.status.as_u16(),
            code: e.code,
            message: e.message,
        }
    }
}

/// One message a publish would store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToPublish {
    pub channel: ChannelName,
    pub event: Option<EventName>,
    pub data: Data,
    pub idempotency_key: Option<String>,
}

/// A `POST /publish` body as the handler validates it (`max_message_bytes` as configured, no
/// `Idempotency-Key` header): every message it would publish, in order, and for a batch the
/// field it came in (`channels` or `messages`).
pub fn publish_document(
    max_message_bytes: usize,
    body: &[u8],
) -> Result<(Vec<ToPublish>, Option<&'static str>), Refusal> {
    let to = |v: publish::Validated| ToPublish {
        channel: v.channel,
        event: v.event,
        data: v.data,
        idempotency_key: v.idempotency_key.map(|k| k.as_str().to_owned()),
    };
    match publish::parse_document(max_message_bytes, None, body)? {
        Parsed::One(v) => Ok((vec![to(v)], None)),
        Parsed::Batch(batch, what) => Ok((batch.into_iter().map(to).collect(), Some(what))),
    }
}

/// A `POST /publish/{channel}` body with its `Content-Type` and query (`?event=`), as the
/// handler reads them once the body is within `max_message_bytes`.
pub fn publish_raw(
    content_type: Option<&[u8]>,
    query: Option<&str>,
    body: Bytes,
) -> Result<(Option<EventName>, Data), Refusal> {
    let mut headers = HeaderMap::new();
    if let Some(ct) = content_type {
        // A value no client could send (a newline) is not a request the handler sees.
        let Ok(v) = HeaderValue::from_bytes(ct) else {
            return Err(Refusal {
                status: 400,
                code: "invalid_header",
                message: "not a header value".into(),
            });
        };
        headers.insert(header::CONTENT_TYPE, v);
    }
    let event = publish::event_from_query(query)?;
    let data = publish::data_from(&headers, body)?;
    Ok((event, data))
}
