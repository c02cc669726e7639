//! The group-commit writer: one task takes whatever jobs are queued (up to
//! [`MAX_BATCH`]), commits them in one transaction, and publishes each job's events in
//! submission order. It also keeps each run's chain of writes: once a link failed, the
//! run's later links are refused, in order. A run's `partial_result` deltas that wait in
//! the same batch become one event ([`merge_deltas`]).

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::gate::Arrival;
use super::registry::{Wakes, fan_out};
use super::{DeliveryError, DeliveryOutcome, Link, Route};
use crate::protocol::{EventType, Frame, Payload};
use crate::store::{Store, StoreError, WriteJob};
use crate::telemetry::metric;

pub(super) struct Pending {
    pub(super) job: WriteJob,
    pub(super) waiter: Waiter,
    pub(super) chain: Option<Chain>,
}

#[derive(Debug, Clone)]
pub(super) struct Chain {
    pub(super) run_id: Arc<str>,
    pub(super) link: Link,
}

/// Where a submitter hears how its job went: the `seq` of its first event, or why not.
pub(super) type Reply = oneshot::Sender<Result<u64, DeliveryError>>;

/// Who is told about a job's commit, and whose connections get its events.
pub(super) struct Waiter {
    pub(super) owner: String,
    pub(super) queued_at: Instant,
    pub(super) reply: Reply,
    /// The submitters of later deltas merged into this job's event ([`merge_deltas`]).
    pub(super) merged: Vec<Reply>,
}

impl Waiter {
    /// Tells the job's submitter how its write went, and the submitters of the deltas
    /// merged into it: the `seq` of the one event, or that an earlier write of their run
    /// (the one their text went into) failed.
    /// The job's own submitter hears first, so a run that checks its writes in order
    /// finds the real error before the echoes of it.
    fn answer(self, outcome: Result<u64, DeliveryError>) {
        let first = outcome.as_ref().ok().copied();
        let _ = self.reply.send(outcome);
        for reply in self.merged {
            let _ = reply.send(first.ok_or(DeliveryError::EarlierWriteFailed));
        }
    }
}

/// Most jobs written in one transaction.
const MAX_BATCH: usize = 256;

