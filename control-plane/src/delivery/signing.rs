//! Signed deliveries, as [Standard Webhooks](https://www.standardwebhooks.com/) defines
//! them: `webhook-id` (the job id, the same on every attempt), `webhook-timestamp` (this
//! attempt, Unix seconds) and `webhook-signature`, one `v1,<base64 HMAC-SHA256>` per
//! symmetric secret (`whsec_…`) and one `v1a,<base64 Ed25519>` per signing key
//! (`whsk_…`), over `<id>.<timestamp>.<body>`. Several secrets sign at once, so a
//! receiver can move from one to the next without a gap.
//!
//! Which secrets sign a request, first match wins: those of the job's source (the rule,
//! group or notifier it came from), those of its target host, the default — the default
//! only for destinations the operator wrote (a client choosing where a request goes must
//! not obtain signatures a receiver trusts for someone else's messages). Signing happens
//! at send time: stored jobs hold no secret, only the name of their source.

use std::collections::HashMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};

use crate::job::{Job, Trust};
use crate::validate::Invalid;

/// The three headers of a signed request.
pub const ID: &str = "webhook-id";
pub const TIMESTAMP: &str = "webhook-timestamp";
pub const SIGNATURE: &str = "webhook-signature";

/// A key that signs: a shared secret or an Ed25519 signing key. Its `Debug` never shows
/// the key.
pub enum Key {
    Hmac(ring::hmac::Key),
    Ed25519(Box<Ed25519KeyPair>),
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Hmac(_) => f.write_str("Key::Hmac(<secret>)"),
            Key::Ed25519(_) => f.write_str("Key::Ed25519(<secret>)"),
        }
    }
}

impl Key {
    /// Reads `whsec_<base64>` (a shared secret) or `whsk_<base64>` (an Ed25519 seed of
    /// 32 bytes, or seed and public key, 64). `field` names where it came from; the
    /// error never quotes the key.
    pub fn parse(text: &str, field: &str) -> Result<Self, Invalid> {
        let text = text.trim();
        let decode = |b64: &str| {
            STANDARD.decode(b64).map_err(|_| {
                Invalid(format!(
                    "{field}: the part after the prefix is not base64 (the key is not shown)"
                ))
            })
        };
        if let Some(b64) = text.strip_prefix("whsec_") {
            let bytes = decode(b64)?;
            if !(16..=64).contains(&bytes.len()) {
                return Err(Invalid(format!(
                    "{field}: a whsec_ secret must hold 16 to 64 bytes, this one holds {}",
                    bytes.len()
                )));
            }
            return Ok(Key::Hmac(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                &bytes,
            )));
        }
        if let Some(b64) = text.strip_prefix("whsk_") {
            let bytes = decode(b64)?;
            let seed = match bytes.len() {
                32 | 64 => &bytes[..32],
                n => {
                    return Err(Invalid(format!(
                        "{field}: a whsk_ key must hold 32 or 64 bytes, this one holds {n}"
                    )))
                }
            };
            let pair = Ed25519KeyPair::from_seed_unchecked(seed)
                .map_err(|_| Invalid(format!("{field}: not an Ed25519 key")))?;
            return Ok(Key::Ed25519(Box::new(pair)));
        }
        Err(Invalid(format!(
            "{field}: a signing secret begins with `whsec_` (HMAC-SHA256) or `whsk_` (Ed25519)"
        )))
    }

    /// The receiver's half, for `v1a` keys (`whpk_<base64>`).
    pub fn public_key(&self) -> Option<String> {
        match self {
            Key::Ed25519(pair) => Some(format!("whpk_{}", STANDARD.encode(pair.public_key()))),
            Key::Hmac(_) => None,
        }
    }

    /// One `webhook-signature` entry over `content`.
    fn sign(&self, content: &[u8]) -> String {
        match self {
            Key::Hmac(key) => format!(
                "v1,{}",
                STANDARD.encode(ring::hmac::sign(key, content).as_ref())
            ),
            Key::Ed25519(pair) => format!("v1a,{}", STANDARD.encode(pair.sign(content).as_ref())),
        }
    }
}

