//! How committed events reach the tabs a user has open on other nodes. In-process by
//! default: one node, nothing to do. With `REDIS_URL`, each node publishes what it
//! commits on the owner's channel (`netra:user:{id}`) and subscribes to the channels of
//! the users it serves (a connection or a run of theirs here; the first one subscribes,
//! the last one gone unsubscribes), so a node's Redis traffic grows with its own users,
//! not with the cluster. A message carries the event's `seq`; delivery's gate puts what
//! arrives in order and fills any gap from the store, so a lost message (Redis away, a
//! node's publish failing) costs latency, never an event.
//!
//! Redis is optional unless `REDIS_REQUIRED`: while it is away each node serves its own
//! users, `/health` says `broker` degraded with the reason, and when it answers again
//! the node subscribes anew and fills, from the store, every thread of its users written
//! in the meantime. `stop_agent` travels the same channel to the node running the run.
//!
//! Wire format of a message (fields separated by `\n`, the last one free text):
//! `E node thread seq kind frame` an event; `S node run thread` a stop; `G node thread seq
//! since` a doorbell: events up to `seq` exist, some unpublished since `since` (Unix ms),
//! sent once Redis answers again after a failed publish.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::startup::{Report, State};
use crate::telemetry::metric;

/// The component name in the startup report and `/health`.
pub const COMPONENT: &str = "broker";
const PREFIX: &str = "netra:user:";
/// Messages waiting for the publisher; past it they are dropped (counted) and their
/// threads get a doorbell once Redis answers.
const OUTGOING: usize = 65_536;
const TIMEOUT: Duration = Duration::from_secs(2);

/// What other nodes sent that this node acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Event {
        owner: String,
        thread_id: String,
        seq: u64,
        kind: String,
        frame: String,
    },
    Stop {
        owner: String,
        run_id: Option<String>,
        thread_id: Option<String>,
    },
    /// Events of `thread_id` up to `seq` exist; the node that wrote them could not
    /// publish them from `since_ms` (Unix ms) on.
    Doorbell {
        owner: String,
        thread_id: String,
        seq: u64,
        since_ms: i64,
    },
    /// Redis answered again after an outage that began at this Unix time (ms): every
    /// thread of this node's users written since may have events this node never saw.
    Resubscribed {
        outage_began_ms: i64,
    },
}

/// The node's handle on the broker; cheap to clone.
#[derive(Clone, Default)]
pub struct Broker {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    node: String,
    /// Redis's URL with any password masked, for messages.
    shown: String,
    outgoing: mpsc::Sender<(String, Vec<u8>)>,
    /// Users this node serves, with how many connections and runs of theirs it holds.
    users: Mutex<HashMap<String, usize>>,
    commands: mpsc::UnboundedSender<Command>,
    /// Threads whose publish was dropped: their owner, highest `seq`, and since when.
    missed: Mutex<HashMap<String, (String, u64, i64)>>,
}

enum Command {
    Subscribe(String),
    Unsubscribe(String),
}

impl Broker {
    /// The in-process broker: this node alone.
    pub fn local() -> Self {
        Self::default()
    }

    /// Whether other nodes may deliver to this node's users (and need to hear from it).
    pub fn is_shared(&self) -> bool {
        self.inner.is_some()
    }

    /// This node now serves `user` once more (a connection or a run of theirs): the first
    /// hold subscribes to the user's channel.
    pub fn hold(&self, user: &str) {
        let Some(inner) = &self.inner else { return };
        let mut users = inner.users();
        let count = users.entry(user.to_string()).or_insert(0);
        *count += 1;
        if *count == 1 {
            let _ = inner.commands.send(Command::Subscribe(user.to_string()));
        }
    }

    /// The counterpart of [`Broker::hold`]: the last release unsubscribes.
    pub fn release(&self, user: &str) {
        let Some(inner) = &self.inner else { return };
        let mut users = inner.users();
        let Some(count) = users.get_mut(user) else { return };
        *count -= 1;
        if *count == 0 {
            users.remove(user);
            let _ = inner.commands.send(Command::Unsubscribe(user.to_string()));
        }
    }

