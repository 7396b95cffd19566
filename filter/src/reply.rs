//! The answer the client gets: the control plane's reply, or a 503 when there is none.

use knocker_proto::v1::SubmitReply;
use prost::Message;

/// A local response to send with `send_http_response`.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    fn json_error(status: u32, message: &str, retry_after_s: Option<u32>) -> Self {
        let body = serde_json::json!({
            "status": false,
            "errors": { "knocker": [message] },
        });
        let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
        if let Some(seconds) = retry_after_s {
            headers.push(("retry-after".to_owned(), seconds.to_string()));
        }
        Self {
            status,
            headers,
            body: body.to_string().into_bytes(),
        }
    }

    /// The control plane could not be asked, or did not answer in time.
    pub fn unavailable(reason: &str, retry_after_s: u32) -> Self {
        let message = format!("Knocker control plane unavailable: {reason}. Nothing was accepted.");
        Self::json_error(503, &message, Some(retry_after_s))
    }
}

/// Turns a finished gRPC call into the client's response. `grpc_status` 0 is OK.
pub fn from_grpc(
    grpc_status: u32,
    body: Option<&[u8]>,
    status_message: Option<&str>,
    retry_after_s: u32,
) -> Response {
    if grpc_status != 0 {
        let reason = match status_message {
            Some(m) if !m.is_empty() => format!("gRPC status {grpc_status}: {m}"),
            _ => format!("gRPC status {grpc_status}"),
        };
        return Response::unavailable(&reason, retry_after_s);
    }
    let Some(reply) = body.and_then(|b| SubmitReply::decode(b).ok()) else {
        return Response::unavailable("unreadable reply", retry_after_s);
    };
    if !(100..=599).contains(&reply.status) {
        return Response::unavailable("reply without a valid HTTP status", retry_after_s);
    }
    let headers = reply
        .headers
        .into_iter()
        .filter_map(|h| {
            Some((
                String::from_utf8(h.name).ok()?,
                String::from_utf8(h.value).ok()?,
            ))
        })
        .collect();
    Response {
        status: reply.status,
        headers,
        body: reply.body,
    }
}

/// A one-line reason from an error response: its first JSON error, else its status.
pub fn error_text(response: &Response) -> String {
    let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_default();
    let first = body
        .get("errors")
        .and_then(serde_json::Value::as_object)
        .and_then(|errors| errors.iter().next())
        .and_then(|(field, messages)| {
            let message = messages.get(0)?.as_str()?;
            Some(format!("{field}: {message}"))
        });
    first.unwrap_or_else(|| format!("the control plane answered {}", response.status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use knocker_proto::v1::Header;

    fn json(body: &[u8]) -> serde_json::Value {
        serde_json::from_slice(body).unwrap_or_default()
    }

    #[test]
    fn passes_the_reply_through() {
        let reply = SubmitReply {
            status: 200,
            headers: vec![Header {
                name: b"content-type".to_vec(),
                value: b"x/y".to_vec(),
            }],
            body: b"{}".to_vec(),
        };
        let r = from_grpc(0, Some(&reply.encode_to_vec()), None, 1);
        assert_eq!(r.status, 200);
        assert_eq!(
            r.headers,
            vec![("content-type".to_owned(), "x/y".to_owned())]
        );
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn failures_are_503_with_retry_after_and_no_receipt() {
        for r in [
            from_grpc(14, None, Some("upstream connect error"), 2),
            from_grpc(4, None, None, 2),
            from_grpc(0, Some(b"\xff\xff\xff"), None, 2),
            from_grpc(0, Some(&SubmitReply::default().encode_to_vec()), None, 2),
        ] {
            assert_eq!(r.status, 503);
            assert!(r
                .headers
                .contains(&("retry-after".to_owned(), "2".to_owned())));
            let body = json(&r.body);
            assert_eq!(body["status"], false);
            assert!(body["errors"]["knocker"][0]
                .as_str()
                .is_some_and(|m| m.contains("unavailable")));
        }
        let r = from_grpc(14, None, Some("upstream connect error"), 2);
        assert!(String::from_utf8_lossy(&r.body).contains("upstream connect error"));
        assert!(error_text(&r).starts_with("knocker: Knocker control plane unavailable"));
        let bare = Response {
            status: 500,
            headers: vec![],
            body: b"oops".to_vec(),
        };
        assert_eq!(error_text(&bare), "the control plane answered 500");
    }
}
