//! What the API never shows, to any caller: credentials inside URLs, the values of
//! headers and settings whose names say they carry a secret (authorization, cookies,
//! tokens, keys, passwords, signatures).

use serde_json::{Map, Value};

/// Shown instead of a secret.
pub const REDACTED: &str = "[redacted]";

/// Does a header or field of this name carry a secret?
pub fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "authorization",
        "cookie",
        "token",
        "secret",
        "password",
        "passwd",
        "api-key",
        "api_key",
        "apikey",
        "x-api-key",
        "signature",
        "credential",
        "session",
    ]
    .iter()
    .any(|s| n.contains(s))
}

/// `https://user:pass@host/x?token=…` → `https://[redacted]@host/x?token=[redacted]`.
/// Text that does not parse as a URL still loses what stands before an `@` after `://`.
pub fn url(text: &str) -> String {
    if !text.contains(['@', '?']) {
        return text.to_owned(); // no credentials and no query: nothing to parse for
    }
    let Ok(mut url) = reqwest::Url::parse(text) else {
        return userinfo_cut(text);
    };
    let mut changed = false;
    if !url.username().is_empty() || url.password().is_some() {
        let _ = url.set_password(None);
        let _ = url.set_username(REDACTED);
        changed = true;
    }
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_name(&k) {
                    changed = true;
                    REDACTED.to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        if changed {
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
    }
    if changed {
        url.to_string()
    } else {
        text.to_owned()
    }
}

/// `scheme://anything@rest` → `scheme://[redacted]@rest`, for text no URL parser takes.
fn userinfo_cut(text: &str) -> String {
    let Some(start) = text.find("://").map(|i| i + 3) else {
        return text.to_owned();
    };
    let authority_end = text[start..]
        .find(['/', '?', '#'])
        .map_or(text.len(), |i| start + i);
    match text[start..authority_end].rfind('@') {
        Some(at) => format!("{}{REDACTED}{}", &text[..start], &text[start + at..]),
        None => text.to_owned(),
    }
}

/// A JSON value with secrets taken out: string values under secret names, and
/// credentials in anything that parses as a URL.
pub fn json(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(object(map)),
        Value::Array(items) => Value::Array(items.iter().map(json).collect()),
        Value::String(s) if s.contains("://") => Value::String(url(s)),
        other => other.clone(),
    }
}

pub fn object(map: &Map<String, Value>) -> Map<String, Value> {
    map.iter()
        .map(|(k, v)| {
            let v = if is_secret_name(k) && !v.is_null() {
                Value::String(REDACTED.into())
            } else {
                json(v)
            };
            (k.clone(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn credentials_in_urls_and_secret_names_are_redacted() {
        assert_eq!(
            url("https://u:p@h.example/x?a=1&token=abc"),
            "https://%5Bredacted%5D@h.example/x?a=1&token=%5Bredacted%5D"
        );
        assert_eq!(url("http://h/x?a=1"), "http://h/x?a=1");
        assert_eq!(url("not a url"), "not a url");
        assert_eq!(url("http://h/x"), "http://h/x");
        // Not a URL to the parser (no host), credentials all the same.
        assert_eq!(url("nats://u:hunter2@:4222"), "nats://[redacted]@:4222");
        assert_eq!(url("x://a@b@[c/p@q"), "x://[redacted]@[c/p@q");
        assert_eq!(url("x://[c/p@q"), "x://[c/p@q");
        let v = json(&json!({
            "headers": {"Authorization": "Bearer s3cret", "x-a": "1"},
            "knocker-api-key": "k",
            "callback": "http://me:pw@cb/",
        }));
        let text = v.to_string();
        for secret in ["s3cret", "\"k\"", "me:pw"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(v["headers"]["x-a"], "1");
    }
}
