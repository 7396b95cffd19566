//! Broadcast: one request to every member of a group, none missed.
//!
//! A request selects a group with `Knocker-Broadcast: <group>` (or through a filter rule
//! in `broadcast` mode). Membership is read at fan-out time ([`groups`]); each member gets
//! its own job, committed together with the others before the receipt is given:
//!
//! - job ids `<broadcast id>.<member index>`; the receipt lists members and ids, and
//!   `GET /knocker/broadcasts/{id}` shows each member's state;
//! - each member's jobs form an ordered lane of their own: a slow or dead member never
//!   delays the others, and one that comes back within the group's maximum age gets
//!   everything it missed, in order;
//! - every copy carries `x-knocker-broadcast: <group>`; a request carrying it is never
//!   broadcast again, by this instance or any other (loop guard).
//!
//! With the NATS engine a group can be made of agents instead ([`agents`]): one message
//! per broadcast, replayed by every subscribed agent to its own endpoint.

pub mod agents;
pub mod groups;

use serde_json::{json, Map, Value};

use crate::clock::Millis;
use crate::job::receipt::header_list;
use crate::job::spec::{split_headers, Submission};
use crate::job::{Headers, Job, Kind, Request, Trust};
use groups::GroupConfig;

/// The header every broadcast copy carries: the loop guard's marker.
pub const MARKER: &str = "x-knocker-broadcast";

/// The id of member `index`'s job in broadcast `id`.
pub fn member_job_id(id: &str, index: usize) -> String {
    format!("{id}.{index}")
}

/// Where a broadcast's member jobs are found: every id with this prefix.
pub fn member_prefix(id: &str) -> String {
    format!("{id}.")
}

/// Whether a request is itself a broadcast copy.
pub fn is_broadcast_copy(submission: &Submission) -> bool {
    submission
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case(MARKER))
}

/// What is fanned out: the group, its members now, and the broadcast's own settings.
pub struct Fanout<'a> {
    pub id: &'a str,
    pub group_name: &'a str,
    pub group: &'a GroupConfig,
    pub members: &'a [String],
    /// `Knocker-Callback`: a failure report for each member that is given up on.
    pub callback: Option<String>,
    /// `broadcast` when a filter rule selected the group: the rule's name.
    pub rule: Option<&'a str>,
}

/// The headers every copy of a broadcast carries: the loop guard's marker, the client's
/// `Host` when the group preserves it, then the forwarded ones.
pub fn copy_headers(group_name: &str, group: &GroupConfig, submission: &Submission) -> Headers {
    let (_, forwarded) = split_headers(&submission.headers);
    let mut headers = vec![(MARKER.to_owned(), group_name.as_bytes().to_vec())];
    if group.preserve_host {
        if let Some(authority) = &submission.authority {
            headers.push(("host".to_owned(), authority.as_bytes().to_vec()));
        }
    }
    headers.extend(forwarded);
    headers
}

/// One job per member, in member order.
pub fn member_jobs(fanout: &Fanout<'_>, submission: &Submission, now: Millis) -> Vec<Job> {
    let path = submission.absolute_path();
    let g = fanout.group;
    let delivery = &g.delivery;
    let headers = copy_headers(fanout.group_name, g, submission);
    fanout
        .members
        .iter()
        .enumerate()
        .map(|(index, member)| {
            let mut config = Map::new();
            config.insert(
                "broadcast".into(),
                json!({
                    "id": fanout.id,
                    "group": fanout.group_name,
                    "member": member,
                    "index": index,
                    "members": fanout.members.len(),
                }),
            );
            if let Some(rule) = fanout.rule {
                config.insert("rule".into(), json!(rule));
            }
            config.insert("id".into(), json!(member_job_id(fanout.id, index)));
            config.insert("callback".into(), json!(fanout.callback));
            delivery.describe(&mut config);
            let request = Request {
                method: submission.method.clone(),
                url: format!("{member}{path}"),
                headers: headers.clone(),
                body: submission.body.clone(),
            };
            // Members are the operator's; the callback is the client's.
            let policy = delivery.policy(
                format!("group:{}", fanout.group_name),
                fanout.callback.clone(),
                Trust::Client,
                now,
            );
            let id = member_job_id(fanout.id, index);
            Job::new_pending(id, Kind::Target, request, policy, Trust::Operator, now)
                .with_config(config)
                // Per group and member: a member's copies go out one at a time, in order.
                .in_lane(Some(format!("broadcast:{}:{member}", fanout.group_name)))
        })
        .collect()
}

