//! netra: a real-time AI chat backend in one binary.
//!
//! [`serve`] is the one entry point, used by the binary and by tests alike: it takes a
//! bound listener and a shutdown future, answers health probes from the first
//! millisecond, builds every service through the startup graph, publishes the finished
//! [`App`] once, and on shutdown drains runs and closes sockets with 1012. Nothing builds
//! a service after startup: handlers only ever read the immutable `App`.

pub mod agent;
pub mod analytics;
pub mod auth;
pub mod broker;
pub mod client;
pub mod cluster;
pub mod config;
pub mod delivery;
mod gateway;
mod health;
mod http;
pub use http::raise_open_file_limit;
pub mod protocol;
mod rate;
mod selftest;
pub mod startup;
pub mod store;
pub mod telemetry;
mod web;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::{Builtin, OpenAi, Provider, Providers, Supervisor};
use crate::analytics::Analytics;
use crate::auth::Keys;
use crate::config::{Config, LlmProvider};
use crate::delivery::{CloseReason, Delivery};
use crate::startup::{Component, Criticality, Report, State};
use crate::store::Store;

/// Every service, fully built. Immutable once published.
pub struct App {
    pub config: Arc<Config>,
    pub keys: Keys,
    pub store: Store,
    pub delivery: Delivery,
    pub supervisor: Supervisor,
    /// Where runs, sessions and errors are recorded; off unless `CLICKHOUSE_URL` is set.
    pub analytics: Analytics,
    /// Answers operators' questions from ClickHouse, when analytics is on.
    pub clickhouse: Option<analytics::Client>,
    /// Short tasks spawned on behalf of connections (replays).
    pub tasks: TaskTracker,
    /// The rate limit of the REST routes that start runs, per user.
    pub(crate) run_rates: rate::UserRates,
}

/// What the HTTP layer holds from the first millisecond, before the `App` exists.
pub(crate) struct Shared {
    config: Arc<Config>,
    report: Report,
    app: watch::Sender<Option<Arc<App>>>,
    draining: AtomicBool,
    /// One token per open WebSocket session, so shutdown can wait for their closes.
    connections: TaskTracker,
    metrics: PrometheusHandle,
}

impl Shared {
    /// The app, once startup has built it, waiting at most `NETRA_STARTUP_WAIT`.
    async fn wait_for_app(&self) -> Option<Arc<App>> {
        let mut rx = self.app.subscribe();
        let wait = rx.wait_for(Option::is_some);
        match tokio::time::timeout(self.config.startup_wait, wait).await {
            Ok(Ok(app)) => app.clone(),
            _ => None,
        }
    }

