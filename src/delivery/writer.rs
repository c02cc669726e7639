//! The group-commit writer: one task takes whatever jobs are queued (up to
//! [`MAX_BATCH`]), commits them in one transaction, and publishes each job's events in
//! submission order. It also keeps each run's chain of writes: once a link failed, the
//! run's later links are refused, in order.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::gate::Arrival;
use super::registry::{Wakes, fan_out};
use super::{DeliveryError, DeliveryOutcome, Link, Route};
use crate::protocol::Frame;
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

/// Who is told about a job's commit, and whose connections get its events.
pub(super) struct Waiter {
    pub(super) owner: String,
    pub(super) queued_at: Instant,
    pub(super) reply: oneshot::Sender<Result<u64, DeliveryError>>,
}

/// Most jobs written in one transaction.
const MAX_BATCH: usize = 256;

pub(super) async fn write_loop(store: Store, route: Arc<Route>, mut rx: mpsc::Receiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    // Runs whose chain of writes is broken, until their last write comes by.
    let mut broken: HashSet<Arc<str>> = HashSet::new();
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
        metrics::histogram!(metric::STORE_BATCH_JOBS).record(batch.len() as f64);
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
        // The jobs move out of their envelopes into one shared slice: no copy of any payload.
        let jobs: Arc<[WriteJob]> = jobs.into();
        match store.write_batch(&jobs).await {
            Ok(firsts) => publish_all(&route, jobs.iter().zip(waiters.into_iter().map(|(waiter, _)| waiter)), firsts),
            Err(e) if jobs.len() == 1 => {
                tracing::warn!(error = %e, "event write failed");
                if let Some((waiter, chain)) = waiters.into_iter().next() {
                    break_chain(&mut broken, chain.as_ref());
                    let _ = waiter.reply.send(Err(e.into()));
                }
            }
            Err(e) if matches!(e, StoreError::Unavailable(_)) => {
                // The database is away: every job would wait for it again, one by one.
                tracing::warn!(error = %e, jobs = jobs.len(), "batch write failed: database unavailable");
                let reason = e.to_string();
                for (waiter, chain) in waiters {
                    break_chain(&mut broken, chain.as_ref());
                    let _ = waiter.reply.send(Err(StoreError::Unavailable(reason.clone().into()).into()));
                }
            }
            Err(e) => {
                // One bad job must not fail its neighbours: write each on its own.
                tracing::warn!(error = %e, jobs = jobs.len(), "batch write failed; retrying jobs one by one");
                for (job, (waiter, chain)) in jobs.iter().zip(waiters) {
                    let Some(waiter) = admit(&mut broken, waiter, chain.as_ref()) else { continue };
                    let single: Arc<[WriteJob]> = Arc::new([job.clone()]);
                    match store.write_batch(&single).await {
                        Ok(firsts) => publish_all(&route, std::iter::once((job, waiter)), firsts),
                        Err(e) => {
                            break_chain(&mut broken, chain.as_ref());
                            let _ = waiter.reply.send(Err(e.into()));
                        }
                    }
                }
            }
        }
    }
}

/// The job's waiter if the job may be written; `None` after telling it that its run's
/// chain is broken.
fn admit(broken: &mut HashSet<Arc<str>>, waiter: Waiter, chain: Option<&Chain>) -> Option<Waiter> {
    if chain.is_some_and(|chain| refused(broken, chain)) {
        let _ = waiter.reply.send(Err(DeliveryError::EarlierWriteFailed));
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
fn publish_all<'a>(route: &Route, jobs: impl Iterator<Item = (&'a WriteJob, Waiter)>, firsts: Vec<u64>) {
    let mut wakes = Wakes::default();
    for ((job, waiter), first) in jobs.zip(firsts) {
        publish(route, job, waiter, first, &mut wakes);
    }
    route.settle(wakes);
}

/// Hands a committed job's events, numbered from `first`, to the other nodes and the
/// owner's connections here: each is serialized once, for all of them. The connections
/// are woken by the caller, once it has published everything committed together.
fn publish(route: &Route, job: &WriteJob, waiter: Waiter, first: u64, wakes: &mut Wakes) {
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
        metrics::counter!(metric::EVENTS, "outcome" => outcome.label()).increment(1);
        if let DeliveryOutcome::Dropped(_) = outcome {
            metrics::counter!(metric::EVENTS_DROPPED, "reason" => "queue_full").increment(1);
        }
    }
    metrics::histogram!(metric::DELIVERY_LATENCY).record(waiter.queued_at.elapsed().as_secs_f64());
    let _ = waiter.reply.send(Ok(first));
}