/// What is signed: `<id>.<timestamp>.<body>`.
fn content(id: &str, timestamp: u64, body: &[u8]) -> Vec<u8> {
    let mut c = Vec::with_capacity(id.len() + 22 + body.len());
    c.extend_from_slice(id.as_bytes());
    c.push(b'.');
    c.extend_from_slice(timestamp.to_string().as_bytes());
    c.push(b'.');
    c.extend_from_slice(body);
    c
}

/// The `webhook-signature` value: one entry per key, space-separated.
pub fn signature(keys: &[Key], id: &str, timestamp: u64, body: &[u8]) -> String {
    let content = content(id, timestamp, body);
    keys.iter()
        .map(|k| k.sign(&content))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The configured secrets, by where they apply.
#[derive(Debug, Default)]
pub struct Signing {
    /// Operator-chosen destinations without secrets of their own.
    pub default: Vec<Key>,
    /// By job source: `rule:<name>`, `group:<name>`, `notifier:<name>`.
    pub sources: HashMap<String, Vec<Key>>,
    /// By target, `host:port` (lower-case, the port always written).
    pub hosts: HashMap<String, Vec<Key>>,
}

impl Signing {
    pub fn is_empty(&self) -> bool {
        self.default.is_empty() && self.sources.is_empty() && self.hosts.is_empty()
    }

    /// The keys that sign this attempt of `job`, if any.
    pub fn keys_for(&self, job: &Job) -> &[Key] {
        // A callback's URL is trusted as its job's callback was chosen.
        let trust = match job.kind {
            crate::job::Kind::Callback => job.policy.callback_trust,
            _ => job.trust,
        };
        self.keys(job.policy.source.as_deref(), &job.request.url, trust)
    }

    /// The keys that sign a request from `source` (`group:caches`, …) to `url`, chosen
    /// by `trust`: the source's, then the target's, then the default for the operator's
    /// destinations only.
    pub fn keys(&self, source: Option<&str>, url: &str, trust: Trust) -> &[Key] {
        if let Some(keys) = source.and_then(|s| self.sources.get(s)) {
            return keys;
        }
        if !self.hosts.is_empty() {
            if let Some(keys) = self.hosts.get(&target_key(url)) {
                return keys;
            }
        }
        if trust == Trust::Operator {
            &self.default
        } else {
            &[]
        }
    }

    /// The headers that sign this attempt of `job` at `timestamp` (Unix seconds), or
    /// none when no secret applies.
    pub fn headers(&self, job: &Job, timestamp: u64) -> Option<[(&'static str, String); 3]> {
        sign(self.keys_for(job), &job.id, timestamp, &job.request.body)
    }
}

/// The three Standard Webhooks headers for message `id` at `timestamp`, or none
/// without keys.
pub fn sign(
    keys: &[Key],
    id: &str,
    timestamp: u64,
    body: &[u8],
) -> Option<[(&'static str, String); 3]> {
    if keys.is_empty() {
        return None;
    }
    Some([
        (ID, id.to_owned()),
        (TIMESTAMP, timestamp.to_string()),
        (SIGNATURE, signature(keys, id, timestamp, body)),
    ])
}

/// A target as signing secrets and target settings name it: `host:port`, lower-case,
/// the scheme's port written out (`https://API.example/x` → `api.example:443`).
pub fn target_key(url: &str) -> String {
    let authority = crate::job::authority(url).to_ascii_lowercase();
    let has_port = match authority.rsplit_once(':') {
        Some((host, port)) => {
            !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':')
        }
        None => false,
    } && !authority.ends_with(']');
    if has_port {
        return authority;
    }
    let port = if url
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
    {
        443
    } else {
        80
    };
    format!("{authority}:{port}")
}

/// Why a saved request does not verify.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VerifyError {
    #[error("the `{0}` header is missing")]
    Missing(&'static str),
    #[error("`webhook-timestamp` is not a number of seconds")]
    BadTimestamp,
    #[error("the timestamp is {0} s away from now, beyond the tolerance of {1} s (a replay?)")]
    Stale(u64, u64),
    #[error("no signature in `webhook-signature` matches the secret")]
    NoMatch,
}

/// What a receiver knows: a shared secret or an Ed25519 public key.
pub enum VerifyKey {
    Hmac(ring::hmac::Key),
    Ed25519(Vec<u8>),
}

impl VerifyKey {
    /// `whsec_…` (shared) or `whpk_…` (public).
    pub fn parse(text: &str, field: &str) -> Result<Self, Invalid> {
        if let Some(b64) = text.trim().strip_prefix("whpk_") {
            let bytes = STANDARD
                .decode(b64)
                .map_err(|_| Invalid(format!("{field}: the part after whpk_ is not base64")))?;
            if bytes.len() != 32 {
                return Err(Invalid(format!(
                    "{field}: a whpk_ key holds 32 bytes, this one holds {}",
                    bytes.len()
                )));
            }
            return Ok(VerifyKey::Ed25519(bytes));
        }
        match Key::parse(text, field)? {
            Key::Hmac(k) => Ok(VerifyKey::Hmac(k)),
            Key::Ed25519(pair) => Ok(VerifyKey::Ed25519(pair.public_key().as_ref().to_vec())),
        }
    }
}

/// Checks a received request the way a receiver should: the timestamp within
/// `tolerance_s` of `now_s`, then any `v1`/`v1a` entry of the signature header against
/// the key. Returns the index of the entry that matched.
pub fn verify(
    key: &VerifyKey,
    id: Option<&str>,
    timestamp: Option<&str>,
    signatures: Option<&str>,
    body: &[u8],
    now_s: u64,
    tolerance_s: u64,
) -> Result<usize, VerifyError> {
    let id = id.ok_or(VerifyError::Missing(ID))?;
    let ts_text = timestamp.ok_or(VerifyError::Missing(TIMESTAMP))?;
    let signatures = signatures.ok_or(VerifyError::Missing(SIGNATURE))?;
    let ts: u64 = ts_text
        .trim()
        .parse()
        .map_err(|_| VerifyError::BadTimestamp)?;
    let skew = now_s.abs_diff(ts);
    if skew > tolerance_s {
        return Err(VerifyError::Stale(skew, tolerance_s));
    }
    let content = content(id, ts, body);
    for (i, entry) in signatures.split_whitespace().enumerate() {
        let Some((version, b64)) = entry.split_once(',') else {
            continue;
        };
        let Ok(sig) = STANDARD.decode(b64) else {
            continue;
        };
        let ok = match (version, key) {
            ("v1", VerifyKey::Hmac(k)) => ring::hmac::verify(k, &content, &sig).is_ok(),
            ("v1a", VerifyKey::Ed25519(public)) => UnparsedPublicKey::new(&ED25519, public)
                .verify(&content, &sig)
                .is_ok(),
            _ => false,
        };
        if ok {
            return Ok(i);
        }
    }
    Err(VerifyError::NoMatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{test_job, Kind};

    /// The example of the Standard Webhooks specification.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: u64 = 1_614_265_330;
    const SPEC_BODY: &str = r#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn key(text: &str) -> Key {
        Key::parse(text, "signing.default[0]").unwrap()
    }

    #[test]
    fn the_specifications_example_signs_and_verifies() {
        let k = key(SPEC_SECRET);
        let sig = signature(&[k], SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY.as_bytes());
        assert_eq!(sig, SPEC_SIGNATURE);
        let receiver = VerifyKey::parse(SPEC_SECRET, "s").unwrap();
        let check = |sig: &str, body: &str, now: u64| {
            verify(
                &receiver,
                Some(SPEC_ID),
                Some(&SPEC_TIMESTAMP.to_string()),
                Some(sig),
                body.as_bytes(),
                now,
                300,
            )
        };
        assert_eq!(check(SPEC_SIGNATURE, SPEC_BODY, SPEC_TIMESTAMP + 10), Ok(0));
        assert_eq!(
            check(SPEC_SIGNATURE, r#"{"test": 2432232315}"#, SPEC_TIMESTAMP),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            check(SPEC_SIGNATURE, SPEC_BODY, SPEC_TIMESTAMP + 301),
            Err(VerifyError::Stale(301, 300))
        );
        assert_eq!(
            check("v1,Zm9v", SPEC_BODY, SPEC_TIMESTAMP),
            Err(VerifyError::NoMatch)
        );
    }

    #[test]
    fn every_key_signs_so_secrets_rotate_without_a_gap() {
        let old = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let new = "whsec_c2Vjb25kIHNlY3JldCBvZiAzMiBieXRlcyEhIQ==";
        let sig = signature(&[key(old), key(new)], "m", 5, b"x");
        assert_eq!(sig.split(' ').count(), 2);
        for (secret, index) in [(old, 0), (new, 1)] {
            let receiver = VerifyKey::parse(secret, "s").unwrap();
            let got = verify(&receiver, Some("m"), Some("5"), Some(&sig), b"x", 5, 300);
            assert_eq!(got, Ok(index));
        }
    }

    #[test]
    fn ed25519_keys_sign_v1a_and_their_public_half_verifies() {
        let seed = STANDARD.encode([7u8; 32]);
        let k = key(&format!("whsk_{seed}"));
        let public = k.public_key().unwrap();
        let sig = signature(&[k], "m", 9, b"body");
        assert!(sig.starts_with("v1a,"), "{sig}");
        let receiver = VerifyKey::parse(&public, "p").unwrap();
        assert_eq!(
            verify(&receiver, Some("m"), Some("9"), Some(&sig), b"body", 9, 1),
            Ok(0)
        );
        assert_eq!(
            verify(&receiver, Some("m"), Some("9"), Some(&sig), b"bodx", 9, 1),
            Err(VerifyError::NoMatch)
        );
    }

    #[test]
    fn bad_keys_are_named_and_never_quoted() {
        for (text, says) in [
            ("secret", "begins with `whsec_`"),
            ("whsec_!!!", "not base64"),
            ("whsec_c2hvcnQ=", "16 to 64 bytes"),
            ("whsk_c2hvcnQ=", "32 or 64 bytes"),
        ] {
            let e = Key::parse(text, "signing.rules.orders[1]").unwrap_err().0;
            assert!(
                e.contains("signing.rules.orders[1]") && e.contains(says),
                "{e}"
            );
            assert!(!e.contains("c2hvcnQ") && !e.contains("!!!"), "{e}");
        }
        assert_eq!(format!("{:?}", key(SPEC_SECRET)), "Key::Hmac(<secret>)");
    }

    #[test]
    fn source_then_host_then_the_default_for_the_operators_destinations() {
        let mut signing = Signing {
            default: vec![key(SPEC_SECRET)],
            ..Signing::default()
        };
        signing.sources.insert(
            "rule:orders".into(),
            vec![key("whsec_c2Vjb25kIHNlY3JldCBvZiAzMiBieXRlcyEhIQ==")],
        );
        signing.hosts.insert(
            "api.example:443".into(),
            vec![key(SPEC_SECRET), key(SPEC_SECRET)],
        );
        let mut job = test_job("j", "POST", "http://t/");
        job.policy.source = Some("rule:orders".into());
        assert_eq!(signing.keys_for(&job).len(), 1);
        job.policy.source = Some("rule:other".into());
        job.request.url = "https://API.example/x".into();
        assert_eq!(signing.keys_for(&job).len(), 2, "by host");
        job.request.url = "http://t/".into();
        assert_eq!(signing.keys_for(&job).len(), 1, "the default");
        job.trust = Trust::Client;
        assert!(
            signing.keys_for(&job).is_empty(),
            "not for a client's choice"
        );
        assert!(signing.headers(&job, 1).is_none());
        job.trust = Trust::Operator;
        let headers = signing.headers(&job, 1_614_265_330).unwrap();
        assert_eq!(headers[0], (ID, "j".to_owned()));
        assert_eq!(headers[1], (TIMESTAMP, "1614265330".to_owned()));
        job.kind = Kind::Callback;
        job.policy.callback_trust = Trust::Client;
        assert!(signing.keys_for(&job).is_empty());
    }

    #[test]
    fn target_keys_write_the_port() {
        assert_eq!(target_key("https://API.example/x"), "api.example:443");
        assert_eq!(target_key("http://a:8080/"), "a:8080");
        assert_eq!(target_key("http://a"), "a:80");
        assert_eq!(target_key("http://[::1]/"), "[::1]:80");
        assert_eq!(target_key("http://[::1]:9/"), "[::1]:9");
    }
}
