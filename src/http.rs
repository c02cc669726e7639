//! The HTTP/1 server under the router. A connection must send its request's headers
//! within `NETRA_HEADER_TIMEOUT`, and a keep-alive connection may idle no longer than that
//! between requests; at most `NETRA_MAX_PENDING_CONNECTIONS` may wait for their first
//! request at once. A connection accepted past that closes the one that has waited
//! longest: a slowloris then only ever holds the newest slots, and a client that sends
//! its request at once still gets in. `axum::serve` offers none of
//! this, so a client sending nothing, or a header a byte a second, held a descriptor for
//! good. WebSocket upgrades leave hyper here and live under the gateway's own timeouts.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::telemetry::metric;

/// Connections accepted that have not sent a request yet, oldest first.
struct Pending {
    limit: usize,
    waiting: Mutex<(u64, VecDeque<(u64, CancellationToken)>)>,
}

/// A connection's place among the pending; leaving it (first request, or the connection
/// ending) frees the place.
struct Slot {
    pending: Arc<Pending>,
    id: u64,
}

impl Pending {
    /// Takes a place, closing the longest-waiting connection when all are taken.
    fn admit(self: &Arc<Self>) -> (Slot, CancellationToken) {
        let mut waiting = self.waiting.lock().expect("pending lock is never held across a panic");
        if waiting.1.len() >= self.limit
            && let Some((_, oldest)) = waiting.1.pop_front()
        {
            oldest.cancel();
            metrics::counter!(metric::HTTP_SHED).increment(1);
        }
        waiting.0 += 1;
        let (id, evict) = (waiting.0, CancellationToken::new());
        waiting.1.push_back((id, evict.clone()));
        (Slot { pending: self.clone(), id }, evict)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut waiting = self.pending.waiting.lock().expect("pending lock is never held across a panic");
        waiting.1.retain(|(id, _)| *id != self.id);
    }
}

/// Serves `router` on `listener` until `stop`, then lets requests in flight finish.
pub(crate) async fn serve(mut listener: TcpListener, router: Router, limits: &Limits, stop: CancellationToken) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let pending = Arc::new(Pending { limit: limits.max_pending_connections, waiting: Mutex::default() });
    let connections = TaskTracker::new();
    loop {
        // axum's accept retries on its own after errors such as running out of descriptors.
        let (tcp, _peer) = tokio::select! {
            accepted = Listener::accept(&mut listener) => accepted,
            () = stop.cancelled() => break,
        };
        let _ = tcp.set_nodelay(true);
        // Held until the first request's headers are read: then the connection is no
        // longer pending, and the header timeout still bounds its idling.
        let (slot, evicted) = pending.admit();
        let slot = Mutex::new(Some(slot));
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            slot.lock().map(|mut s| s.take()).ok();
            tower::ServiceExt::oneshot(router.clone(), request)
        });
        let connection = http.serve_connection(TokioIo::new(tcp), service).with_upgrades();
        let stop = stop.clone();
        connections.spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                // Still pending when a newer connection needed the place: dropped, closed.
                () = evicted.cancelled() => return,
                () = stop.cancelled() => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
        });
    }
    connections.close();
    connections.wait().await;
}

/// Raises the soft limit on open descriptors to the hard limit: each socket is one, and
/// distributions often start services at 1024.
pub fn raise_open_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        tracing::info!(limit = ?limit.current, "open-file limit");
        return;
    }
    match setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum }) {
        Ok(()) => tracing::info!(from = ?limit.current, to = ?limit.maximum, "raised the open-file limit"),
        Err(e) => tracing::warn!(error = %e, limit = ?limit.current, "could not raise the open-file limit"),
    }
}
