//! The stored form of a job: the columns a row is read from, and the record that holds
//! what a job is (its state lives in columns). A record begins with a tag and its
//! layout's version, so the format can change: every layout ever written is still read.

use rusqlite::Row;
use serde::{Deserialize, Serialize};

use super::super::StoreError;
use crate::clock::Millis;
use crate::job::retry::RetryRules;
use crate::job::{Attempt, Headers, Job, Kind, Policy, Rate, Request, State, Trust};

pub(super) const COLUMNS: &str =
    "id, state, next_attempt_at, created_at, finished_at, spec, attempts, lane";

/// What a job is, as stored (its state lives in columns).
#[derive(Serialize, Deserialize)]
pub(super) struct Spec {
    kind: Kind,
    method: String,
    url: String,
    headers: Headers,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    timeout: f64,
    retries: u32,
    backoff_factor: f64,
    callback: Option<String>,
    /// The receipt config, as JSON text (postcard cannot hold free-form JSON).
    config: String,
    deadline: Option<Millis>,
    max_backoff_s: Option<f64>,
    trust: Trust,
    callback_trust: Trust,
    retry: RetryRules,
    source: Option<String>,
    rate: Option<Rate>,
}

/// The spec before retry rules, sources and rates (layouts 3 and 4): read with the
/// default rules (every failure but 410 retried, the factor's schedule).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct SpecV4 {
    kind: Kind,
    method: String,
    url: String,
    headers: Headers,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    timeout: f64,
    retries: u32,
    backoff_factor: f64,
    callback: Option<String>,
    config: String,
    deadline: Option<Millis>,
    max_backoff_s: Option<f64>,
    trust: Trust,
    callback_trust: Trust,
}

impl From<SpecV4> for Spec {
    fn from(v4: SpecV4) -> Self {
        Self {
            kind: v4.kind,
            method: v4.method,
            url: v4.url,
            headers: v4.headers,
            body: v4.body,
            timeout: v4.timeout,
            retries: v4.retries,
            backoff_factor: v4.backoff_factor,
            callback: v4.callback,
            config: v4.config,
            deadline: v4.deadline,
            max_backoff_s: v4.max_backoff_s,
            trust: v4.trust,
            callback_trust: v4.callback_trust,
            retry: RetryRules::default(),
            source: None,
            rate: None,
        }
    }
}

/// The spec before destinations carried their trust: read as chosen by a client, the
/// safe side (the outbound policy applies to them).
#[derive(Deserialize)]
struct SpecV2 {
    kind: Kind,
    method: String,
    url: String,
    headers: Headers,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    timeout: f64,
    retries: u32,
    backoff_factor: f64,
    callback: Option<String>,
    config: String,
    deadline: Option<Millis>,
    max_backoff_s: Option<f64>,
}

impl From<SpecV2> for Spec {
    fn from(v2: SpecV2) -> Self {
        Self {
            kind: v2.kind,
            method: v2.method,
            url: v2.url,
            headers: v2.headers,
            body: v2.body,
            timeout: v2.timeout,
            retries: v2.retries,
            backoff_factor: v2.backoff_factor,
            callback: v2.callback,
            config: v2.config,
            deadline: v2.deadline,
            max_backoff_s: v2.max_backoff_s,
            trust: Trust::Client,
            callback_trust: Trust::Client,
            retry: RetryRules::default(),
            source: None,
            rate: None,
        }
    }
}

/// The spec as the first release stored it (before maximum ages and backoff caps);
/// postcard has no optional trailing fields, so old rows are read with this.
#[derive(Deserialize)]
struct SpecV1 {
    kind: Kind,
    method: String,
    url: String,
    headers: Headers,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    timeout: f64,
    retries: u32,
    backoff_factor: f64,
    callback: Option<String>,
    config: String,
}

impl From<SpecV1> for Spec {
    fn from(v1: SpecV1) -> Self {
        Self {
            kind: v1.kind,
            method: v1.method,
            url: v1.url,
            headers: v1.headers,
            body: v1.body,
            timeout: v1.timeout,
            retries: v1.retries,
            backoff_factor: v1.backoff_factor,
            callback: v1.callback,
            config: v1.config,
            deadline: None,
            max_backoff_s: None,
            trust: Trust::Client,
            callback_trust: Trust::Client,
            retry: RetryRules::default(),
            source: None,
            rate: None,
        }
    }
}

