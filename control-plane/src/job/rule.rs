//! Jobs for requests a filter rule took over (`capture`, `fallback`): the request goes to
//! the rule's target with the rule's delivery policy, carried in the submission — the
//! rules themselves live in the filter's plugin configuration.

use serde_json::{json, Map};

use super::spec::{is_http_base_url, knocker_id, split_headers, Errors};

pub use super::submission::{RuleMode, RuleSubmission, Submission};
use super::{Job, Kind, Request, Trust};
use crate::clock::Millis;

/// Builds the job, or every reason it cannot (fields named `rule.<field>`, or the
/// `knocker-id` header).
pub fn build_rule_job(
    rule: &RuleSubmission,
    submission: &Submission,
    now: Millis,
    new_id: impl FnOnce() -> String,
) -> Result<Job, Errors> {
    let mut errors = Errors::default();
    let target = rule.target.trim_end_matches('/');
    if !is_http_base_url(target) {
        errors.add(
            "rule.target",
            format!(
                "Not an http:// or https:// URL with a host: '{}'.",
                rule.target
            ),
        );
    }
    if let Some(callback) = &rule.callback {
        if !is_http_base_url(callback) {
            errors.add("rule.callback", super::spec::BAD_URL);
        }
    }
    if let Err(e) = rule.delivery.validate(|f| format!("rule.{f}")) {
        errors.add("rule", e.0);
    }
    let (raw, forwarded) = split_headers(&submission.headers);
    let id = knocker_id(&raw, &mut errors);
    if !errors.0.is_empty() {
        return Err(errors);
    }
    let id = id.unwrap_or_else(new_id);
    let mut config = Map::new();
    config.insert("rule".into(), json!(rule.name));
    config.insert("mode".into(), json!(rule.mode.name()));
    config.insert("id".into(), json!(id));
    config.insert("target".into(), json!(target));
    rule.delivery.describe(&mut config);
    config.insert("callback".into(), json!(rule.callback));
    config.insert("ordered".into(), json!(rule.ordered));
    if rule.mode == RuleMode::Fallback {
        config.insert(
            "upstream_status".into(),
            json!((rule.upstream_status > 0).then_some(rule.upstream_status)),
        );
    }
    let request = Request {
        method: submission.method.clone(),
        url: format!("{target}{}", submission.absolute_path()),
        headers: forwarded,
        body: submission.body.clone(),
    };
    // The rule, its target and callback come from the operator's plugin config (the
    // gRPC door only takes rule submissions from an authenticated filter).
    let policy = rule.delivery.policy(
        format!("rule:{}", rule.name),
        rule.callback.clone(),
        Trust::Operator,
        now,
    );
    Ok(
        Job::new_pending(id, Kind::Target, request, policy, Trust::Operator, now)
            .with_config(config)
            .in_lane(rule.ordered.then(|| target.to_owned())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::policy::DeliveryPolicy;

    pub(crate) fn capture(target: &str) -> RuleSubmission {
        RuleSubmission {
            name: "orders".into(),
            mode: RuleMode::Capture,
            target: target.into(),
            delivery: DeliveryPolicy {
                max_age_s: 60,
                retries: None,
                backoff_factor: 0.5,
                max_backoff_s: 5.0,
                timeout_s: 2.0,
                ..DeliveryPolicy::default()
            },
            callback: None,
            ordered: true,
            upstream_status: 0,
        }
    }

    fn submission(headers: &[(&str, &str)]) -> Submission {
        Submission {
            method: "POST".into(),
            path: "/orders/1?x=%20".into(),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
                .collect(),
            body: vec![0, 159, 146, 150],
            remote: None,
            authority: None,
            rule: None,
            broadcast_rule: None,
        }
    }

    #[test]
    fn builds_a_job_for_the_target_with_the_rule_policy() {
        let job = build_rule_job(
            &capture("http://t.example:81/base/"),
            &submission(&[("Host", "orders.example"), ("X-A", "1")]),
            1_000,
            || "new".into(),
        )
        .unwrap();
        assert_eq!(job.id, "new");
        assert_eq!(job.request.url, "http://t.example:81/base/orders/1?x=%20");
        assert_eq!(job.request.body, vec![0, 159, 146, 150]);
        assert_eq!(job.request.headers, vec![("x-a".to_owned(), b"1".to_vec())]);
        assert_eq!(job.policy.retries, u32::MAX);
        assert_eq!(job.policy.deadline, Some(61_000));
        assert_eq!(job.policy.max_backoff_s, Some(5.0));
        assert_eq!(job.lane.as_deref(), Some("http://t.example:81/base"));
        assert_eq!(job.config["rule"], "orders");
        assert_eq!(job.config["mode"], "capture");
        assert_eq!(job.config["max_age"], 60);
        assert!(job.config.get("upstream_status").is_none());
    }

    #[test]
    fn fallback_records_the_upstream_status_and_honours_knocker_id() {
        let mut rule = capture("http://t");
        rule.mode = RuleMode::Fallback;
        rule.ordered = false;
        rule.delivery.retries = Some(3);
        rule.delivery.max_age_s = 0;
        rule.upstream_status = 503;
        let job = build_rule_job(&rule, &submission(&[("knocker-id", "mine")]), 0, || {
            "unused".into()
        })
        .unwrap();
        assert_eq!(job.id, "mine");
        assert_eq!(job.policy.retries, 3);
        assert_eq!(job.policy.deadline, None);
        assert_eq!(job.lane, None);
        assert_eq!(job.config["upstream_status"], 503);
        assert_eq!(job.config["max_age"], serde_json::Value::Null);
    }

    #[test]
    fn errors_name_the_field() {
        let mut rule = capture("ftp://t");
        rule.delivery.max_age_s = 0;
        rule.callback = Some("nope".into());
        let errors = build_rule_job(&rule, &submission(&[("knocker-id", "")]), 0, || "x".into())
            .unwrap_err();
        let fields: Vec<&str> = errors.0.keys().map(String::as_str).collect();
        assert_eq!(
            fields,
            ["knocker-id", "rule", "rule.callback", "rule.target"]
        );
        assert!(errors.0["rule"][0].contains("rule.retries"), "{errors:?}");
    }
}
