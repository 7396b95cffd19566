//! Builds the `SubmitRequest` the control plane receives.

use knocker_proto::v1::{Header, Mode, SubmitRequest};

use crate::host::HeaderPair;

/// Splits Envoy's header map into the request line (pseudo-headers) and the ordinary
/// headers, kept in order and as bytes.
pub fn submit_request(headers: Vec<HeaderPair>, mode: Mode, rule: &str) -> SubmitRequest {
    let mut request = SubmitRequest {
        mode: mode as i32,
        rule: rule.to_owned(),
        ..SubmitRequest::default()
    };
    for (name, value) in headers {
        let text = || String::from_utf8_lossy(&value).into_owned();
        match name.as_str() {
            ":method" => request.method = text(),
            ":scheme" => request.scheme = text(),
            ":authority" => request.authority = text(),
            ":path" => request.path = text(),
            n if n.starts_with(':') => {}
            _ => request.headers.push(Header {
                name: name.into_bytes(),
                value,
            }),
        }
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_pseudo_headers_and_keeps_order() {
        let headers = vec![
            (":authority".to_owned(), b"example".to_vec()),
            (":path".to_owned(), b"/a%2Fb?x=1&y".to_vec()),
            (":method".to_owned(), b"POST".to_vec()),
            (":scheme".to_owned(), b"http".to_vec()),
            ("knocker-host".to_owned(), b"t.example".to_vec()),
            ("x-b".to_owned(), vec![0xff, 0x01]),
            ("x-a".to_owned(), b"1".to_vec()),
        ];
        let r = submit_request(headers, Mode::Knocker, "");
        assert_eq!(r.method, "POST");
        assert_eq!(r.scheme, "http");
        assert_eq!(r.authority, "example");
        assert_eq!(r.path, "/a%2Fb?x=1&y");
        assert_eq!(r.mode, Mode::Knocker as i32);
        let names: Vec<_> = r.headers.iter().map(|h| h.name.as_slice()).collect();
        assert_eq!(names, [&b"knocker-host"[..], b"x-b", b"x-a"]);
        assert_eq!(
            r.headers.get(1).map(|h| h.value.clone()),
            Some(vec![0xff, 0x01])
        );
    }
}
