//! The receipt: given only once the job is committed.

use serde::ser::{Serialize, SerializeSeq, Serializer};
use serde_json::{json, Map, Value};

use super::{Headers, Job, VERSION};

/// The headers a receipt shows the target will get: `x-knocker`, then the forwarded ones.
pub fn header_list(forwarded: &Headers) -> Vec<Value> {
    let mut headers = vec![json!(["x-knocker", VERSION])];
    headers.extend(
        forwarded
            .iter()
            .map(|(name, value)| json!([name, String::from_utf8_lossy(value)])),
    );
    headers
}

/// The Knocker 1.4.1 receipt for a job (`200`, `"status": true`). It is written straight
/// from the job, without a JSON tree in between (every submission answers with one);
/// its fields are in the order such a tree prints them, by name.
#[derive(serde::Serialize)]
pub struct Receipt<'a> {
    #[serde(rename = "body-length")]
    body_length: usize,
    config: &'a Map<String, Value>,
    headers: HeaderList<'a>,
    method: &'a str,
    status: bool,
    url: &'a str,
}

pub fn receipt(job: &Job) -> Receipt<'_> {
    Receipt {
        body_length: job.request.body.len(),
        config: &job.config,
        headers: HeaderList(&job.request.headers),
        method: &job.request.method,
        status: true,
        url: &job.request.url,
    }
}

/// [`header_list`], written as it is read.
struct HeaderList<'a>(&'a Headers);

impl Serialize for HeaderList<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len() + 1))?;
        seq.serialize_element(&("x-knocker", VERSION))?;
        for (name, value) in self.0 {
            seq.serialize_element(&(name, String::from_utf8_lossy(value)))?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The receipt reads exactly as the JSON tree it replaces.
    #[test]
    fn the_receipt_is_the_tree_it_replaces() {
        let mut config = Map::new();
        config.insert("retry".into(), json!({"count": 3, "interval": 5}));
        config.insert("callback".into(), json!(null));
        let headers: Headers = vec![
            ("content-type".into(), b"application/json".to_vec()),
            ("x-odd".into(), vec![b'a', 0xff, b'"']),
        ];
        let tree = json!({
            "status": true,
            "config": config,
            "url": "http://example.test/a?b=c",
            "method": "POST",
            "headers": header_list(&headers),
            "body-length": 42,
        });
        let receipt = Receipt {
            body_length: 42,
            config: &config,
            headers: HeaderList(&headers),
            method: "POST",
            status: true,
            url: "http://example.test/a?b=c",
        };
        assert_eq!(serde_json::to_string(&receipt).unwrap(), tree.to_string());
    }
}
