//! Subcommands: `serve`, `check`, `token`, `chat`, `migrate`, `stats`. `anyhow` lives here only.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use netra::auth::{Keys, TokenKind, User};
use netra::client::{Auth, Client, ClientError};
use netra::config::{self, Config};

#[derive(Parser)]
#[command(name = "netra", version, about = "Real-time AI chat backend")]
struct Cli {
    /// A TOML file of settings (keys: the variable names, lower-case, without NETRA_).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve,
    /// Print the resolved configuration (secrets redacted), or every problem with it.
    Check,
    /// Print an access token for a user, signed with the server's secret.
    Token {
        #[arg(long)]
        user: String,
        #[arg(long)]
        email: Option<String>,
        /// A permission the token carries; repeat for more (`admin` opens /api/admin/*).
        #[arg(long = "permission")]
        permissions: Vec<String>,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
    },
    /// A terminal chat client: reads lines from stdin, prints the streamed run.
    Chat {
        /// Server WebSocket URL; defaults to the configured HOST and PORT.
        #[arg(long)]
        url: Option<String>,
        /// Token to use; by default one is minted for --user with the local secret.
        #[arg(long)]
        token: Option<String>,
        #[arg(long, default_value = "cli-user")]
        user: String,
        /// Continue this thread instead of starting a new one.
        #[arg(long)]
        thread: Option<String>,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Print analytics from ClickHouse (CLICKHOUSE_URL): runs per hour, time to first
    /// token, errors by code, top users.
    Stats {
        /// Hours back from now.
        #[arg(long, default_value_t = 24)]
        hours: u32,
        /// Print the report as JSON (the shape of GET /api/admin/stats).
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match config::from_process(cli.config.as_deref()) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!(
                "netra: invalid configuration ({} problem{}):",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" }
            );
            for e in &errors {
                eprintln!("  {e}");
            }
            return ExitCode::from(2);
        }
    };
    if let Command::Check = cli.command {
        print_config(&config);
        return ExitCode::SUCCESS;
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let workers = config.worker_threads(cores);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("netra: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve => serve(config).await,
            Command::Check => unreachable!("handled above"),
            Command::Token { user, email, permissions, ttl } => token(&config, user, email, permissions, ttl.into()),
            Command::Chat { url, token, user, thread } => chat(&config, url, token, user, thread).await,
            Command::Migrate => migrate(&config).await,
            Command::Stats { hours, json } => stats(&config, hours, json).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netra: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn print_config(config: &Config) {
    println!("configuration is valid");
    println!("{config:#?}");
}

async fn serve(config: Config) -> anyhow::Result<()> {
    netra::telemetry::init_logging(&config.log_filter, config.log_format);
    netra::raise_open_file_limit();
    let addr = SocketAddr::new(config.host, config.port);
    let listener = netra::bind(addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "port {} is already in use on {}; stop the other process or set PORT",
                config.port,
                config.host
            )
        } else {
            anyhow::anyhow!("cannot listen on {addr}: {e}")
        }
    })?;
    let bound = listener.local_addr().context("while reading the bound address")?;
    // Not `println!`: a closed stdout must not stop the server.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "listening on http://{bound}").and_then(|()| stdout.flush());
    match netra::serve(config, listener, shutdown_signal()).await {
        Ok(()) => Ok(()),
        Err(netra::ServeError::Startup(failure)) => {
            eprintln!("netra: startup failed");
            eprintln!("  {failure}");
            Err(anyhow::anyhow!("startup failed at component {}", failure.component))
        }
        Err(e) => Err(e.into()),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

fn keys(config: &Config) -> anyhow::Result<Keys> {
    let secret = match &config.jwt_secret {
        Some(s) => s.clone(),
        None => netra::auth::dev_secret(&config.data_dir)
            .with_context(|| format!("while reading the development secret in {}", config.data_dir.display()))?,
    };
    Ok(Keys::new(&secret))
}

fn token(
    config: &Config,
    user: String,
    email: Option<String>,
    permissions: Vec<String>,
    ttl: Duration,
) -> anyhow::Result<()> {
    let mut u = User::new(user);
    u.email = email;
    u.permissions = permissions;
    println!("{}", keys(config)?.mint(&u, TokenKind::Access, ttl));
    Ok(())
}

async fn migrate(config: &Config) -> anyhow::Result<()> {
    netra::store::Store::connect(&config.database, config.db_timeout)
        .await
        .with_context(|| format!("while migrating {}", config.database.masked()))?;
    println!("database {} is up to date", config.database.masked());
    Ok(())
}

async fn stats(config: &Config, hours: u32, json: bool) -> anyhow::Result<()> {
    let Some(settings) = &config.analytics else {
        anyhow::bail!("analytics is off: set CLICKHOUSE_URL (and CLICKHOUSE_USER, CLICKHOUSE_PASSWORD) to read it");
    };
    if !(1..=netra::analytics::stats::MAX_HOURS).contains(&hours) {
        anyhow::bail!("--hours must be from 1 to {}", netra::analytics::stats::MAX_HOURS);
    }
    let client = netra::analytics::Client::new(settings)?;
    let report = netra::analytics::stats::collect(&client, hours).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", netra::analytics::stats::render(&report));
    }
    Ok(())
}

async fn chat(
    config: &Config,
    url: Option<String>,
    token: Option<String>,
    user: String,
    thread: Option<String>,
) -> anyhow::Result<()> {
    let url = url.unwrap_or_else(|| {
        let host = if config.host.is_unspecified() { "127.0.0.1".to_string() } else { config.host.to_string() };
        format!("ws://{host}:{}/ws", config.port)
    });
    let token = match token {
        Some(t) => t,
        None => keys(config)?.mint(&User::new(user), TokenKind::Access, Duration::from_secs(3600)),
    };
    let mut ws =
        Client::open(&url, &Auth::Header(token)).await.with_context(|| format!("while connecting to {url}"))?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut thread_id = thread;
    let mut pending = 0usize;
    let mut stdin_open = true;
    let mut streamed = false;
    eprintln!("connected to {url}; type a message and press enter (Ctrl-D to quit)");
    loop {
        if !stdin_open && pending == 0 {
            ws.close().await;
            return Ok(());
        }
        tokio::select! {
            line = lines.next_line(), if stdin_open && pending == 0 => {
                match line? {
                    None => stdin_open = false,
                    Some(l) if l.trim().is_empty() => {}
                    Some(l) => {
                        let frame = json!({"type": "user_message", "payload": {"content": l, "thread_id": thread_id}});
                        ws.send(&frame).await?;
                        pending += 1;
                    }
                }
            }
            frame = ws.next_frame() => {
                let v = match frame {
                    Ok(v) => v,
                    Err(ClientError::Closed(c)) => anyhow::bail!("the server closed the connection: {} {:?}", c.code, c.reason),
                    Err(e) => anyhow::bail!("connection error: {e}"),
                };
                if let Some(t) = v["thread_id"].as_str() {
                    thread_id = Some(t.to_string());
                }
                let ended = print_frame(&v, &mut streamed);
                if ended {
                    pending = pending.saturating_sub(1);
                }
            }
        }
    }
}

/// Prints one frame readably; returns true when it ends a run.
fn print_frame(v: &Value, streamed: &mut bool) -> bool {
    let p = &v["payload"];
    let mut out = std::io::stdout();
    let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
    match v["type"].as_str().unwrap_or_default() {
        "thread_created" => println!("[thread {} created: {}]", s("thread_id"), s("title")),
        "agent_started" => {
            *streamed = false;
            println!("[agent started]");
        }
        "agent_thinking" => println!("… {}", s("reasoning")),
        "tool_executing" => println!("⚙ {} {}", s("tool_name"), p["parameters"]),
        "tool_completed" => println!("✓ {} → {}", s("tool_name"), p["result"]),
        "partial_result" => {
            print!("{}", s("content"));
            *streamed = true;
            let _ = out.flush();
        }
        "agent_completed" => {
            if *streamed {
                println!();
            }
            let status = s("status");
            println!("[{status} in {} ms]", p["execution_time_ms"]);
            return status == "cancelled";
        }
        "final_report" => {
            if !*streamed {
                println!("{}", s("executive_summary"));
            }
            return true;
        }
        "error" => {
            println!("! {}: {}", s("code"), s("error_message"));
            return true;
        }
        _ => {}
    }
    false
}
