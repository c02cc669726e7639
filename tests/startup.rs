//! Startup: configuration checked before anything starts, a clear error for a busy port,
//! connections that arrive while a slow database comes up, a required component that never
//! does, and the startup report. Slow and dead databases are real TCP servers in the test.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Auth, Client, Closed, Spawn, WAIT, types, unique};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::watch;

const POSTGRES: &str = "127.0.0.1:5432";

/// Runs the binary with exactly `env` (nothing inherited) and returns its output.
async fn netra(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netra"));
    cmd.args(args).env_clear().stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn netra");
    tokio::time::timeout(WAIT, child.wait_with_output()).await.expect("netra finishes in time").expect("output")
}

/// A proxy to the real PostgreSQL that holds every connection until `gate` opens, then
/// forwards bytes both ways. Returns its port.
async fn gated_postgres_proxy(gate: watch::Receiver<bool>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let port = listener.local_addr().expect("proxy addr").port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let mut gate = gate.clone();
            tokio::spawn(async move {
                if gate.wait_for(|open| *open).await.is_err() {
                    return;
                }
                let Ok(mut upstream) = TcpStream::connect(POSTGRES).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await;
            });
        }
    });
    port
}

/// A TCP server that accepts and never says a word, keeping every socket open.
async fn silent_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind silent server");
    let port = listener.local_addr().expect("silent addr").port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    port
}

async fn status_of(http: &reqwest::Client, url: String) -> u16 {
    http.get(url).send().await.expect("probe answers").status().as_u16()
}

#[tokio::test]
async fn netra_check_lists_every_bad_variable_and_redacts_secrets() {
    let bad =
        netra(&["check"], &[("PORT", "eighty"), ("NETRA_MAX_FRAME_BYTES", "10"), ("NETRA_RUN_DEADLINE", "10m")]).await;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "stderr:\n{stderr}");
    for var in ["PORT", "NETRA_MAX_FRAME_BYTES", "NETRA_RUN_DEADLINE"] {
        assert!(
            stderr.lines().any(|l| l.trim_start().starts_with(var)),
            "{var} is not listed on a line of its own:\n{stderr}"
        );
    }
    assert!(stderr.contains("eighty"), "the offending value is shown:\n{stderr}");

    let secret = "check-secret-value-0123456789";
    let good = netra(
        &["check"],
        &[
            ("PORT", "8123"),
            ("JWT_SECRET", secret),
            ("DATABASE_URL", "postgres://netra:hunter2pass@127.0.0.1:5432/test"),
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&good.stdout);
    let stderr = String::from_utf8_lossy(&good.stderr);
    assert_eq!(good.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("8123"), "the resolved config is printed:\n{stdout}");
    assert!(stdout.contains("postgres://netra:***@127.0.0.1:5432/test"), "password masked:\n{stdout}");
    for leaked in [secret, "hunter2pass"] {
        assert!(!stdout.contains(leaked) && !stderr.contains(leaked), "{leaked} leaked:\n{stdout}\n{stderr}");
    }
}

