//! Claims: pulling work messages (no more than the capped targets have room for), taking
//! each one's job with a compare-and-set write, and the heads of ordered lanes.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, Consumer};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self, Message};
use futures_util::StreamExt as _;
use parking_lot::Mutex;

use super::held::{nak, Held};
use super::record::{Record, WRITE_TRIES};
use super::submit::{carried, target_subject};
use super::{unavailable, NatsOptions, NatsStore};
use super::{LANE_SUBJECTS, LEGACY_CONSUMER, LEGACY_SUBJECT, WORK, WORK_SUBJECTS};
use crate::clock::Millis;
use crate::job::{Job, State, PARKED};
use crate::store::{HostCaps, StoreError};

/// How long one pull waits for messages.
const PULL_WAIT: Duration = Duration::from_millis(50);
/// Messages a claim pulls beyond its capped targets' room, for targets it has no cap for
/// yet, while there is work of such targets (see [`Uncapped`]).
const UNCAPPED_PER_CLAIM: usize = 16;
/// How often the work stream's subjects are counted to learn whether targets without a
/// cap have work (ms).
const UNCAPPED_EVERY: Millis = 100;

/// Whether targets without a cap have work: only then does a claim pull
/// [`UNCAPPED_PER_CLAIM`] messages beyond its capped targets' room. When all the work is
/// the capped targets', each of those messages would only be sent back, to be delivered
/// again and its record read (in a drain to one target, 16 of every 79 messages pulled).
#[derive(Default)]
pub(super) struct Uncapped {
    /// What the last count of the work stream's subjects, or a pull since, found.
    pub(super) found: bool,
    /// When the subjects were last counted (ms).
    pub(super) counted: Millis,
}

