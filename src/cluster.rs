//! The nodes of a cluster and who closes a dead node's runs. Each node has an id
//! (`NETRA_NODE_ID`, else one generated once into the data dir) that its runs record. On a
//! shared PostgreSQL every node renews a lease (its row in `nodes`) every third of
//! `NETRA_NODE_LEASE`; every node also sweeps for runs still `running` whose node's lease
//! has run out, takes each over with one conditional update (so exactly one node ends a
//! run), and ends it `interrupted`, which its tabs see like any other ending. A node that
//! restarts with its id ends its own leftovers at start (the agent supervisor). On SQLite
//! there is one node: no lease, no sweep.

use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::agent::Supervisor;
use crate::store::Store;

/// The file in the data dir holding a generated node id.
const NODE_ID_FILE: &str = "node_id";

/// This node's id: the configured one, else the one in the data dir (made on first
/// start), else the host's name when the data dir cannot hold it.
pub fn node_id(configured: Option<&str>, data_dir: &Path) -> String {
    if let Some(id) = configured {
        return id.to_string();
    }
    let path = data_dir.join(NODE_ID_FILE);
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return id.to_string();
        }
    }
    let generated = format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let written = std::fs::create_dir_all(data_dir).and_then(|()| std::fs::write(&path, format!("{generated}\n")));
    match written {
        Ok(()) => generated,
        Err(e) => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let host = host.trim();
            let id = if host.is_empty() { generated } else { host.to_string() };
            tracing::warn!(error = %e, path = %path.display(), node_id = %id, "cannot keep a node id in the data dir");
            id
        }
    }
}

/// Renews this node's lease and ends the runs of nodes whose lease ran out, until `stop`.
pub async fn keep_lease(store: Store, supervisor: Supervisor, node: String, lease: Duration, stop: CancellationToken) {
    let period = lease / 3;
    loop {
        let now = crate::store::now_ms();
        if let Err(e) = store.renew_lease(&node, now).await {
            tracing::warn!(error = %e, "could not renew this node's lease");
        }
        let expired = now - i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        match supervisor.close_orphaned_runs(expired).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(runs = n, "ended runs of nodes that are gone"),
            Err(e) => tracing::warn!(error = %e, "could not sweep for runs of nodes that are gone"),
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(period) => {}
        }
    }
    if let Err(e) = store.release_lease(&node).await {
        tracing::debug!(error = %e, "could not release this node's lease");
    }
}