/// A record begins with this byte, then its layout's version. A row written before
/// records carried a version begins with its job kind (0, 1 or 2), never with this.
const TAG: u8 = 0xFF;

/// The layout written now. Versions 1 to 3 are the untagged layouts of earlier releases
/// ([`SpecV1`], [`SpecV2`], then [`SpecV4`]'s fields); 4 is [`SpecV4`] behind the tag;
/// 5 is [`Spec`] (retry rules, source, rate). A new layout gets the next number, a
/// struct for the old one and a line in [`decode_spec`].
pub(super) const RECORD_VERSION: u8 = 5;

/// Why a stored record cannot be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum RecordError {
    #[error(
        "record layout {0} is newer than this release knows (it reads up to {RECORD_VERSION})"
    )]
    Newer(u8),
    #[error("record layout {version}: {source}")]
    Decode {
        version: u8,
        source: postcard::Error,
    },
}

/// Reads a record of any layout this release knows.
pub(super) fn decode_spec(bytes: &[u8]) -> Result<Spec, RecordError> {
    let decode = |version: u8, bytes: &[u8]| {
        postcard::from_bytes::<Spec>(bytes)
            .map_err(|source| RecordError::Decode { version, source })
    };
    match bytes {
        [TAG, 5, rest @ ..] => decode(5, rest),
        [TAG, 4, rest @ ..] => postcard::from_bytes::<SpecV4>(rest)
            .map(Spec::from)
            .map_err(|source| RecordError::Decode { version: 4, source }),
        [TAG, version, ..] => Err(RecordError::Newer(*version)),
        _ => decode_untagged(bytes),
    }
}

/// A row of a release before versioned records: newest layout first (an older row is
/// too short for a newer layout — postcard has no optional trailing fields — so the
/// first that decodes is the row's own).
fn decode_untagged(bytes: &[u8]) -> Result<Spec, RecordError> {
    match postcard::from_bytes::<SpecV4>(bytes) {
        Ok(spec) => Ok(spec.into()),
        Err(e) => postcard::from_bytes::<SpecV2>(bytes)
            .map(Spec::from)
            .or_else(|_| postcard::from_bytes::<SpecV1>(bytes).map(Spec::from))
            .map_err(|_| RecordError::Decode {
                version: 3,
                source: e,
            }),
    }
}

pub(super) fn state_code(state: State) -> i64 {
    match state {
        State::Pending => 0,
        State::InFlight => 1,
        State::Delivered => 2,
        State::Failed => 3,
    }
}

pub(super) fn state_from(code: i64) -> State {
    match code {
        0 => State::Pending,
        1 => State::InFlight,
        2 => State::Delivered,
        _ => State::Failed,
    }
}

/// [`Spec`] as it is written: borrowed from the job, field for field the same encoding
/// (postcard writes a `&str` as a `String`, an `Option<&T>` as an `Option<T>`), so a
/// job is not copied (its body included) only to be encoded.
#[derive(Serialize)]
struct SpecRef<'a> {
    kind: Kind,
    method: &'a str,
    url: &'a str,
    headers: &'a Headers,
    #[serde(with = "serde_bytes")]
    body: &'a [u8],
    timeout: f64,
    retries: u32,
    backoff_factor: f64,
    callback: Option<&'a str>,
    config: String,
    deadline: Option<Millis>,
    max_backoff_s: Option<f64>,
    trust: Trust,
    callback_trust: Trust,
    retry: &'a RetryRules,
    source: Option<&'a str>,
    rate: Option<Rate>,
}

pub(super) fn encode_spec(job: &Job) -> Result<Vec<u8>, StoreError> {
    let config = serde_json::to_string(&job.config)
        .map_err(|e| StoreError::Unavailable(format!("cannot encode job: {e}")))?;
    let spec = SpecRef {
        kind: job.kind,
        method: &job.request.method,
        url: &job.request.url,
        headers: &job.request.headers,
        body: &job.request.body,
        timeout: job.policy.timeout,
        retries: job.policy.retries,
        backoff_factor: job.policy.backoff_factor,
        callback: job.policy.callback.as_deref(),
        config,
        deadline: job.policy.deadline,
        max_backoff_s: job.policy.max_backoff_s,
        trust: job.trust,
        callback_trust: job.policy.callback_trust,
        retry: &job.policy.retry,
        source: job.policy.source.as_deref(),
        rate: job.policy.rate,
    };
    postcard::to_extend(&spec, vec![TAG, RECORD_VERSION])
        .map_err(|e| StoreError::Unavailable(format!("cannot encode job: {e}")))
}