impl NatsStore {
    /// Claims into `claimed`: lane heads we hold that are due, then work messages, then
    /// the heads of other lanes.
    pub(super) async fn claim_into(
        &self,
        claimed: &mut Vec<Job>,
        now: Millis,
        limit: usize,
        caps: &HostCaps,
    ) -> Result<(), StoreError> {
        let taken = Mutex::new(HashMap::new());
        // Lane heads we hold whose retry is due.
        let due_heads: Vec<String> = self
            .held
            .lock()
            .iter()
            .filter(|(_, h)| h.due.is_some_and(|d| d <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due_heads {
            if claimed.len() >= limit {
                break;
            }
            let in_flight = |record: &mut Record| record.job.state = State::InFlight;
            match self.rewrite_open(&id, None, in_flight).await? {
                Some(record) => {
                    if let Some(h) = self.held.lock().get_mut(&id) {
                        h.due = None;
                    }
                    claimed.push(record.job);
                }
                // Deleted meanwhile (through any control plane): the lane goes on.
                None => self.drop_held(&id).await,
            }
        }
        // No more than the capped targets have room for, and a few for targets without a
        // cap while they have work (see [`Uncapped`]): a message pulled over its target's
        // cap is only sent back. A target's subject names it: the capped targets by
        // subject serve the count of that work and the pull below.
        let capped: HashMap<String, &str> = caps
            .hosts()
            .map(|(host, _)| (target_subject(host), host))
            .collect();
        let mut room = limit.saturating_sub(claimed.len());
        if !capped.is_empty() {
            let room_of_caps = caps
                .hosts()
                .fold(0, |sum: usize, (_, n)| sum.saturating_add(n));
            let extra = if self.uncapped_work(now, &capped).await {
                UNCAPPED_PER_CLAIM
            } else {
                0
            };
            room = room.min(room_of_caps.saturating_add(extra));
        }
        if room > 0 {
            // Each take is a few round trips to the server: run them side by side.
            let mut messages = pull(&self.work, room).await?;
            if messages.len() < room {
                // Not `?`: the messages pulled above must be taken or given back.
                match self.pull_legacy(now, room - messages.len()).await {
                    Ok(more) => messages.extend(more),
                    Err(e) => tracing::warn!(error = %e, "cannot pull earlier versions' work"),
                }
            }
            // A capped target's messages over its cap go back before their records are
            // read; only earlier versions' messages, all on one subject, are counted once
            // their record says where they go.
            if messages
                .iter()
                .any(|m| !capped.contains_key(m.subject.as_str()))
            {
                self.uncapped.lock().found = true;
            }
            let mut ready = Vec::new();
            for message in newest_deliveries(messages) {
                match capped.get(message.subject.as_str()) {
                    Some(host) if !caps.take(&mut taken.lock(), host) => {
                        let wait = Some(Duration::from_millis(100));
                        let _ = message.ack_with(AckKind::Nak(wait)).await;
                    }
                    _ => ready.push(message),
                }
            }
            let mut takes = futures_util::stream::iter(ready)
                .map(|m| {
                    let legacy = m.subject.as_str() == LEGACY_SUBJECT;
                    let caps = legacy.then_some((caps, &taken));
                    self.take_or_return(m, now, caps, false)
                })
                .buffer_unordered(64);
            while let Some(taken) = takes.next().await {
                claimed.extend(taken);
            }
        }
        for hash in self.lane_hashes(now).await? {
            if claimed.len() >= limit {
                break;
            }
            let consumer = self.lane_consumer(&hash).await?;
            let messages = pull(&consumer, 1).await?;
            for message in messages {
                let id = String::from_utf8_lossy(&message.payload).into_owned();
                if self.held.lock().contains_key(&id) {
                    continue; // ours already (redelivered after a progress gap)
                }
                claimed.extend(self.take_or_return(message, now, None, true).await);
            }
        }
        Ok(())
    }

    /// [`Self::take`], and a message it could not take (the server did not answer) is
    /// given back at once, to be delivered again, rather than left for the ack wait; the
    /// jobs taken before it are still returned, or they would be held and never attempted.
    async fn take_or_return(
        &self,
        message: Message,
        now: Millis,
        caps: Option<(&HostCaps, &Mutex<HashMap<String, usize>>)>,
        lane: bool,
    ) -> Option<Job> {
        let back = message.clone();
        match self.take(message, now, caps, lane).await {
            Ok(job) => job,
            Err(e) => {
                tracing::warn!(error = %e, "a work message could not be taken; given back");
                let _ = back.ack_with(AckKind::Nak(None)).await;
                None
            }
        }
    }

    /// Takes a delivered message: the job to attempt, or `None` when the message is
    /// stale (acknowledged and dropped), not due yet (NAK'd until it is), or the job is
    /// being attempted already (here, or by a control plane that claimed it first).
    pub(super) async fn take(
        &self,
        message: Message,
        now: Millis,
        caps: Option<(&HostCaps, &Mutex<HashMap<String, usize>>)>,
        lane: bool,
    ) -> Result<Option<Job>, StoreError> {
        let id = String::from_utf8_lossy(&message.payload).into_owned();
        let seq = message.info().map(|i| i.stream_sequence).ok();
        let ours = {
            // Ours already: the server sent it again (a progress report came late). The
            // attempt goes on; answers go to this, the newest delivery.
            let mut held = self.held.lock();
            held.get_mut(&id).map(|h| {
                let same = h.message.info().map(|i| i.stream_sequence).ok() == seq;
                if same && h.due.is_none() {
                    h.message = message.clone();
                }
                same
            })
        };
        match ours {
            Some(true) => return Ok(None),
            // Another message of a job we hold: the one we hold stays.
            Some(false) => {
                let _ = message.ack().await;
                return Ok(None);
            }
            None => {}
        }
        // A first delivery carries the record as created: the claim below is written over
        // its revision, so a record changed since (claimed, deleted) fails it and is read.
        let carried = if lane { None } else { carried(&message, &id) };
        let read = match carried {
            Some(carried) => Some(carried),
            None => self.read(&self.jobs, &id).await?,
        };
        let Some((mut record, mut revision)) = read else {
            let _ = message.ack().await; // deleted or finished meanwhile
            return Ok(None);
        };
        let mut tries = 0;
        loop {
            if record.msg_seq.is_some() && seq.is_some() && record.msg_seq != seq {
                let _ = message.ack().await; // not the message an earlier version named
                return Ok(None);
            }
            if record.job.is_finished() {
                let _ = message.ack().await;
                return Ok(None);
            }
            if record.job.state == State::InFlight
                && record.claimed_by.is_some()
                && seq.is_some()
                && record.claimed_by != seq
            {
                // Another message of this job claimed it; that one stays until the job's
                // outcome (its holder answers it, or it comes again if the holder died).
                let _ = message.ack().await;
                return Ok(None);
            }
            let job = &mut record.job;
            if lane && job.next_attempt_at == PARKED {
                job.next_attempt_at = now; // the lane's head: its turn now
            }
            let over_cap =
                caps.is_some_and(|(caps, taken)| !caps.take(&mut taken.lock(), job.host()));
            if !lane && over_cap {
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_millis(100))))
                    .await;
                return Ok(None);
            }
            if job.next_attempt_at > now {
                let wait = Duration::from_millis(job.next_attempt_at - now);
                if lane {
                    // The head stays with us until it is due (its previous holder died).
                    // Nothing is written: its claim, when due, reads the record again.
                    let host = record.job.host().to_owned();
                    let due = Some(record.job.next_attempt_at);
                    self.held.lock().insert(id, Held::new(message, host, due));
                } else {
                    let _ = message.ack_with(nak(wait)).await;
                }
                return Ok(None);
            }
            record.job.state = State::InFlight;
            record.claimed_by = seq.or(record.claimed_by);
            if let Some(written) = self.write_if(&self.jobs, &record, revision).await? {
                revision = written;
                break;
            }
            // Another writer came first: the submitter recording this message, or another
            // control plane that was sent an earlier delivery of it and claimed the job
            // (its progress reports keep the message; this delivery is left unanswered).
            tries += 1;
            let Some((fresh, r)) = self.read(&self.jobs, &id).await? else {
                let _ = message.ack().await;
                return Ok(None);
            };
            let theirs = fresh.claimed_by.is_some() && fresh.claimed_by != seq;
            if fresh.job.state == State::InFlight && theirs && seq.is_some() {
                let _ = message.ack().await; // claimed through another message of the job
                return Ok(None);
            }
            if fresh.job.state == State::InFlight || tries >= WRITE_TRIES {
                return Ok(None);
            }
            (record, revision) = (fresh, r);
        }
        let host = record.job.host().to_owned();
        let job = record.job.clone();
        let mut held = Held::new(message, host, None);
        held.claim = Some((record, revision));
        self.held.lock().insert(id, held);
        Ok(Some(job))
    }

    /// Whether targets not in `capped` (by subject) have work on the stream: counted at
    /// most every [`UNCAPPED_EVERY`] ms, and known at once when a pull brings some. Work
    /// of earlier versions counts (its target is only known once its record is read);
    /// when the count fails, they are assumed to.
    async fn uncapped_work(&self, now: Millis, capped: &HashMap<String, &str>) -> bool {
        if self.legacy.lock().is_some() {
            return true;
        }
        {
            let mut uncapped = self.uncapped.lock();
            let fresh = now < uncapped.counted + UNCAPPED_EVERY && uncapped.counted <= now;
            if fresh {
                return uncapped.found;
            }
            uncapped.counted = now;
        }
        let found = self.work_beyond(capped).await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot count the work stream's subjects");
            true
        });
        self.uncapped.lock().found = found;
        found
    }

    /// Whether the work stream holds messages on a target subject not in `capped`: read
    /// up to the first one (the server lists the subjects in pages).
    async fn work_beyond(&self, capped: &HashMap<String, &str>) -> Result<bool, StoreError> {
        let stream = self.js.get_stream(WORK).await.map_err(unavailable)?;
        let mut subjects = stream
            .info_with_subjects(WORK_SUBJECTS)
            .await
            .map_err(unavailable)?;
        while let Some(subject) = subjects.next().await {
            let (subject, count) = subject.map_err(unavailable)?;
            if count > 0 && !capped.contains_key(&subject) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Work an earlier version left on `knocker.work`, while there is any: once a pull
    /// finds nothing and the subject is empty, it is not pulled from, only looked at
    /// every 10 s (a control plane of an earlier version may still be publishing there
    /// during an upgrade).
    async fn pull_legacy(&self, now: Millis, n: usize) -> Result<Vec<Message>, StoreError> {
        let legacy = self.legacy.lock().clone();
        let messages = match &legacy {
            Some(consumer) => pull(consumer, n).await?,
            None => Vec::new(),
        };
        if !messages.is_empty() {
            return Ok(messages);
        }
        let every = if legacy.is_some() { 1_000 } else { 10_000 };
        let look = {
            let mut checked = self.legacy_checked.lock();
            let look = now >= *checked + every || now < *checked;
            if look {
                *checked = now;
            }
            look
        };
        if look {
            let stream = self.js.get_stream(WORK).await.map_err(unavailable)?;
            let left = subject_count(&stream, LEGACY_SUBJECT).await?;
            match (left, legacy.is_some()) {
                (0, true) => *self.legacy.lock() = None,
                (1.., false) => {
                    let c = consumer(&stream, LEGACY_CONSUMER, LEGACY_SUBJECT, &self.options);
                    *self.legacy.lock() = Some(c.await?);
                }
                _ => {}
            }
        }
        Ok(messages)
    }

    /// Lane heads to pull: the lanes with messages, at most every 200 ms.
    async fn lane_hashes(&self, now: Millis) -> Result<Vec<String>, StoreError> {
        {
            let mut listed = self.lanes_listed.lock();
            if now < *listed + 200 && *listed <= now {
                return Ok(Vec::new());
            }
            *listed = now;
        }
        let stream = self.js.get_stream(WORK).await.map_err(unavailable)?;
        let mut subjects = stream
            .info_with_subjects(LANE_SUBJECTS)
            .await
            .map_err(unavailable)?;
        let mut hashes = Vec::new();
        while let Some(subject) = subjects.next().await {
            let (subject, _) = subject.map_err(unavailable)?;
            if let Some(hash) = subject.strip_prefix("knocker.lane.") {
                hashes.push(hash.to_owned());
            }
        }
        Ok(hashes)
    }

    /// Creates the lane's consumer once (one message in flight, in order).
    async fn lane_consumer(&self, hash: &str) -> Result<Consumer<PullConfig>, StoreError> {
        if let Some(c) = self.lanes.lock().get(hash) {
            return Ok(c.clone());
        }
        let stream = self.js.get_stream(WORK).await.map_err(unavailable)?;
        let name = format!("lane-{hash}");
        let consumer = stream
            .get_or_create_consumer(
                &name,
                PullConfig {
                    durable_name: Some(name.clone()),
                    filter_subject: format!("knocker.lane.{hash}"),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: self.options.ack_wait,
                    max_deliver: -1,
                    max_ack_pending: 1,
                    // A lane nobody pulls from for an hour has no open jobs left.
                    inactive_threshold: Duration::from_secs(3600),
                    ..Default::default()
                },
            )
            .await
            .map_err(unavailable)?;
        self.lanes.lock().insert(hash.to_owned(), consumer.clone());
        Ok(consumer)
    }
}

/// The durable consumer every control plane pulls `subject`'s work from.
pub(super) async fn consumer(
    stream: &jetstream::stream::Stream,
    name: &str,
    subject: &str,
    options: &NatsOptions,
) -> Result<Consumer<PullConfig>, StoreError> {
    stream
        .get_or_create_consumer(
            name,
            PullConfig {
                durable_name: Some(name.to_owned()),
                filter_subject: subject.to_owned(),
                ack_policy: AckPolicy::Explicit,
                ack_wait: options.ack_wait,
                max_deliver: -1,
                max_ack_pending: 100_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| unavailable(format!("consumer {name}: {e}")))
}

/// How many messages the work stream holds on exactly `subject`.
pub(super) async fn subject_count(
    stream: &jetstream::stream::Stream,
    subject: &str,
) -> Result<u64, StoreError> {
    let mut subjects = stream
        .info_with_subjects(subject)
        .await
        .map_err(unavailable)?;
    let mut n = 0;
    while let Some(entry) = subjects.next().await {
        let (name, count) = entry.map_err(unavailable)?;
        if name == subject {
            n += count as u64;
        }
    }
    Ok(n)
}

/// Up to `n` messages that are there now, waiting at most [`PULL_WAIT`] for the first.
///
/// A claim waits for the answer at most four times that. A request is never abandoned,
/// though: a message the server hands to a request its client has stopped reading is
/// lost to everyone until the ack wait runs out (cutting pulls short at 200 ms once left a
/// parked target's job 30 s late), and nats-server 2.9 at times answers a request only
/// seconds after its expiry. So the request runs on in its own task, and what it brings
/// after the claim has moved on is given back at once.
pub(super) async fn pull(
    consumer: &Consumer<PullConfig>,
    n: usize,
) -> Result<Vec<Message>, StoreError> {
    let consumer = consumer.clone();
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Err(Ok(late)) = tx.send(fetch(&consumer, n).await) {
            give_back(late).await;
        }
    });
    match tokio::time::timeout(PULL_WAIT * 4, &mut rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(unavailable("a pull ended without an answer")),
        Err(_) => {
            // Too slow for this claim; what came just now is still taken.
            rx.close();
            match rx.try_recv() {
                Ok(result) => result,
                Err(_) => Ok(Vec::new()),
            }
        }
    }
}

