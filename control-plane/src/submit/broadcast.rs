//! A submission broadcast to a group (`Knocker-Broadcast`, or a filter's broadcast rule):
//! checked, looked up by its id, fanned out to one job per member committed together
//! (static and DNS groups), or published once for a group's agents (NATS). The pieces —
//! groups, member jobs, receipts, the agents' bus — are [`crate::broadcast`]'s.

use serde_json::json;

use super::{new_id, Reply, Submitter};
use crate::broadcast::{self, groups::GroupConfig};
use crate::job::spec::{is_http_url, knocker_id, split_headers, Errors, Submission, BAD_URL};
use crate::job::Job;
use crate::store::{Inserted, StoreError};

/// Knocker headers that set a job's policy: a broadcast uses its group's instead.
const BROADCAST_EXCLUDES: &[&str] = &[
    "knocker-host",
    "knocker-scheme",
    "knocker-timeout",
    "knocker-retries",
    "knocker-backoff-factor",
];

/// Most members a broadcast is looked up with.
const MAX_MEMBERS: usize = 10_000;

impl Submitter {
    /// Fans the request out to every member of `group`: one job per member, committed
    /// together, then the receipt listing them (`status` 200 for `Knocker-Broadcast`,
    /// 202 for a broadcast rule).
    pub(super) async fn broadcast(
        &self,
        submission: &Submission,
        group: &str,
        rule: Option<&str>,
        status: u16,
    ) -> Reply {
        if broadcast::is_broadcast_copy(submission) {
            return Reply::text(
                406,
                "Ignore requests a broadcast delivered: they are never broadcast again",
            );
        }
        let field = if rule.is_some() {
            "rule.group"
        } else {
            "knocker-broadcast"
        };
        let (raw, _) = split_headers(&submission.headers);
        let mut errors = Errors::default();
        let Some(config) = self.groups.get(group) else {
            let known: Vec<&str> = self.groups.names().map(String::as_str).collect();
            errors.add(
                field,
                format!(
                    "Unknown group '{group}'. Groups: {}.",
                    if known.is_empty() {
                        "none configured (KNOCKER_CONFIG)".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            );
            return Reply::invalid(&errors);
        };
        for header in BROADCAST_EXCLUDES {
            if raw.contains_key(*header) {
                errors.add(
                    header,
                    "Cannot be combined with Knocker-Broadcast: the group's delivery policy applies.",
                );
            }
        }
        let callback = raw
            .get("knocker-callback")
            .map(|v| String::from_utf8_lossy(v).trim().to_owned());
        if callback.as_deref().is_some_and(|c| !is_http_url(c)) {
            errors.add("knocker-callback", BAD_URL);
        }
        let id = knocker_id(&raw, &mut errors);
        if !errors.0.is_empty() {
            return Reply::invalid(&errors);
        }
        let id = id.unwrap_or_else(new_id);
        if config.agents {
            return self
                .broadcast_to_agents(submission, group, config, &id, status)
                .await;
        }
        // A resubmission gets the stored broadcast's receipt, whatever the group is now.
        match self.stored_broadcast(&id).await {
            Ok(stored) if !stored.is_empty() => {
                // The members are the operator's; of the request, only what this one
                // carried is shown (see `commit`).
                let mut receipt = broadcast::receipt(&id, group, &stored);
                let copy = broadcast::copy_headers(group, config, submission);
                receipt["method"] = json!(submission.method);
                receipt["headers"] = json!(crate::job::receipt::header_list(&copy));
                receipt["body-length"] = json!(submission.body.len());
                return Reply::json(status, &receipt).with_header("knocker-id", id);
            }
            Ok(_) => {}
            Err(e) => return Reply::from(&e),
        }
        let members = match self.groups.members(group).await {
            Ok(members) => members,
            Err(e) => {
                tracing::warn!(group, error = %e, "broadcast refused: no members to send to");
                return Reply::error(503, field, &format!("{e}. Nothing was accepted."));
            }
        };
        let fanout = broadcast::Fanout {
            id: &id,
            group_name: group,
            group: config,
            members: &members,
            callback,
            rule,
        };
        if let Some(reply) = self.unclaimable() {
            return reply;
        }
        let jobs = broadcast::member_jobs(&fanout, submission, self.time.now_ms());
        // Written before the commit: the member jobs are the store's once committed.
        let mut receipt = broadcast::receipt(&id, group, &jobs);
        match self.store.insert_all(jobs).await {
            Ok(inserted) => {
                self.wake.notify_one();
                // A member stored already (the same broadcast sent twice at once) is
                // shown as it is stored.
                for (k, outcome) in inserted.iter().enumerate() {
                    if let Inserted::Existing(stored) = outcome {
                        receipt["members"][k] = broadcast::member(stored);
                    }
                }
                tracing::debug!(broadcast_id = %id, group, members = inserted.len(), "broadcast accepted");
                Reply::json(status, &receipt).with_header("knocker-id", id)
            }
            Err(e) => {
                tracing::error!(error = %e, "broadcast refused: the store cannot commit");
                Reply::from(&e)
            }
        }
    }

    /// One message for every agent subscribed to `group`, now or later while they are
    /// subscribed; the receipt lists the agents subscribed now.
    async fn broadcast_to_agents(
        &self,
        submission: &Submission,
        group: &str,
        config: &GroupConfig,
        id: &str,
        status: u16,
    ) -> Reply {
        let Some(bus) = &self.agents else {
            return Reply::error(
                503,
                "knocker-broadcast",
                &format!("Group '{group}' is made of agents, which need KNOCKER_STORE=nats://…."),
            );
        };
        let headers = broadcast::copy_headers(group, config, submission);
        let message = broadcast::agents::Broadcast {
            id: id.to_owned(),
            group: group.to_owned(),
            method: submission.method.clone(),
            path: submission.absolute_path(),
            headers,
            body: submission.body.clone(),
        };
        match bus.publish(&message).await {
            Ok(sent) => Reply::json(status, &broadcast::agents_receipt(id, &message, &sent))
                .with_header("knocker-id", id.to_owned()),
            Err(e) => {
                tracing::error!(error = %e, "broadcast refused: NATS cannot take it");
                Reply::from(&e)
            }
        }
    }

    /// The member jobs of broadcast `id`, in member order (empty when there is none).
    pub async fn stored_broadcast(&self, id: &str) -> Result<Vec<Job>, StoreError> {
        let jobs = self
            .store
            .find_prefix(&broadcast::member_prefix(id), MAX_MEMBERS)
            .await?;
        Ok(jobs
            .into_iter()
            .filter(|j| {
                j.config
                    .get("broadcast")
                    .and_then(|b| b.get("id"))
                    .is_some_and(|b| b == id)
            })
            .collect())
    }
}