    fn app_now(&self) -> Option<Arc<App>> {
        self.app.borrow().clone()
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Why the server is not ready, or nothing when it is.
    fn unready_reasons(&self) -> Vec<String> {
        let mut reasons = self.report.not_ready();
        if !self.report.snapshot().complete && reasons.is_empty() {
            reasons.push("startup in progress".into());
        }
        if self.is_draining() {
            reasons.push("shutting down".into());
        }
        reasons
    }
}

/// Why `serve` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("startup failed: {0}")]
    Startup(#[from] startup::StartupFailure),
    #[error("http server failed: {0}")]
    Http(#[source] std::io::Error),
    #[error(transparent)]
    Provider(#[from] agent::ClientError),
    #[error("analytics: {0}")]
    Analytics(String),
    #[error("broker: {0}")]
    Broker(String),
}

/// Binds `host:port` with a listen backlog that survives a connection storm (the
/// default of 128 overflows into 1 s SYN retransmits).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

#[derive(Default)]
struct Parts {
    store: OnceLock<Store>,
    keys: OnceLock<Keys>,
    provider: OnceLock<Provider>,
    delivery: OnceLock<Delivery>,
    supervisor: OnceLock<Supervisor>,
    analytics: Analytics,
    clickhouse: Option<analytics::Client>,
    broker: broker::Broker,
}

fn part<T: Clone>(slot: &OnceLock<T>, name: &str) -> T {
    slot.get().unwrap_or_else(|| panic!("{name} is a declared dependency, so it is set before this runs")).clone()
}

/// Runs netra on `listener` until `shutdown` resolves.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let begun = Instant::now();
    let node_id = cluster::node_id(config.node_id.as_deref(), &config.data_dir);
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(node_id = %node_id, workers, "this node");
    let config = Arc::new(config);
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    let (app_tx, _) = watch::channel(None);
    let shared = Arc::new(Shared {
        config: config.clone(),
        report: Report::default(),
        app: app_tx,
        draining: AtomicBool::new(false),
        connections: TaskTracker::new(),
        metrics: telemetry::init_metrics(),
    });

    let background = CancellationToken::new();
    let writers = TaskTracker::new();
    // The sink runs from the first millisecond: rows wait in its spool while ClickHouse
    // is away, whatever startup found.
    let (analytics, clickhouse, sink) = match &config.analytics {
        Some(settings) => {
            let client = analytics::Client::new(settings).map_err(|e| ServeError::Analytics(e.to_string()))?;
            let (handle, sink) = analytics::start(settings, client.clone(), &node_id, shared.report.clone());
            (handle, Some(client), Some(sink))
        }
        None => (Analytics::off(), None, None),
    };
    // The broker too: a node started while Redis is away is ready, degraded, and heals.
    let (broker, incoming) = match &config.redis {
        Some(redis) => {
            let (broker, incoming) =
                broker::start(redis.url.expose(), &node_id, shared.report.clone(), background.clone())
                    .map_err(|e| ServeError::Broker(format!("REDIS_URL={}: {e}", redis.shown_url())))?;
            (broker, Some(incoming))
        }
        None => (broker::Broker::local(), None),
    };
    let parts = Arc::new(Parts { analytics, clickhouse, broker, ..Parts::default() });
    // Built before startup, so runs have a provider even while its endpoint is degraded.
    let provider = match &config.llm.provider {
        LlmProvider::Builtin => Provider::Builtin(Builtin { token_delay: config.agent_token_delay }),
        LlmProvider::OpenAi(endpoint) => Provider::OpenAi(OpenAi::new(endpoint.clone(), &config.llm)?),
    };
    let _ = parts.provider.set(provider);
    let components = components(&config, &shared, &parts, &writers, addr, &node_id);
    shared.report.declare(&components);

    // The listener answers probes before any component exists.
    let stop_http = CancellationToken::new();
    let router = web::router(shared.clone());
    let http = tokio::spawn({
        let (stop, config) = (stop_http.clone(), config.clone());
        async move { http::serve(listener, router, &config.limits, stop).await }
    });

    let started = startup::run(components, &shared.report, background.clone()).await;
    if let Err(failure) = started {
        background.cancel();
        stop_http.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), http).await;
        return Err(failure.into());
    }
    tracing::info!(ms = begun.elapsed().as_secs_f64() * 1000.0, "ready");
    let mut lease = None;
    if let (Some(app), Some(incoming)) = (shared.app_now(), incoming) {
        tokio::spawn(from_other_nodes(app, incoming));
    }
    if let Some(app) = shared.app_now() {
        tokio::spawn(watch_store(app.store.clone(), shared.report.clone(), background.clone()));
        if app.store.is_shared() {
            let stop = CancellationToken::new();
            let keeper = cluster::keep_lease(
                app.store.clone(),
                app.supervisor.clone(),
                node_id.clone(),
                config.node_lease,
                stop.clone(),
            );
            lease = Some((tokio::spawn(keeper), stop));
        }
    }

    tokio::pin!(shutdown);
    let http = tokio::select! {
        _ = &mut shutdown => None,
        r = http => Some(r),
    };
    if let Some(result) = http {
        // The HTTP server ended on its own: that is a failure.
        background.cancel();
        return match result {
            Ok(()) => Ok(()),
            Err(e) => Err(ServeError::Http(std::io::Error::other(e))),
        };
    }
    tracing::info!("shutting down");
    shared.draining.store(true, Ordering::Release);
    if let Some(app) = shared.app_now() {
        app.supervisor.drain(config.drain_timeout).await;
        let n = app.delivery.registry.close_all(CloseReason { code: 1012, reason: "service restart" });
        tracing::info!(connections = n, "closing sockets with 1012");
    }
    shared.connections.close();
    if tokio::time::timeout(Duration::from_secs(5), shared.connections.wait()).await.is_err() {
        tracing::warn!("some sockets did not close within 5 s");
    }
    if let Some((keeper, stop)) = lease {
        // Every run has ended: the lease is given up, and no other node sweeps this one.
        stop.cancel();
        let _ = keeper.await;
    }
    if let Some(sink) = sink {
        // After the sockets and runs, whose last rows it sends (or spools).
        sink.finish().await;
    }
    if let Some(app) = shared.app_now()
        && let Err(e) = app.store.close().await
    {
        tracing::warn!(error = %e, "could not checkpoint the database at shutdown");
    }
    background.cancel();
    stop_http.cancel();
    Ok(())
}