pub(super) async fn write_loop(store: Store, route: Arc<Route>, mut rx: mpsc::Receiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    // Runs whose chain of writes is broken, until their last write comes by.
    let mut broken: HashSet<Arc<str>> = HashSet::new();
    // Looked up once: a metric named in a hot loop is found by its key on every call.
    let (batch_jobs, latency) =
        (metrics::histogram!(metric::STORE_BATCH_JOBS), metrics::histogram!(metric::DELIVERY_LATENCY));
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // Let the tasks that are ready run first: a run started by the job just taken
        // submits its first events now, and they join the same commit.
        tokio::task::yield_now().await;
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        batch_jobs.record(batch.len() as f64);
        let mut jobs = Vec::with_capacity(batch.len());
        let mut waiters = Vec::with_capacity(batch.len());
        for Pending { job, waiter, chain } in batch.drain(..) {
            if let Some(waiter) = admit(&mut broken, waiter, chain.as_ref()) {
                jobs.push(job);
                waiters.push((waiter, chain));
            }
        }
        if jobs.is_empty() {
            continue;
        }
        merge_deltas(&mut jobs, &mut waiters);
        // The jobs move out of their envelopes into one shared slice: no copy of any payload.
        let mut jobs: Arc<[WriteJob]> = jobs.into();
        let mut written = store.write_batch(&jobs).await;
        // Jobs made for their thread as it no longer is are answered, and the others
        // written again without them (and without their runs' later writes). Each turn
        // takes at least one job out.
        while let Err(StoreError::Raced(raced)) = &written {
            tracing::debug!(jobs = raced.len(), "a batch had jobs made for their thread as it no longer is");
            let mut kept = Vec::with_capacity(jobs.len());
            let mut kept_waiters = Vec::with_capacity(jobs.len());
            for (j, (job, (waiter, chain))) in jobs.iter().zip(waiters).enumerate() {
                if raced.contains(&j) {
                    break_chain(&mut broken, chain.as_ref());
                    waiter.answer(Err(DeliveryError::Raced));
                } else if let Some(waiter) = admit(&mut broken, waiter, chain.as_ref()) {
                    kept.push(job.clone());
                    kept_waiters.push((waiter, chain));
                }
            }
            (jobs, waiters) = (kept.into(), kept_waiters);
            if jobs.is_empty() {
                break;
            }
            written = store.write_batch(&jobs).await;
        }
        if jobs.is_empty() {
            continue;
        }
        match written {
            Ok(firsts) => {
                let committed = jobs.iter().zip(waiters.into_iter().map(|(waiter, _)| waiter));
                publish_all(&route, committed, firsts, &latency);
            }
            Err(e) if jobs.len() == 1 => {
                tracing::warn!(error = %e, "event write failed");
                if let Some((waiter, chain)) = waiters.into_iter().next() {
                    break_chain(&mut broken, chain.as_ref());
                    waiter.answer(Err(job_error(e)));
                }
            }
            Err(e) if matches!(e, StoreError::Unavailable(_)) => {
                // The database is away: every job would wait for it again, one by one.
                tracing::warn!(error = %e, jobs = jobs.len(), "batch write failed: database unavailable");
                let reason = e.to_string();
                for (waiter, chain) in waiters {
                    break_chain(&mut broken, chain.as_ref());
                    waiter.answer(Err(StoreError::Unavailable(reason.clone().into()).into()));
                }
            }
            Err(e) => {
                // One bad job must not fail its neighbours: write each on its own.
                tracing::warn!(error = %e, jobs = jobs.len(), "batch write failed; retrying jobs one by one");
                for (job, (waiter, chain)) in jobs.iter().zip(waiters) {
                    let Some(waiter) = admit(&mut broken, waiter, chain.as_ref()) else { continue };
                    let single: Arc<[WriteJob]> = Arc::new([job.clone()]);
                    match store.write_batch(&single).await {
                        Ok(firsts) => publish_all(&route, std::iter::once((job, waiter)), firsts, &latency),
                        Err(e) => {
                            break_chain(&mut broken, chain.as_ref());
                            waiter.answer(Err(job_error(e)));
                        }
                    }
                }
            }
        }
    }
}

/// What a job's submitter hears of its write's failure.
fn job_error(e: StoreError) -> DeliveryError {
    match e {
        StoreError::Raced(_) => DeliveryError::Raced,
        e => DeliveryError::Store(e),
    }
}

/// The job's waiter if the job may be written; `None` after telling it that its run's
/// chain is broken.
fn admit(broken: &mut HashSet<Arc<str>>, waiter: Waiter, chain: Option<&Chain>) -> Option<Waiter> {
    if chain.is_some_and(|chain| refused(broken, chain)) {
        waiter.answer(Err(DeliveryError::EarlierWriteFailed));
        return None;
    }
    Some(waiter)
}

/// Whether a chained job is refused because its run's chain is broken; a run's last
/// write (refused or not) forgets the chain.
fn refused(broken: &mut HashSet<Arc<str>>, chain: &Chain) -> bool {
    match chain.link {
        Link::Next => broken.contains(&chain.run_id),
        Link::Last => broken.remove(&chain.run_id),
        Link::Close => {
            broken.remove(&chain.run_id);
            false
        }
    }
}

/// A chained job failed: its run's later links are refused.
fn break_chain(broken: &mut HashSet<Arc<str>>, chain: Option<&Chain>) {
    if let Some(chain) = chain
        && chain.link == Link::Next
    {
        broken.insert(chain.run_id.clone());
    }
}

/// Hands the events of jobs committed together to their readers (see [`publish`]), then
/// wakes the connections they were offered to, once.
fn publish_all<'a>(
    route: &Route,
    jobs: impl Iterator<Item = (&'a WriteJob, Waiter)>,
    firsts: Vec<u64>,
    latency: &metrics::Histogram,
) {
    let mut wakes = Wakes::default();
    let mut outcomes = Outcomes::default();
    for ((job, waiter), first) in jobs.zip(firsts) {
        let queued_at = waiter.queued_at;
        publish(route, job, waiter, first, &mut wakes, &mut outcomes);
        latency.record(queued_at.elapsed().as_secs_f64());
    }
    route.settle(wakes);
    outcomes.count();
}