/// The receipt: the broadcast id, the group (as stored, for a resubmission), and each
/// member with its job id.
pub fn receipt(id: &str, group: &str, jobs: &[Job]) -> Value {
    let first = jobs.first();
    let group = first
        .and_then(|j| j.config.get("broadcast"))
        .and_then(|b| b.get("group"))
        .and_then(Value::as_str)
        .unwrap_or(group);
    let members: Vec<Value> = jobs.iter().map(member).collect();
    let headers = first.map_or_else(Vec::new, |job| header_list(&job.request.headers));
    json!({
        "status": true,
        "broadcast": { "id": id, "group": group },
        "members": members,
        "method": first.map(|j| j.request.method.clone()),
        "headers": headers,
        "body-length": first.map_or(0, |j| j.request.body.len()),
    })
}

/// One member of a broadcast's receipt: the member (redacted), its job id and URL.
pub fn member(job: &Job) -> Value {
    json!({
        "member": job.config.get("broadcast").and_then(|b| b.get("member")).map(crate::redact::json),
        "id": job.id,
        "url": crate::redact::url(&job.request.url),
    })
}

/// The receipt of a broadcast to agents: the agents subscribed when it was sent.
pub fn agents_receipt(id: &str, broadcast: &agents::Broadcast, sent: &agents::Sent) -> Value {
    json!({
        "status": true,
        "broadcast": { "id": id, "group": sent.group, "agents": true },
        "members": sent.agents.iter().map(|a| json!({ "member": format!("agent:{a}") })).collect::<Vec<_>>(),
        "method": broadcast.method,
        "path": broadcast.path,
        "body-length": broadcast.body.len(),
    })
}

/// A broadcast's members and their jobs' state, as the API shows it.
pub fn status(id: &str, jobs: &[Job]) -> Value {
    let group = jobs
        .first()
        .and_then(|j| j.config.get("broadcast"))
        .and_then(|b| b.get("group"))
        .cloned()
        .unwrap_or(Value::Null);
    let members: Vec<Value> = jobs
        .iter()
        .map(|job| {
            let last = job.attempts.last();
            json!({
                "member": job.config.get("broadcast").and_then(|b| b.get("member")).map(crate::redact::json),
                "id": job.id,
                "state": job.state,
                "attempts": job.attempts.len(),
                "last_status": last.map(|a| a.status),
                "last_error": last.and_then(|a| a.error.clone()),
                "waiting_in_lane": job.is_parked(),
            })
        })
        .collect();
    json!({ "id": id, "group": group, "members": members })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(preserve_host: bool) -> GroupConfig {
        crate::config::file::FileConfig::parse(&format!(
            "[groups.g]\nmembers = [\"http://a:1\"]\npreserve_host = {preserve_host}\nmax_age_s = 60\n"
        ))
        .unwrap()
        .groups
        .remove("g")
        .unwrap()
    }

    fn submission() -> Submission {
        Submission {
            method: "PURGE".into(),
            path: "/page?x=1".into(),
            headers: vec![
                ("Knocker-Broadcast".into(), b"g".to_vec()),
                ("Host".into(), b"www.example".to_vec()),
                ("X-A".into(), b"1".to_vec()),
            ],
            body: b"b".to_vec(),
            remote: None,
            authority: Some("www.example".into()),
            rule: None,
            broadcast_rule: None,
        }
    }

    #[test]
    fn one_job_per_member_in_its_own_lane_with_the_marker() {
        let g = group(false);
        let members = vec!["http://a:1".to_owned(), "http://[::1]:2".to_owned()];
        let fanout = Fanout {
            id: "b1",
            group_name: "g",
            group: &g,
            members: &members,
            callback: None,
            rule: None,
        };
        let jobs = member_jobs(&fanout, &submission(), 1000);
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].id, "b1.0");
        assert_eq!(jobs[1].request.url, "http://[::1]:2/page?x=1");
        assert_eq!(jobs[0].lane.as_deref(), Some("broadcast:g:http://a:1"));
        assert_ne!(jobs[0].lane, jobs[1].lane);
        assert_eq!(
            jobs[0].request.headers,
            vec![
                (MARKER.to_owned(), b"g".to_vec()),
                ("x-a".to_owned(), b"1".to_vec())
            ]
        );
        assert_eq!(jobs[0].policy.deadline, Some(61_000));
        assert_eq!(jobs[0].policy.retries, u32::MAX);
        let r = receipt("b1", "g", &jobs);
        assert_eq!(r["members"][1]["id"], "b1.1");
        assert_eq!(r["members"][1]["member"], "http://[::1]:2");
        assert_eq!(r["broadcast"]["group"], "g");
    }

    #[test]
    fn preserve_host_sends_the_clients_host() {
        let g = group(true);
        let members = vec!["http://a:1".to_owned()];
        let fanout = Fanout {
            id: "b",
            group_name: "g",
            group: &g,
            members: &members,
            callback: None,
            rule: None,
        };
        let jobs = member_jobs(&fanout, &submission(), 0);
        assert!(jobs[0]
            .request
            .headers
            .contains(&("host".to_owned(), b"www.example".to_vec())));
    }
}