    /// Tells the other nodes about a committed event. Never waits: a message that does not
    /// fit is dropped and its thread gets a doorbell once Redis takes messages again.
    pub fn publish_event(&self, owner: &str, thread_id: &str, seq: u64, kind: &str, frame: &str) {
        let Some(inner) = &self.inner else { return };
        let mut payload = Vec::with_capacity(frame.len() + 96);
        for part in ["E", &inner.node, thread_id, &seq.to_string(), kind] {
            payload.extend_from_slice(part.as_bytes());
            payload.push(b'\n');
        }
        payload.extend_from_slice(frame.as_bytes());
        if inner.outgoing.try_send((channel(owner), payload)).is_err() {
            metrics::counter!(metric::BROKER_MESSAGES, "outcome" => "dropped").increment(1);
            inner.missed(owner, thread_id, seq);
        }
    }

    /// Asks the node running the user's run (named by `run_id`, or in `thread_id`, or all
    /// of them) to stop it.
    pub fn publish_stop(&self, owner: &str, run_id: Option<&str>, thread_id: Option<&str>) {
        let Some(inner) = &self.inner else { return };
        let text = format!("S\n{}\n{}\n{}", inner.node, run_id.unwrap_or(""), thread_id.unwrap_or(""));
        if inner.outgoing.try_send((channel(owner), text.into_bytes())).is_err() {
            metrics::counter!(metric::BROKER_MESSAGES, "outcome" => "dropped").increment(1);
        }
    }
}

impl Inner {
    fn users(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.users.lock().expect("broker users lock is never held across a panic")
    }

    fn missed(&self, owner: &str, thread_id: &str, seq: u64) {
        let mut missed = self.missed.lock().expect("missed lock is never held across a panic");
        let now = crate::store::now_ms();
        let entry = missed.entry(thread_id.to_string()).or_insert_with(|| (owner.to_string(), seq, now));
        entry.1 = entry.1.max(seq);
    }

    fn take_missed(&self) -> Vec<(String, String, u64, i64)> {
        let mut missed = self.missed.lock().expect("missed lock is never held across a panic");
        missed.drain().map(|(thread, (owner, seq, since))| (owner, thread, seq, since)).collect()
    }
}

fn channel(user: &str) -> String {
    format!("{PREFIX}{user}")
}

/// Reads one message of another node; `None` for this node's own or a malformed one.
fn parse(me: &str, channel: &str, payload: &[u8]) -> Option<Incoming> {
    let owner = channel.strip_prefix(PREFIX)?.to_string();
    let text = std::str::from_utf8(payload).ok()?;
    let (kind, rest) = text.split_once('\n')?;
    let (node, rest) = rest.split_once('\n').unwrap_or((rest, ""));
    if node == me {
        return None;
    }
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    match kind {
        "E" => {
            let mut parts = rest.splitn(4, '\n');
            let thread_id = parts.next()?.to_string();
            let seq = parts.next()?.parse().ok()?;
            let kind = parts.next()?.to_string();
            let frame = parts.next()?.to_string();
            Some(Incoming::Event { owner, thread_id, seq, kind, frame })
        }
        "S" => {
            let (run, thread) = rest.split_once('\n').unwrap_or((rest, ""));
            Some(Incoming::Stop { owner, run_id: some(run), thread_id: some(thread) })
        }
        "G" => {
            let mut parts = rest.splitn(3, '\n');
            let thread_id = parts.next()?.to_string();
            let seq = parts.next()?.parse().ok()?;
            let since_ms = parts.next()?.parse().ok()?;
            Some(Incoming::Doorbell { owner, thread_id, seq, since_ms })
        }
        _ => None,
    }
}

/// Connects to Redis at `url` and starts the publisher and the subscriber. Returns the
/// handle and what other nodes send, for the caller to act on. Redis need not answer
/// yet: both tasks retry with backoff, and `/health` shows `broker` degraded meanwhile.
pub fn start(
    url: &str,
    node: &str,
    report: Report,
    stop: CancellationToken,
) -> Result<(Broker, mpsc::Receiver<Incoming>), redis::RedisError> {
    let client = redis::Client::open(url)?;
    let (outgoing, outgoing_rx) = mpsc::channel(OUTGOING);
    let (commands, commands_rx) = mpsc::unbounded_channel();
    let (incoming_tx, incoming) = mpsc::channel(OUTGOING);
    let inner = Arc::new(Inner {
        node: node.to_string(),
        shown: crate::config::mask_url(url),
        outgoing,
        users: Mutex::default(),
        commands,
        missed: Mutex::default(),
    });
    tokio::spawn(publisher(client.clone(), inner.clone(), outgoing_rx, report.clone(), stop.clone()));
    tokio::spawn(subscriber(client, inner.clone(), commands_rx, incoming_tx, report, stop));
    Ok((Broker { inner: Some(inner) }, incoming))
}