#[tokio::test]
async fn a_port_in_use_fails_fast_naming_the_port() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().display().to_string();
    let began = Instant::now();
    let out = netra(
        &["serve"],
        &[("HOST", "127.0.0.1"), ("PORT", &port), ("NETRA_DATA_DIR", &data_dir), ("JWT_SECRET", &unique("secret"))],
    )
    .await;
    let elapsed = began.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "serve on a busy port must fail; stderr:\n{stderr}");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?} to fail");
    assert!(!stdout.contains("listening on"), "{stdout}");
    assert!(stderr.contains(&port), "the port {port} is named:\n{stderr}");
    assert!(stderr.contains("in use"), "says it is in use:\n{stderr}");
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_during_slow_startup_waits_then_chats() {
    let began = Instant::now();
    let (open_gate, gate) = watch::channel(false);
    let proxy = gated_postgres_proxy(gate).await;
    let mut server =
        Spawn::new().env("DATABASE_URL", format!("postgres://postgres@127.0.0.1:{proxy}/test")).start().await;
    let http = reqwest::Client::new();

    // The database is held: the process is alive but not ready.
    assert_eq!(status_of(&http, server.http("/health/live")).await, 200);
    assert_eq!(status_of(&http, server.http("/health/ready")).await, 503);
    // The store gets as far as "starting" and stays there while the database is held.
    let deadline = Instant::now() + WAIT;
    loop {
        let report: Value =
            http.get(server.http("/health/startup")).send().await.expect("startup").json().await.expect("json");
        assert_eq!(report["complete"], json!(false), "{report}");
        let store = report["components"].as_array().expect("components").iter().find(|c| c["name"] == "store");
        if store.is_some_and(|c| c["state"] == "starting") {
            break;
        }
        assert!(Instant::now() < deadline, "the store never reported starting: {report}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The upgrade is accepted at once; the socket then waits for startup.
    let mut tab = Client::open(&server.ws_url(), Auth::Header(server.token("early-bird"))).await.expect("upgrade");

    // The database answers ~1.5 s after the test began.
    tokio::time::sleep_until((began + Duration::from_millis(1500)).into()).await;
    open_gate.send_replace(true);

    let hello = match tab.next_or_close().await {
        Ok(v) => v,
        Err(closed) => panic!("closed {closed:?} instead of connection_established; stderr:\n{}", server.stderr()),
    };
    assert_eq!(hello["payload"]["event"], "connection_established", "{hello}");
    server.wait_ready().await;
    let frames = tab.chat("what is 12 * (3 + 4)?", None).await;
    let kinds = types(&frames);
    assert_eq!(kinds.last().map(String::as_str), Some("final_report"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "agent_started"), "{kinds:?}");
    common::assert_dense(&frames);
    assert_eq!(frames[0]["seq"], json!(1), "a new thread starts at seq 1");

    drop(tab);
    server.signal("TERM");
    assert_eq!(server.wait_exit().await, Some(0), "stderr:\n{}", server.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_never_answers_closes_waiting_sockets_1011_and_exits_1() {
    let silent = silent_server().await;
    let mut server = Spawn::new()
        .env("DATABASE_URL", format!("postgres://postgres@127.0.0.1:{silent}/test"))
        .env("NETRA_STARTUP_WAIT", "1s")
        .env("NETRA_DB_TIMEOUT", "2s")
        .start()
        .await;
    let began = Instant::now();
    let mut tab = Client::open(&server.ws_url(), Auth::Header(server.token("too-early"))).await.expect("upgrade");
    let closed = tab.next_or_close().await.expect_err("no frame before the close");
    let waited = began.elapsed();
    assert_eq!(closed, Closed { code: 1011, reason: "service startup incomplete".into() });
    assert!(waited >= Duration::from_secs(1), "closed after {waited:?}, before NETRA_STARTUP_WAIT");
    assert!(waited < Duration::from_millis(1900), "closed after {waited:?}: not by the 1 s startup wait");

    assert_eq!(server.wait_exit().await, Some(1));
    let stderr = server.stderr();
    assert!(
        stderr.lines().any(|l| l.contains("component store") && l.contains("gateway")),
        "one line names the failed component and its dependents:\n{stderr}"
    );
}

#[tokio::test]
async fn the_startup_report_lists_every_component_ready_with_its_duration() {
    let server = Spawn::new().ready().await;
    let http = reqwest::Client::new();
    let ready = http.get(server.http("/health/ready")).send().await.expect("ready");
    assert_eq!(ready.status(), 200);
    let response = http.get(server.http("/health/startup")).send().await.expect("startup");
    assert_eq!(response.status(), 200);
    let report: Value = response.json().await.expect("json");
    assert_eq!(report["complete"], json!(true), "{report}");
    let components = report["components"].as_array().expect("components");
    for c in components {
        assert_eq!(c["state"], "ready", "{c}");
        assert!(c["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "no duration: {c}");
    }
    let names: Vec<&str> = components.iter().filter_map(|c| c["name"].as_str()).collect();
    for n in ["store", "auth", "delivery", "agent_supervisor", "gateway", "self_test"] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
}

#[tokio::test]
async fn time_to_ready_is_measured_over_five_starts() {
    let mut times = Vec::new();
    for _ in 0..5 {
        let began = Instant::now();
        let server = Spawn::new().start().await;
        server.wait_ready().await;
        times.push(began.elapsed());
        drop(server);
    }
    let ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1000.0).collect();
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    eprintln!("spawn to first 200 on /health/ready (ms): {ms:.1?}, mean {mean:.1}");
}

/// The self-test's thread, run and events are removed once the server is ready (after
/// readiness is told, off the startup path): the database holds only what users wrote.
#[tokio::test]
async fn the_self_test_leaves_nothing_in_the_database() {
    use sqlx::Connection as _;
    let pg = common::fresh_pg_url().await;
    let _server = Spawn::new().env("DATABASE_URL", pg.clone()).ready().await;
    let mut conn = sqlx::PgConnection::connect(&pg).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rows: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM threads) + (SELECT count(*) FROM runs) + (SELECT count(*) FROM events)",
        )
        .fetch_one(&mut conn)
        .await
        .expect("count");
        if rows == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{rows} rows of the self-test are still there");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
