//! Three nodes behind a real nginx (Debian's, round-robin, no stickiness), on one
//! PostgreSQL and one Redis: two tabs of one user land on two nodes and each sees every
//! run of the other, in order and once; `stop_agent` reaches the node running the run;
//! SIGTERM of a tab's node mid-run sends the tab through nginx to another node, where it
//! resumes by `seq` with no gap; SIGKILL of a node ends its run `interrupted` within the
//! lease.
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Auth, Client, Redis, Server, Spawn, assert_dense, fresh_pg_url, unique};
use serde_json::{Value, json};

/// nginx in front of `ports`, listening on a free port of its own.
struct Nginx {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl Nginx {
    async fn start(ports: &[u16]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let path = dir.path().display();
        let servers: String =
            ports.iter().map(|p| format!("        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;\n")).collect();
        let conf = format!(
            "user root;\nworker_processes 1;\npid {path}/nginx.pid;\nerror_log {path}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n    access_log off;\n\
                 client_body_temp_path {path}/body;\n    proxy_temp_path {path}/proxy;\n\
                 fastcgi_temp_path {path}/fastcgi;\n    uwsgi_temp_path {path}/uwsgi;\n    scgi_temp_path {path}/scgi;\n\
                 map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}\n\
                 upstream netra {{\n{servers}    }}\n\
                 server {{\n        listen 127.0.0.1:{port};\n        location / {{\n\
                     proxy_pass http://netra;\n            proxy_http_version 1.1;\n\
                     proxy_set_header Upgrade $http_upgrade;\n            proxy_set_header Connection $connection_upgrade;\n\
                     proxy_set_header Host $host;\n            proxy_read_timeout 3600s;\n\
                     proxy_next_upstream error timeout http_502 http_503;\n        }}\n    }}\n}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let nginx = if std::path::Path::new("/usr/sbin/nginx").exists() { "/usr/sbin/nginx" } else { "nginx" };
        let child = Command::new(nginx)
            .args(["-c", &conf_path.display().to_string(), "-p", &path.to_string(), "-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (Debian's nginx-light; scripts/test installs it)");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "nginx did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { dir, port, child }
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

struct Cluster {
    nodes: Vec<Server>,
    nginx: Nginx,
    _redis: Redis,
}

impl Cluster {
    async fn start(delay: &str) -> Self {
        let redis = Redis::start().await;
        let pg = fresh_pg_url().await;
        let secret = unique("lb-secret");
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let node = Spawn::new()
                .secret(&secret)
                .env("DATABASE_URL", &pg)
                .env("REDIS_URL", redis.url())
                .env("NETRA_NODE_LEASE", "3s")
                .env("NETRA_AGENT_TOKEN_DELAY", delay)
                .ready()
                .await;
            nodes.push(node);
        }
        let ports: Vec<u16> = nodes.iter().map(|n| n.addr.port()).collect();
        let nginx = Nginx::start(&ports).await;
        Self { nodes, nginx, _redis: redis }
    }

    /// A tab of `user` through nginx.
    async fn tab(&self, user: &str) -> Client {
        let token = self.nodes[0].token(user);
        let mut client = Client::open(&self.nginx.ws_url(), Auth::Header(token)).await.expect("through nginx");
        let hello = client.next().await;
        assert_eq!(hello["payload"]["event"], "connection_established");
        client
    }

    /// Which node holds how many sockets, by `netra_ws_connections`.
    async fn sockets(&self) -> Vec<u64> {
        let mut counts = Vec::new();
        for node in &self.nodes {
            counts.push(sockets_on(node).await);
        }
        counts
    }
}

async fn sockets_on(node: &Server) -> u64 {
    let Ok(response) = reqwest::get(node.http("/metrics")).await else { return 0 };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("netra_ws_connections "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Opens tabs until one lands on a node other than the first tab's; returns both and
/// the index of each tab's node. Round-robin makes the second tab the one, normally.
async fn two_tabs_on_two_nodes(cluster: &Cluster, user: &str) -> (Client, usize, Client, usize) {
    let before = cluster.sockets().await;
    let first = cluster.tab(user).await;
    let after = cluster.sockets().await;
    let a = (0..3).find(|&i| after[i] > before[i]).expect("the first tab is on some node");
    let second = cluster.tab(user).await;
    let now = cluster.sockets().await;
    let b = (0..3).find(|&i| now[i] > after[i]).expect("the second tab is on some node");
    assert_ne!(a, b, "round-robin puts two tabs on two nodes: {before:?} {after:?} {now:?}");
    // Subscriptions to the user's channel are asynchronous.
    tokio::time::sleep(Duration::from_millis(200)).await;
    (first, a, second, b)
}

fn run_frames(frames: &[Value], run_id: &str) -> Vec<Value> {
    frames.iter().filter(|f| f["run_id"] == run_id).cloned().collect()
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().filter_map(|f| f["seq"].as_u64()).collect()
}

#[tokio::test]
async fn two_tabs_on_two_nodes_see_each_others_runs_and_stop_them() {
    let cluster = Cluster::start("0ms").await;
    let user = unique("hana");
    let (mut tab1, _, mut tab2, _) = two_tabs_on_two_nodes(&cluster, &user).await;

    let sent = tab2.chat("what is 12 * (3 + 4)?", None).await;
    let run_id = sent.last().expect("frames")["run_id"].as_str().expect("run").to_string();
    let seen = tab1.until(|f| f["run_id"] == run_id.as_str() && common::ends_run(f)).await;
    let (sent, seen) = (run_frames(&sent, &run_id), run_frames(&seen, &run_id));
    assert_eq!(seqs(&seen), seqs(&sent), "the other tab sees the whole run, in order, once");
    assert_dense(&seen);
    tab1.expect_silence(Duration::from_millis(300)).await;
    drop((tab1, tab2));

    // A slow run, stopped from the tab on the other node.
    let slow = Cluster::start("300ms").await;
    let user = unique("ivo");
    let (mut tab1, _, mut tab2, _) = two_tabs_on_two_nodes(&slow, &user).await;
    tab2.send(json!({"type": "user_message", "payload": {"content": "tell me a long story"}})).await;
    let started = tab1.until(|f| f["type"] == "agent_started").await;
    let run_id = started.last().expect("frame")["run_id"].as_str().expect("run").to_string();
    tab1.send(json!({"type": "stop_agent", "payload": {"run_id": run_id}})).await;
    let ended = tab2.until(|f| f["run_id"] == run_id.as_str() && common::ends_run(f)).await;
    assert_eq!(ended.last().expect("frame")["payload"]["status"], "cancelled");
}

#[tokio::test]
async fn sigterm_of_a_tabs_node_mid_run_resumes_it_on_another_node_with_no_gap() {
    let mut cluster = Cluster::start("150ms").await;
    let user = unique("jo");
    let (mut tab1, _, mut tab2, b) = two_tabs_on_two_nodes(&cluster, &user).await;
    // The run is on tab 1's node; tab 2's node is stopped while it streams.
    tab1.send(json!({"type": "user_message", "payload": {"content": "please explain the tides in detail"}})).await;
    let started = tab2.until(|f| f["type"] == "partial_result").await;
    let run_id = started.last().expect("frame")["run_id"].as_str().expect("run").to_string();
    let thread_id = started.last().expect("frame")["thread_id"].as_str().expect("thread").to_string();
    cluster.nodes[b].signal("TERM");
    let (more, closed) = tab2.until_close().await;
    assert_eq!(closed.code, 1012, "{closed:?}");
    let mut before: Vec<Value> = run_frames(&started, &run_id);
    before.extend(run_frames(&more, &run_id));
    let last = seqs(&before).into_iter().max().expect("some seq");
    assert_eq!(cluster.nodes[b].wait_exit().await, Some(0));

    // Through nginx again: another node, the same thread, from the last seq seen.
    let mut again = cluster.tab(&user).await;
    again.send(json!({"type": "subscribe", "payload": {"thread_id": thread_id, "after_seq": last}})).await;
    let rest = again.until(|f| f["run_id"] == run_id.as_str() && common::ends_run(f)).await;
    let mut all = before;
    all.extend(run_frames(&rest, &run_id));
    assert_dense(&all);
    assert_eq!(all.last().expect("frame")["type"], "final_report");
    again.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn sigkill_of_the_node_running_a_run_ends_it_interrupted_within_the_lease() {
    let cluster = Cluster::start("400ms").await;
    let user = unique("kai");
    let (mut tab1, a, mut tab2, _) = two_tabs_on_two_nodes(&cluster, &user).await;
    // The run is on tab 1's node, which is killed.
    tab1.send(json!({"type": "user_message", "payload": {"content": "describe the moon at length"}})).await;
    let started = tab2.until(|f| f["type"] == "agent_started").await;
    let run_id = started.last().expect("frame")["run_id"].as_str().expect("run").to_string();
    cluster.nodes[a].signal("KILL");
    let killed = std::time::Instant::now();
    let ending = tab2.until(|f| f["run_id"] == run_id.as_str() && f["type"] == "error").await;
    assert_eq!(ending.last().expect("frame")["payload"]["reason"], "interrupted");
    let waited = killed.elapsed();
    // A 3 s lease, swept every second: ended within 3 to 5 s, never sooner than the lease.
    assert!(waited < Duration::from_secs(8), "ended {waited:?} after the kill");
    assert_dense(&run_frames(&ending, &run_id));
}