/// The events of one commit by outcome, counted once per commit: a labelled counter
/// builds its key and looks it up each time, 3 % of a chat message's instructions when
/// it was counted per event.
#[derive(Default)]
struct Outcomes {
    /// Events per outcome label, in order of first appearance.
    by_label: Vec<(&'static str, u64)>,
    dropped: u64,
}

impl Outcomes {
    fn add(&mut self, outcome: DeliveryOutcome) {
        let label = outcome.label();
        match self.by_label.iter_mut().find(|(l, _)| *l == label) {
            Some((_, n)) => *n += 1,
            None => self.by_label.push((label, 1)),
        }
        if let DeliveryOutcome::Dropped(_) = outcome {
            self.dropped += 1;
        }
    }

    fn count(self) {
        for (label, n) in self.by_label {
            metrics::counter!(metric::EVENTS, "outcome" => label).increment(n);
        }
        if self.dropped > 0 {
            metrics::counter!(metric::EVENTS_DROPPED, "reason" => "queue_full").increment(self.dropped);
        }
    }
}

/// Hands a committed job's events, numbered from `first`, to the other nodes and the
/// owner's connections here: each is serialized once, for all of them. The connections
/// are woken by the caller, once it has published everything committed together.
fn publish(route: &Route, job: &WriteJob, waiter: Waiter, first: u64, wakes: &mut Wakes, outcomes: &mut Outcomes) {
    let conns = route.registry.connections_of(&waiter.owner);
    // Only with other nodes does an event need a name of its own beyond this call.
    let shared =
        route.broker.is_shared().then(|| (Arc::from(waiter.owner.as_str()), Arc::from(job.thread_id.as_str())));
    for (i, event) in job.events.iter().enumerate() {
        let seq = first + i as u64;
        let text = event.frame_text(&job.thread_id, seq);
        let kind = event.kind.as_str();
        let outcome = match &shared {
            None => fan_out(&conns, kind, &job.thread_id, seq, &Frame::from(text), wakes),
            Some((owner, thread_id)) => {
                route.broker.publish_event(owner, thread_id, seq, kind, &text);
                let arrival = Arrival {
                    owner: owner.clone(),
                    thread_id: thread_id.clone(),
                    seq,
                    kind: Arc::from(kind),
                    text: Frame::from(text),
                };
                route.deliver(&conns, arrival, wakes)
            }
        };
        outcomes.add(outcome);
    }
    waiter.answer(Ok(first));
}

/// Merges each run's `partial_result` deltas that wait in this batch into one event: one
/// `seq`, one row and one frame for the text that piled up while the previous commit was
/// under way. Only what already waits is merged, so nothing waits for it: an idle server
/// writes each delta as it comes, a loaded one fewer and longer ones. A delta joins the
/// one before it when both are the same run's, each a job of that one event alone, and
/// no other job of their thread or of their run lies between them (the thread's order
/// and the run's chain of writes are kept).
fn merge_deltas(jobs: &mut Vec<WriteJob>, waiters: &mut Vec<(Waiter, Option<Chain>)>) {
    let is_delta = |job: &WriteJob, chain: &Option<Chain>| {
        job.rows.is_empty()
            && job.events.len() == 1
            && job.events[0].kind == EventType::PartialResult
            && chain.as_ref().is_some_and(|c| c.link == Link::Next)
    };
    if jobs.iter().zip(waiters.iter()).filter(|(job, (_, chain))| is_delta(job, chain)).count() < 2 {
        return;
    }
    // The text of each delta; the text of those merged into another moves into it.
    let mut texts: Vec<Option<String>> = jobs
        .iter()
        .zip(waiters.iter())
        .map(|(job, (_, chain))| if is_delta(job, chain) { delta_text(job) } else { None })
        .collect();
    // Where each merged delta went, and which deltas took others in.
    let mut into: Vec<Option<usize>> = vec![None; jobs.len()];
    let mut grown = vec![false; jobs.len()];
    let mut merged = 0;
    // The latest job kept of each thread and of each run's chain: a delta joins a delta
    // that is both, so neither the thread's order nor the chain's is changed (a delta
    // must not jump over a write of its run that may fail).
    let mut last_of_thread: HashMap<&str, usize> = HashMap::new();
    let mut last_of_run: HashMap<&str, usize> = HashMap::new();
    for (j, job) in jobs.iter().enumerate() {
        let run = waiters[j].1.as_ref().map(|c| &*c.run_id);
        if let Some(&i) = last_of_thread.get(job.thread_id.as_str())
            && texts[i].is_some()
            && texts[j].is_some()
            && run.and_then(|run| last_of_run.get(run)) == Some(&i)
        {
            let text = texts[j].take().unwrap_or_default();
            texts[i].get_or_insert_default().push_str(&text);
            into[j] = Some(i);
            grown[i] = true;
            merged += 1;
            continue;
        }
        last_of_thread.insert(&job.thread_id, j);
        if let Some(run) = run {
            last_of_run.insert(run, j);
        }
    }
    if merged == 0 {
        return;
    }
    metrics::counter!(metric::DELTAS_MERGED).increment(merged);
    let mut position = vec![0; jobs.len()];
    let all = std::mem::take(jobs).into_iter().zip(std::mem::take(waiters));
    for (j, (mut job, (waiter, chain))) in all.enumerate() {
        match into[j] {
            Some(i) => {
                let (kept, _) = &mut waiters[position[i]];
                kept.merged.push(waiter.reply);
                kept.merged.extend(waiter.merged);
            }
            None => {
                if grown[j] {
                    let content = texts[j].as_deref().unwrap_or_default();
                    job.events[0].payload = Payload::PartialResult { content, is_complete: false }.to_raw();
                }
                position[j] = jobs.len();
                jobs.push(job);
                waiters.push((waiter, chain));
            }
        }
    }
}

/// A `partial_result` delta's text, read back from its payload.
fn delta_text(job: &WriteJob) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Delta {
        content: String,
    }
    serde_json::from_str::<Delta>(job.events[0].payload.get()).ok().map(|d| d.content)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewEvent, Row};

    /// A job, its waiter and chain, and the receiver of its reply.
    type Submitted = (WriteJob, (Waiter, Option<Chain>), oneshot::Receiver<Result<u64, DeliveryError>>);

    fn event(kind: EventType, payload: &Payload<'_>) -> NewEvent {
        NewEvent {
            kind,
            run_id: None,
            agent_name: None,
            timestamp: "2026-12-03T00:00:00.000Z".into(),
            payload: payload.to_raw(),
        }
    }

    /// A job of `thread`, in `run`'s chain, with its waiter and the receiver of its reply.
    fn job(thread: &str, run: &str, event: NewEvent) -> Submitted {
        let (reply, rx) = oneshot::channel();
        let waiter = Waiter { owner: "u".into(), queued_at: Instant::now(), reply, merged: Vec::new() };
        let chain = Chain { run_id: Arc::from(run), link: Link::Next };
        (
            WriteJob { expected_last_seq: None, thread_id: thread.into(), rows: Vec::new(), events: vec![event] },
            (waiter, Some(chain)),
            rx,
        )
    }

    fn delta(thread: &str, run: &str, text: &str) -> Submitted {
        job(thread, run, event(EventType::PartialResult, &Payload::PartialResult { content: text, is_complete: false }))
    }

    fn thinking(thread: &str, run: &str) -> Submitted {
        let payload = Payload::AgentThinking {
            reasoning: "r",
            step_number: 1,
            total_steps: None,
            progress_percentage: None,
            status: crate::protocol::Status::Thinking,
        };
        job(thread, run, event(EventType::AgentThinking, &payload))
    }

    fn contents(jobs: &[WriteJob]) -> Vec<String> {
        jobs.iter()
            .map(|j| {
                let v: serde_json::Value = serde_json::from_str(j.events[0].payload.get()).expect("json");
                v["content"].as_str().map_or_else(|| j.events[0].kind.as_str().to_string(), str::to_string)
            })
            .collect()
    }

    #[test]
    fn a_runs_waiting_deltas_become_one_event_and_every_submitter_hears_its_seq() {
        let submitted = vec![
            delta("t1", "r1", "Hello"),
            delta("t2", "r2", "Other"),
            delta("t1", "r1", ", \"wor"),
            delta("t1", "r1", "ld\"\n"),
            delta("t2", "r2", " thread"),
        ];
        let mut jobs = Vec::new();
        let mut waiters = Vec::new();
        let mut replies = Vec::new();
        for (j, w, rx) in submitted {
            jobs.push(j);
            waiters.push(w);
            replies.push(rx);
        }
        merge_deltas(&mut jobs, &mut waiters);
        assert_eq!(contents(&jobs), ["Hello, \"world\"\n", "Other thread"]);
        assert_eq!(jobs[0].thread_id, "t1");
        assert_eq!(waiters.len(), 2);
        for ((waiter, _), first) in waiters.into_iter().zip([7, 3]) {
            waiter.answer(Ok(first));
        }
        let heard: Vec<u64> = replies.iter_mut().map(|rx| rx.try_recv().expect("answered").expect("ok")).collect();
        assert_eq!(heard, [7, 3, 7, 7, 3]);
    }

    #[test]
    fn deltas_apart_in_their_thread_or_of_different_runs_stay_apart() {
        let submitted = vec![
            delta("t1", "r1", "a"),
            thinking("t1", "r1"),
            delta("t1", "r1", "b"),
            delta("t1", "r9", "c"),
            delta("t1", "r1", "d"),
        ];
        let (mut jobs, mut waiters): (Vec<_>, Vec<_>) = submitted.into_iter().map(|(j, w, _)| (j, w)).unzip();
        merge_deltas(&mut jobs, &mut waiters);
        assert_eq!(contents(&jobs), ["a", "agent_thinking", "b", "c", "d"]);
        // A write of the same run to another thread lies between: it may fail, and the
        // later delta must then be refused, not written ahead of it.
        let submitted = vec![delta("t1", "r1", "a"), thinking("t2", "r1"), delta("t1", "r1", "b")];
        let (mut jobs, mut waiters): (Vec<_>, Vec<_>) = submitted.into_iter().map(|(j, w, _)| (j, w)).unzip();
        merge_deltas(&mut jobs, &mut waiters);
        assert_eq!(contents(&jobs), ["a", "agent_thinking", "b"]);
    }

    #[test]
    fn a_merged_write_that_fails_fails_every_delta_in_it() {
        let (j1, w1, mut rx1) = delta("t1", "r1", "a");
        let (j2, w2, mut rx2) = delta("t1", "r1", "b");
        let (mut jobs, mut waiters) = (vec![j1, j2], vec![w1, w2]);
        merge_deltas(&mut jobs, &mut waiters);
        assert_eq!(jobs.len(), 1);
        let (waiter, _) = waiters.pop().expect("one job");
        waiter.answer(Err(DeliveryError::Stopped));
        assert!(matches!(rx1.try_recv(), Ok(Err(DeliveryError::Stopped))));
        assert!(matches!(rx2.try_recv(), Ok(Err(DeliveryError::EarlierWriteFailed))));
        // A job with rows is never merged into, nor merged.
        let (mut with_rows, w3, _) = delta("t1", "r1", "c");
        with_rows.rows.push(Row::EndRun {
            run_id: "r1".into(),
            status: "completed",
            error: None,
            prompt_tokens: None,
            completion_tokens: None,
        });
        let (j4, w4, _) = delta("t1", "r1", "d");
        let (mut jobs, mut waiters) = (vec![with_rows, j4], vec![w3, w4]);
        merge_deltas(&mut jobs, &mut waiters);
        assert_eq!(jobs.len(), 2);
    }
}