fn components(
    config: &Arc<Config>,
    shared: &Arc<Shared>,
    parts: &Arc<Parts>,
    writers: &TaskTracker,
    addr: SocketAddr,
    node_id: &str,
) -> Vec<Component> {
    let required = Criticality::Required;
    let (c, p) = (config.clone(), parts.clone());
    let store = Component::new("store", &[], required, config.db_timeout + Duration::from_secs(10), move || {
        let (c, p) = (c.clone(), p.clone());
        async move {
            let store = Store::connect(&c.database, c.db_timeout)
                .await
                .map_err(|e| e.to_string())?
                .with_cache_bytes(c.limits.cache_bytes);
            let _ = p.store.set(store);
            Ok(())
        }
    });
    let (c, p) = (config.clone(), parts.clone());
    let auth = Component::new("auth", &[], required, Duration::from_secs(10), move || {
        let (c, p) = (c.clone(), p.clone());
        async move {
            let secret = match &c.jwt_secret {
                Some(s) => s.clone(),
                None => auth::dev_secret(&c.data_dir)
                    .map_err(|e| format!("cannot create the development secret in {}: {e}", c.data_dir.display()))?,
            };
            let mut keys = Keys::new(&secret);
            if let Some(provider) = &c.identity_provider {
                // A wrong URL or an empty set is found now, not at the first login.
                let jwks = auth::Jwks::new(provider.clone()).map_err(|e| e.to_string())?;
                match jwks.load().await {
                    Ok(0) => {
                        let url = config::mask_url(&provider.jwks_url);
                        return Err(format!("the JWKS at {url} holds no usable signing key"));
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
                keys = keys.with_provider(Arc::new(jwks));
            }
            let _ = p.keys.set(keys);
            Ok(())
        }
    });
    // A model endpoint is optional unless LLM_REQUIRED: while it is away the server still
    // starts and serves history, and runs end with an agent_error naming the cause.
    let provider_criticality = match &config.llm.provider {
        LlmProvider::OpenAi(_) if !config.llm.required => Criticality::Optional,
        _ => required,
    };
    let p = parts.clone();
    let provider = Component::new("llm_provider", &[], provider_criticality, Duration::from_secs(5), move || {
        let p = p.clone();
        async move {
            match p.provider.get().cloned().ok_or("no provider was built")? {
                Provider::Builtin(_) => Ok(()),
                Provider::OpenAi(model) => model.check().await.map_err(|e| e.to_string()),
            }
        }
    });
    let (c, p, w) = (config.clone(), parts.clone(), writers.clone());
    let delivery = Component::new("delivery", &["store"], required, Duration::from_secs(5), move || {
        let (c, p, w) = (c.clone(), p.clone(), w.clone());
        async move {
            let _ = p.delivery.set(Delivery::start(
                part(&p.store, "store"),
                c.limits.replay_batch,
                c.limits.send_queue_bytes,
                &w,
                p.broker.clone(),
            ));
            Ok(())
        }
    });
    let (c, p, node) = (config.clone(), parts.clone(), node_id.to_string());
    let supervisor = Component::new(
        "agent_supervisor",
        &["delivery", "llm_provider"],
        required,
        Duration::from_secs(30),
        move || {
            let (c, p, node) = (c.clone(), p.clone(), node.clone());
            async move {
                // The self-test proves netra's own pipeline; the model has its own check.
                let providers = Providers {
                    main: part(&p.provider, "llm_provider"),
                    probe: Some((
                        selftest::USER.to_string(),
                        // Pacing words for people to watch proves nothing here.
                        Provider::Builtin(Builtin { token_delay: Duration::ZERO }),
                    )),
                };
                let supervisor = Supervisor::new(
                    part(&p.delivery, "delivery"),
                    part(&p.store, "store"),
                    providers,
                    node.clone(),
                    c.limits.runs_per_user,
                    c.limits.run_deadline,
                    c.stream_interval,
                    p.analytics.clone(),
                );
                let store = part(&p.store, "store");
                let interrupted = store.node_started(&node, store::now_ms()).await.map_err(|e| e.to_string())?;
                supervisor.close_interrupted_runs(&interrupted).await.map_err(|e| e.to_string())?;
                let _ = p.supervisor.set(supervisor);
                Ok(())
            }
        },
    );
    let (c, p, s) = (config.clone(), parts.clone(), shared.clone());
    let gateway =
        Component::new("gateway", &["agent_supervisor", "auth"], required, Duration::from_secs(5), move || {
            let (c, p, s) = (c.clone(), p.clone(), s.clone());
            async move {
                let app = App {
                    run_rates: rate::UserRates::new(c.limits.rate_limit, c.limits.rate_window),
                    config: c,
                    keys: part(&p.keys, "auth"),
                    store: part(&p.store, "store"),
                    delivery: part(&p.delivery, "delivery"),
                    supervisor: part(&p.supervisor, "agent_supervisor"),
                    analytics: p.analytics.clone(),
                    clickhouse: p.clickhouse.clone(),
                    tasks: TaskTracker::new(),
                };
                s.app.send_replace(Some(Arc::new(app)));
                Ok(())
            }
        });
    let (p, s) = (parts.clone(), shared.clone());
    let self_test = Component::new("self_test", &["gateway"], required, Duration::from_secs(10), move || {
        let (p, s) = (p.clone(), s.clone());
        async move {
            let app = s.app_now().ok_or("gateway published no app")?;
            selftest::run(addr, &part(&p.keys, "auth"), &app.store).await
        }
    });
    let mut components = vec![store, auth, provider, delivery, supervisor, gateway, self_test];
    if let Some(redis) = &config.redis {
        // Optional unless REDIS_REQUIRED: without Redis a node still serves its own users.
        let criticality = if redis.required { required } else { Criticality::Optional };
        let url = redis.url.clone();
        components.push(Component::new(broker::COMPONENT, &[], criticality, Duration::from_secs(5), move || {
            let url = url.clone();
            async move { broker::ping(url.expose()).await }
        }));
    }
    if let (Some(settings), Some(client)) = (&config.analytics, &parts.clickhouse) {
        // Optional unless CLICKHOUSE_REQUIRED: nothing depends on it, so while it is
        // degraded every other component starts and chat works.
        let criticality = if settings.required { required } else { Criticality::Optional };
        let client = client.clone();
        components.push(Component::new(analytics::COMPONENT, &[], criticality, Duration::from_secs(25), move || {
            let client = client.clone();
            async move { client.ensure_schema().await.map_err(|e| e.to_string()) }
        }));
    }
    components
}

/// Acts on what other nodes send: their events for this node's tabs, stops of runs
/// running here, and after an outage of Redis, the fill of what this node missed.
async fn from_other_nodes(app: Arc<App>, mut incoming: tokio::sync::mpsc::Receiver<broker::Incoming>) {
    use broker::Incoming;
    while let Some(message) = incoming.recv().await {
        match message {
            Incoming::Event { owner, thread_id, seq, kind, frame } => {
                app.delivery.remote_event(&owner, &thread_id, seq, &kind, frame);
            }
            Incoming::Stop { owner, run_id, thread_id } => {
                app.supervisor.stop(&owner, run_id.as_deref(), thread_id.as_deref());
            }
            Incoming::Doorbell { owner, thread_id, seq, since_ms } => {
                app.delivery.doorbell(&owner, &thread_id, seq, since_ms).await;
            }
            Incoming::Resubscribed { outage_began_ms } => app.delivery.refill_since(outage_began_ms).await,
        }
    }
}

/// Keeps the store's health current with a real query every 2 s, so `/health/ready`
/// turns 503 while the database is away and 200 again when it returns.
async fn watch_store(store: Store, report: Report, stop: CancellationToken) {
    let mut healthy = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let result = tokio::time::timeout(Duration::from_secs(2), store.ping()).await;
        match result {
            Ok(Ok(())) if !healthy => {
                tracing::info!("database reachable again");
                report.set("store", State::Ready, None, None);
                healthy = true;
            }
            Ok(Ok(())) => {}
            Ok(Err(e)) if healthy => {
                tracing::error!(error = %e, "database unreachable");
                report.set("store", State::Degraded, None, Some(e.to_string()));
                healthy = false;
            }
            Err(_) if healthy => {
                tracing::error!("database did not answer within 2 s");
                report.set("store", State::Degraded, None, Some("no answer within 2 s".into()));
                healthy = false;
            }
            _ => {}
        }
    }
}