pub(super) fn corrupt(e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(format!("corrupt job row: {e}").into())
}

pub(super) fn job_from_row(row: &Row<'_>) -> rusqlite::Result<Job> {
    let spec: Vec<u8> = row.get(5)?;
    let spec = decode_spec(&spec).map_err(corrupt)?;
    let attempts: Vec<u8> = row.get(6)?;
    let attempts: Vec<Attempt> = if attempts.is_empty() {
        Vec::new()
    } else {
        postcard::from_bytes(&attempts).map_err(corrupt)?
    };
    let config = match serde_json::from_str(&spec.config).map_err(corrupt)? {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    Ok(Job {
        id: row.get(0)?,
        kind: spec.kind,
        request: Request {
            method: spec.method,
            url: spec.url,
            headers: spec.headers,
            body: spec.body,
        },
        policy: Policy {
            timeout: spec.timeout,
            retries: spec.retries,
            backoff_factor: spec.backoff_factor,
            callback: spec.callback,
            deadline: spec.deadline,
            max_backoff_s: spec.max_backoff_s,
            callback_trust: spec.callback_trust,
            retry: spec.retry,
            source: spec.source,
            rate: spec.rate,
        },
        config,
        state: state_from(row.get(1)?),
        attempts,
        next_attempt_at: row.get::<_, i64>(2)? as Millis,
        created_at: row.get::<_, i64>(3)? as Millis,
        finished_at: row.get::<_, Option<i64>>(4)?.map(|v| v as Millis),
        lane: row.get(7)?,
        trust: spec.trust,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_of_the_first_release_still_decode() {
        // The first release's layout, field for field.
        #[derive(Serialize)]
        struct V1<'a> {
            kind: Kind,
            method: &'a str,
            url: &'a str,
            headers: Headers,
            #[serde(with = "serde_bytes")]
            body: &'a [u8],
            timeout: f64,
            retries: u32,
            backoff_factor: f64,
            callback: Option<&'a str>,
            config: &'a str,
        }
        let bytes = postcard::to_stdvec(&V1 {
            kind: Kind::Target,
            method: "POST",
            url: "http://t/",
            headers: vec![("x-a".into(), b"1".to_vec())],
            body: b"hi",
            timeout: 2.0,
            retries: 3,
            backoff_factor: 0.5,
            callback: Some("http://cb/"),
            config: "{}",
        })
        .unwrap();
        let spec = decode_spec(&bytes).unwrap();
        assert_eq!((spec.url.as_str(), spec.retries), ("http://t/", 3));
        assert_eq!(spec.callback.as_deref(), Some("http://cb/"));
        assert_eq!((spec.deadline, spec.max_backoff_s), (None, None));
        assert_eq!(
            (spec.trust, spec.callback_trust),
            (Trust::Client, Trust::Client)
        );
    }

    #[test]
    fn specs_without_trust_decode_as_client_chosen_and_new_ones_keep_it() {
        #[derive(Serialize)]
        struct V2<'a> {
            kind: Kind,
            method: &'a str,
            url: &'a str,
            headers: Headers,
            #[serde(with = "serde_bytes")]
            body: &'a [u8],
            timeout: f64,
            retries: u32,
            backoff_factor: f64,
            callback: Option<&'a str>,
            config: &'a str,
            deadline: Option<Millis>,
            max_backoff_s: Option<f64>,
        }
        let bytes = postcard::to_stdvec(&V2 {
            kind: Kind::Target,
            method: "POST",
            url: "http://t/",
            headers: vec![],
            body: b"",
            timeout: 2.0,
            retries: 3,
            backoff_factor: 0.5,
            callback: None,
            config: "{}",
            deadline: Some(9),
            max_backoff_s: Some(1.0),
        })
        .unwrap();
        let spec = decode_spec(&bytes).unwrap();
        assert_eq!((spec.deadline, spec.trust), (Some(9), Trust::Client));
        let mut job = crate::job::test_job("j", "GET", "http://t/");
        job.trust = Trust::Operator;
        job.policy.callback_trust = Trust::Client;
        let spec = decode_spec(&encode_spec(&job).unwrap()).unwrap();
        assert_eq!(
            (spec.trust, spec.callback_trust),
            (Trust::Operator, Trust::Client)
        );
    }

    /// A record is written from the job borrowed, and reads back as the owned layout
    /// it stands for, byte for byte, every field set.
    #[test]
    fn a_borrowed_record_is_the_owned_layout_byte_for_byte() {
        let mut job = crate::job::test_job("j", "PUT", "http://t/p?q=1");
        job.request.headers = vec![("x-a".into(), vec![1, 2, 0xff])];
        job.request.body = vec![0, 1, 2, 3];
        job.config
            .insert("retry".into(), serde_json::json!({"count": 2}));
        job.policy.callback = Some("http://cb/".into());
        job.policy.deadline = Some(12);
        job.policy.max_backoff_s = Some(3.5);
        job.policy.source = Some("rule-a".into());
        job.policy.rate = Some(Rate {
            per_s: 2.5,
            burst: 4,
        });
        job.policy.retry.schedule_s = vec![1.0, 2.0];
        job.trust = Trust::Operator;
        let record = encode_spec(&job).unwrap();
        let spec = decode_spec(&record).unwrap();
        assert_eq!(spec.body, job.request.body);
        assert_eq!(spec.source.as_deref(), Some("rule-a"));
        let owned = postcard::to_extend(&spec, vec![TAG, RECORD_VERSION]).unwrap();
        assert_eq!(owned, record);
    }

    #[test]
    fn records_carry_their_version_and_untagged_rows_of_earlier_releases_still_read() {
        let mut job = crate::job::test_job("j", "POST", "http://t/p");
        job.request.body = b"body".to_vec();
        job.policy.retries = 7;
        let record = encode_spec(&job).unwrap();
        assert_eq!(&record[..2], &[TAG, RECORD_VERSION]);
        let spec = decode_spec(&record).unwrap();
        assert_eq!((spec.url.as_str(), spec.retries), ("http://t/p", 7));
        assert_eq!(spec.body, b"body");
        // Layout 4 (before retry rules), and the same fields untagged (layout 3).
        let v4 = SpecV4 {
            kind: spec.kind,
            method: spec.method,
            url: spec.url,
            headers: spec.headers,
            body: spec.body,
            timeout: spec.timeout,
            retries: spec.retries,
            backoff_factor: spec.backoff_factor,
            callback: spec.callback,
            config: spec.config,
            deadline: spec.deadline,
            max_backoff_s: spec.max_backoff_s,
            trust: spec.trust,
            callback_trust: spec.callback_trust,
        };
        let untagged = postcard::to_stdvec(&v4).unwrap();
        let tagged = postcard::to_extend(&v4, vec![TAG, 4]).unwrap();
        assert!(untagged[0] <= 2, "an untagged row begins with its kind");
        for old in [untagged, tagged] {
            let spec = decode_spec(&old).unwrap();
            assert_eq!((spec.url.as_str(), spec.retries), ("http://t/p", 7));
            assert_eq!(spec.retry, RetryRules::default(), "410 ends it, as now");
            assert_eq!((spec.source, spec.rate), (None, None));
        }
        // What layout 5 adds survives the round trip.
        job.policy.source = Some("rule:orders".into());
        job.policy.rate = Some(Rate {
            per_s: 2.0,
            burst: 4,
        });
        job.policy.retry.schedule_s = vec![5.0, 300.0];
        let spec = decode_spec(&encode_spec(&job).unwrap()).unwrap();
        assert_eq!(spec.source.as_deref(), Some("rule:orders"));
        assert_eq!(spec.rate, job.policy.rate);
        assert_eq!(spec.retry.schedule_s, [5.0, 300.0]);
    }

    #[test]
    fn a_record_of_a_newer_layout_is_refused_by_name_not_misread() {
        let mut record = encode_spec(&crate::job::test_job("j", "GET", "http://t/")).unwrap();
        record[1] = RECORD_VERSION + 1;
        let e = decode_spec(&record).err().unwrap();
        assert!(matches!(e, RecordError::Newer(v) if v == RECORD_VERSION + 1));
        assert!(e.to_string().contains("newer than this release"), "{e}");
        let e = decode_spec(&[TAG, RECORD_VERSION, 0xff]).err().unwrap();
        assert!(matches!(e, RecordError::Decode { version: 5, .. }), "{e}");
    }
}