/// A round trip to Redis, for startup's check.
pub async fn ping(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let work = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<()>(&mut conn).await
    };
    match tokio::time::timeout(TIMEOUT, work).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("Redis at {} refused: {e}", crate::config::mask_url(url))),
        Err(_) => Err(format!("Redis at {} did not answer within {TIMEOUT:?}", crate::config::mask_url(url))),
    }
}

async fn connect(client: &redis::Client) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config =
        redis::AsyncConnectionConfig::new().set_connection_timeout(Some(TIMEOUT)).set_response_timeout(Some(TIMEOUT));
    client.get_multiplexed_async_connection_with_config(&config).await
}

/// Sends what this node publishes, many messages per round trip. While Redis is away the
/// messages are dropped (their threads remembered); once it answers, a doorbell per such
/// thread tells the other nodes to read what they missed from the store.
async fn publisher(
    client: redis::Client,
    inner: Arc<Inner>,
    mut outgoing: mpsc::Receiver<(String, Vec<u8>)>,
    report: Report,
    stop: CancellationToken,
) {
    let mut conn = None;
    let mut batch = Vec::with_capacity(512);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            n = outgoing.recv_many(&mut batch, 512) => if n == 0 { return },
            _ = tick.tick() => {}
        }
        let doorbells =
            if conn.is_some() || !batch.is_empty() || has_missed(&inner) { inner.take_missed() } else { Vec::new() };
        if batch.is_empty() && doorbells.is_empty() {
            continue;
        }
        if conn.is_none() {
            match connect(&client).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    publish_failed(&inner, &report, &e, &mut batch, doorbells);
                    continue;
                }
            }
        }
        let mut pipe = redis::pipe();
        for (channel, payload) in &batch {
            pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
        }
        for (owner, thread, seq, since) in &doorbells {
            pipe.cmd("PUBLISH")
                .arg(channel(owner))
                .arg(format!("G\n{}\n{thread}\n{seq}\n{since}", inner.node))
                .ignore();
        }
        let sent = pipe.query_async::<()>(conn.as_mut().expect("connected above")).await;
        match sent {
            Ok(()) => {
                metrics::counter!(metric::BROKER_MESSAGES, "outcome" => "published").increment(batch.len() as u64);
                batch.clear();
            }
            Err(e) => {
                conn = None;
                publish_failed(&inner, &report, &e, &mut batch, doorbells);
            }
        }
    }
}

/// A batch that could not be published: its threads get doorbells later, and health
/// says why.
fn publish_failed(
    inner: &Inner,
    report: &Report,
    e: &redis::RedisError,
    batch: &mut Vec<(String, Vec<u8>)>,
    doorbells: Vec<(String, String, u64, i64)>,
) {
    tracing::warn!(error = %e, messages = batch.len(), "publishing to Redis failed");
    lost(inner, batch, doorbells);
    report.set(COMPONENT, State::Degraded, None, Some(format!("cannot publish to Redis at {}: {e}", inner.shown)));
}

fn has_missed(inner: &Inner) -> bool {
    !inner.missed.lock().expect("missed lock is never held across a panic").is_empty()
}

/// Remembers the threads of messages that could not be sent, for their doorbells.
fn lost(inner: &Inner, batch: &mut Vec<(String, Vec<u8>)>, doorbells: Vec<(String, String, u64, i64)>) {
    metrics::counter!(metric::BROKER_MESSAGES, "outcome" => "dropped").increment(batch.len() as u64);
    for (channel, payload) in batch.drain(..) {
        let Some(owner) = channel.strip_prefix(PREFIX) else { continue };
        if let Some(Incoming::Event { thread_id, seq, .. }) = parse("", &channel, &payload) {
            inner.missed(owner, &thread_id, seq);
        }
    }
    let mut missed = inner.missed.lock().expect("missed lock is never held across a panic");
    for (owner, thread, seq, since) in doorbells {
        let entry = missed.entry(thread).or_insert((owner, seq, since));
        entry.1 = entry.1.max(seq);
        entry.2 = entry.2.min(since);
    }
}

