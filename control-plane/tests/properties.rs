//! Every input that enters from outside, as anyone might send it: Knocker headers, the
//! TOML file, protobuf from the gRPC door. None panics the control plane, and every
//! refusal names its field.

use std::sync::Arc;

use knocker::broadcast::groups::Groups;
use knocker::clock::Time;
use knocker::config::file::FileConfig;
use knocker::job::spec::{build_job, Defaults, Submission};
use knocker::store::memory::MemoryStore;
use knocker::submit::Submitter;
use proptest::prelude::*;
use prost::Message as _;

fn ingress() -> Submitter {
    Submitter {
        defaults: Defaults::default(),
        status_url: "/knocker/status".into(),
        store: Arc::new(MemoryStore::default()),
        time: Time::system(),
        wake: Arc::default(),
        groups: Arc::new(Groups::new(Default::default(), None).unwrap()),
        agents: None,
        claims: Arc::default(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn header() -> impl Strategy<Value = (String, Vec<u8>)> {
    (
        prop_oneof![
            proptest::sample::select(knocker::job::spec::KNOWN).prop_map(str::to_owned),
            "[a-zA-Z-]{1,12}",
            ".{0,8}",
        ],
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..24),
            "[0-9.eE+-]{0,24}".prop_map(String::into_bytes),
            Just(b"1e300".to_vec()),
            Just(b"NaN".to_vec()),
            Just(b"http://[::1]:0/".to_vec()),
        ],
    )
}

fn submission(headers: Vec<(String, Vec<u8>)>, path: String, method: String) -> Submission {
    Submission {
        method,
        path,
        headers,
        body: b"b".to_vec(),
        remote: None,
        authority: None,
        rule: None,
        broadcast_rule: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn knocker_headers_build_a_bounded_job_or_errors_named_by_header(
        headers in proptest::collection::vec(header(), 0..8),
    ) {
        let settings = Defaults::default();
        let s = submission(headers, "/p?q".into(), "POST".into());
        match build_job(&settings, s, 1000, || "id".into()) {
            Ok(job) => {
                prop_assert!(job.policy.timeout.is_finite() && job.policy.timeout <= settings.timeout_max);
                prop_assert!(job.policy.backoff_factor <= settings.backoff_factor_max);
            }
            Err(errors) => {
                let json = errors.to_json();
                for field in json["errors"].as_object().unwrap().keys() {
                    prop_assert!(field.starts_with("knocker-"), "{}", field);
                }
            }
        }
    }

    #[test]
    fn any_submission_gets_an_answer_not_a_panic(
        headers in proptest::collection::vec(header(), 0..8),
        path in ".{0,16}",
        method in "[A-Z]{0,6}|.{0,4}",
    ) {
        let reply = runtime().block_on(ingress().submit(submission(headers, path, method)));
        prop_assert!([200, 400, 406, 503].contains(&reply.status), "{}", reply.status);
        if reply.status == 400 {
            let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
            prop_assert!(body["errors"].as_object().is_some_and(|e| !e.is_empty()));
        }
    }

    #[test]
    fn any_toml_text_parses_or_is_refused(text in ".{0,200}") {
        let _ = FileConfig::parse(&text);
    }

    #[test]
    fn numbers_in_the_toml_file_are_range_checked_by_name(
        timeout in any::<f64>(), max_age in any::<u64>(), interval in any::<f64>(),
        backoff in any::<f64>(),
    ) {
        let num = |f: f64| if f.is_finite() { format!("{f:e}") } else { "1e308".into() };
        let group = format!(
            "[groups.g]\nmembers = [\"http://a\"]\ntimeout_s = {}\nmax_age_s = {}\nbackoff_factor = {}\n",
            num(timeout), max_age.min(i64::MAX as u64), num(backoff)
        );
        if let Err(e) = FileConfig::parse(&group) {
            prop_assert!(e.0.contains("groups.g"), "{}", e);
        }
        let monitor = format!("[monitors.m]\nurl = \"http://a/\"\ninterval_s = {}\ntimeout_s = {}\n", num(interval), num(timeout));
        if let Err(e) = FileConfig::parse(&monitor) {
            prop_assert!(e.0.contains("monitors.m") || e.0.contains("interval_s") || e.0.contains("timeout_s"), "{}", e);
        }
    }

    #[test]
    fn any_protobuf_from_the_grpc_door_gets_an_answer_not_a_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        if let Ok(request) = knocker_proto::v1::SubmitRequest::decode(bytes.as_slice()) {
            let reply = runtime().block_on(knocker::ingress::grpc::handle(&ingress(), 1024 * 1024, request));
            prop_assert!((200..600).contains(&reply.status));
        }
    }

    #[test]
    fn rule_policies_from_the_grpc_door_are_range_checked_by_name(
        timeout_s in any::<f64>(), max_age_s in any::<u64>(), backoff in any::<f64>(),
        max_backoff in any::<f64>(),
    ) {
        let request = knocker_proto::v1::SubmitRequest {
            method: "POST".into(),
            path: "/".into(),
            mode: knocker_proto::v1::Mode::Capture as i32,
            rule: "r".into(),
            policy: Some(knocker_proto::v1::RulePolicy {
                target: "http://t".into(),
                max_age_s,
                timeout_s,
                backoff_factor: backoff,
                max_backoff_s: max_backoff,
                ..Default::default()
            }),
            ..Default::default()
        };
        let reply = runtime().block_on(knocker::ingress::grpc::handle(&ingress(), 1024 * 1024, request));
        if reply.status == 400 {
            let body = String::from_utf8_lossy(&reply.body).into_owned();
            prop_assert!(
                ["timeout_s", "max_age_s", "backoff_factor", "max_backoff_s", "retries"].iter().any(|f| body.contains(f)),
                "{}", body
            );
        } else {
            prop_assert_eq!(reply.status, 202);
        }
    }
}