/// One pull request, read until the server ends it (`n` messages, or [`PULL_WAIT`]).
///
/// A plain request, not a "no wait" one: nats-server 2.9 answers a no-wait request at
/// once with "408 Requests Pending" while another control plane's bigger request waits,
/// so one control plane took all the work and the other none.
pub(super) async fn fetch(
    consumer: &Consumer<PullConfig>,
    n: usize,
) -> Result<Vec<Message>, StoreError> {
    let mut batch = consumer
        .batch()
        .max_messages(n)
        .expires(PULL_WAIT)
        .messages()
        .await
        .map_err(unavailable)?;
    let mut messages = Vec::new();
    while let Some(message) = batch.next().await {
        match message {
            Ok(message) => messages.push(message),
            // What came is kept (taken or given back); the rest comes again.
            Err(e) if !messages.is_empty() => {
                tracing::debug!(error = %e, "a pull ended early");
                break;
            }
            Err(e) => return Err(unavailable(e)),
        }
    }
    Ok(messages)
}

/// One delivery per message: a pull can bring the same message twice (sent back, or its
/// ack wait over, while an earlier delivery was on its way); the newest delivery is the
/// one the server answers to, the older ones are left unanswered. In pull order.
fn newest_deliveries(messages: Vec<Message>) -> Vec<Message> {
    let mut newest: HashMap<u64, (usize, i64)> = HashMap::new();
    for (i, m) in messages.iter().enumerate() {
        if let Ok(info) = m.info() {
            let slot = newest
                .entry(info.stream_sequence)
                .or_insert((i, info.delivered));
            if info.delivered >= slot.1 {
                *slot = (i, info.delivered);
            }
        }
    }
    messages
        .into_iter()
        .enumerate()
        .filter(|(i, m)| {
            m.info().map_or(true, |info| {
                newest.get(&info.stream_sequence).map(|s| s.0) == Some(*i)
            })
        })
        .map(|(_, m)| m)
        .collect()
}

/// Sends messages back to be delivered again at once (to any control plane).
async fn give_back(messages: Vec<Message>) {
    for m in messages {
        let _ = m.ack_with(AckKind::Nak(None)).await;
    }
}
