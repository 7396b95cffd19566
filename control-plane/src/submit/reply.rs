//! The answer to a submission, whichever door it came through: a status, headers and a
//! body in the shapes of the Knocker protocol. The gRPC door copies it into its message,
//! the HTTP door into its response, the API uses its error shape; store errors become
//! answers here and nowhere else.

use serde_json::json;

use crate::job::spec::Errors;
use crate::store::StoreError;

/// Seconds a client is asked to wait after a 503.
pub const RETRY_AFTER_S: &str = "1";

/// The response for the client, whichever ingress it came through.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json<T: serde::Serialize + ?Sized>(status: u16, body: &T) -> Self {
        // A receipt is a few hundred bytes: one allocation rather than growing from 128.
        let mut out = Vec::with_capacity(512);
        match serde_json::to_writer(&mut out, body) {
            Ok(()) => Self {
                status,
                headers: vec![("content-type".into(), "application/json".into())],
                body: out,
            },
            // Not for the shapes written here (string keys only); said, never a panic.
            Err(e) => Self::text(500, &format!("the answer could not be written: {e}")),
        }
    }

    pub fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    /// A JSON error in Knocker's shape, naming the field. A 503 also asks the client to
    /// come back (`Retry-After`): nothing was accepted, and it may be shortly.
    pub fn error(status: u16, field: &str, message: &str) -> Self {
        let reply = Self::json(
            status,
            &json!({ "errors": { field: [message] }, "status": false }),
        );
        if status == 503 {
            reply.with_header("retry-after", RETRY_AFTER_S)
        } else {
            reply
        }
    }

    /// Every reason a submission was refused (400).
    pub fn invalid(errors: &Errors) -> Self {
        Self::json(400, &errors.to_json())
    }

    /// A header's value (names compared without case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

impl axum::response::IntoResponse for Reply {
    fn into_response(self) -> axum::response::Response {
        let mut builder = axum::response::Response::builder().status(self.status);
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        builder
            .body(axum::body::Body::from(self.body))
            .unwrap_or_else(|_| {
                let mut fallback = axum::response::Response::new(axum::body::Body::from(
                    "the reply could not be encoded",
                ));
                *fallback.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                fallback
            })
    }
}

impl Reply {
    /// The one answer to a store that cannot commit or read: 503 naming `store`, with
    /// `Retry-After`; `then` says what it meant for the call.
    pub fn store_unavailable(e: &StoreError, then: Option<&str>) -> Self {
        let message = match then {
            Some(then) => format!("{e}. {then}"),
            None => e.to_string(),
        };
        Reply::error(503, "store", &message)
    }
}

impl From<&StoreError> for Reply {
    /// A submission the store could not commit: nothing accepted, come back later.
    fn from(e: &StoreError) -> Self {
        Reply::store_unavailable(e, Some("Nothing was accepted; retry later."))
    }
}