/// Keeps this node subscribed to the channels of the users it serves, and hands what
/// other nodes send to `incoming`. On a lost connection it reconnects with backoff,
/// subscribes to every held user again, and reports how long it was away.
async fn subscriber(
    client: redis::Client,
    inner: Arc<Inner>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    incoming: mpsc::Sender<Incoming>,
    report: Report,
    stop: CancellationToken,
) {
    let mut outage_began: Option<i64> = None;
    let mut backoff = Duration::from_millis(250);
    loop {
        let connected = tokio::time::timeout(TIMEOUT, client.get_async_pubsub()).await;
        let reason = match connected {
            Ok(Ok(pubsub)) => {
                let (mut sink, mut stream) = pubsub.split();
                // Commands queued while away are covered by subscribing to everyone now.
                while commands.try_recv().is_ok() {}
                let users: Vec<String> = inner.users().keys().map(|u| channel(u)).collect();
                let subscribed = if users.is_empty() { Ok(()) } else { sink.subscribe(users).await };
                match subscribed {
                    Err(e) => format!("cannot subscribe on Redis at {}: {e}", inner.shown),
                    Ok(()) => {
                        backoff = Duration::from_millis(250);
                        report.set(COMPONENT, State::Ready, None, None);
                        if let Some(began) = outage_began.take() {
                            tracing::info!("Redis is back: filling what this node's users missed");
                            let _ = incoming.send(Incoming::Resubscribed { outage_began_ms: began }).await;
                        }
                        loop {
                            tokio::select! {
                                () = stop.cancelled() => return,
                                command = commands.recv() => {
                                    let done = match command {
                                        Some(Command::Subscribe(user)) => sink.subscribe(channel(&user)).await,
                                        Some(Command::Unsubscribe(user)) => sink.unsubscribe(channel(&user)).await,
                                        None => return,
                                    };
                                    if let Err(e) = done {
                                        break format!("a subscription on Redis at {} failed: {e}", inner.shown);
                                    }
                                }
                                message = stream.next() => {
                                    let Some(message) = message else {
                                        break format!("the connection to Redis at {} was lost", inner.shown);
                                    };
                                    let Some(parsed) = parse(&inner.node, message.get_channel_name(), message.get_payload_bytes()) else {
                                        continue;
                                    };
                                    metrics::counter!(metric::BROKER_MESSAGES, "outcome" => "received").increment(1);
                                    if incoming.send(parsed).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            Ok(Err(e)) => format!("cannot reach Redis at {}: {e}", inner.shown),
            Err(_) => format!("Redis at {} did not answer within {TIMEOUT:?}", inner.shown),
        };
        if outage_began.is_none() {
            tracing::warn!(reason = %reason, "the broker lost Redis: this node serves its own users until it is back");
            outage_began = Some(crate::store::now_ms());
        }
        report.set(COMPONENT, State::Degraded, None, Some(reason));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_of_other_nodes_are_read_and_ones_own_are_not() {
        let event = b"E\nnode-b\nth_1\n42\npartial_result\n{\"type\":\"partial_result\",\n\"x\":1}";
        assert_eq!(
            parse("node-a", "netra:user:alice", event),
            Some(Incoming::Event {
                owner: "alice".into(),
                thread_id: "th_1".into(),
                seq: 42,
                kind: "partial_result".into(),
                frame: "{\"type\":\"partial_result\",\n\"x\":1}".into(),
            })
        );
        assert_eq!(parse("node-b", "netra:user:alice", event), None, "its own");
        assert_eq!(
            parse("node-a", "netra:user:alice", b"S\nnode-b\n\nth_1"),
            Some(Incoming::Stop { owner: "alice".into(), run_id: None, thread_id: Some("th_1".into()) })
        );
        assert_eq!(
            parse("node-a", "netra:user:bob", b"G\nnode-b\nth_2\n7\n1700000000000"),
            Some(Incoming::Doorbell {
                owner: "bob".into(),
                thread_id: "th_2".into(),
                seq: 7,
                since_ms: 1_700_000_000_000
            })
        );
        for bad in [&b"E\nnode-b\nth_1\nnot-a-number\nk\n{}"[..], b"X\nnode-b", b"", b"\xff\xfe"] {
            assert_eq!(parse("node-a", "netra:user:alice", bad), None);
        }
        assert_eq!(parse("node-a", "elsewhere", event), None);
    }
}
