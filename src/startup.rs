//! Startup as a dependency graph. Components are data (name, dependencies, criticality,
//! timeout); the graph is checked for unknown names and cycles before anything starts,
//! then each level starts in parallel once the level before it is ready. A check is just
//! a component that depends on what it checks, so nothing is ever checked before it
//! exists. The module knows nothing of what a component does.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::telemetry::metric;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Criticality {
    /// Its failure stops startup.
    Required,
    /// Its failure degrades the service; it is retried in the background.
    Optional,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Starting,
    Ready,
    Degraded,
    Failed,
}

type StartFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type StartFn = Arc<dyn Fn() -> StartFuture + Send + Sync>;

/// One thing to start.
pub struct Component {
    pub name: &'static str,
    pub deps: &'static [&'static str],
    pub criticality: Criticality,
    pub timeout: Duration,
    start: StartFn,
}

impl Component {
    pub fn new<F, Fut>(
        name: &'static str,
        deps: &'static [&'static str],
        criticality: Criticality,
        timeout: Duration,
        start: F,
    ) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        Self { name, deps, criticality, timeout, start: Arc::new(move || Box::pin(start())) }
    }
}

/// A graph that cannot be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("component {component} depends on unknown component {missing}")]
    UnknownDependency { component: &'static str, missing: &'static str },
    #[error("components {0:?} depend on each other in a cycle")]
    Cycle(Vec<&'static str>),
    #[error("component {0} is declared twice")]
    Duplicate(&'static str),
}

/// Groups components into levels: each level depends only on earlier ones.
pub fn levels(components: &[Component]) -> Result<Vec<Vec<usize>>, GraphError> {
    let index: HashMap<&str, usize> = components.iter().enumerate().map(|(i, c)| (c.name, i)).collect();
    if index.len() != components.len() {
        let mut seen = std::collections::HashSet::new();
        let dup = components.iter().find(|c| !seen.insert(c.name)).expect("a duplicate exists");
        return Err(GraphError::Duplicate(dup.name));
    }
    for c in components {
        if let Some(missing) = c.deps.iter().find(|d| !index.contains_key(*d)) {
            return Err(GraphError::UnknownDependency { component: c.name, missing });
        }
    }
    let mut level_of: Vec<Option<usize>> = vec![None; components.len()];
    let mut placed = 0;
    let mut levels: Vec<Vec<usize>> = Vec::new();
    while placed < components.len() {
        let current: Vec<usize> = (0..components.len())
            .filter(|&i| level_of[i].is_none())
            .filter(|&i| components[i].deps.iter().all(|d| level_of[index[d]].is_some_and(|l| l < levels.len())))
            .collect();
        if current.is_empty() {
            let stuck = (0..components.len()).filter(|&i| level_of[i].is_none()).map(|i| components[i].name).collect();
            return Err(GraphError::Cycle(stuck));
        }
        for &i in &current {
            level_of[i] = Some(levels.len());
        }
        placed += current.len();
        levels.push(current);
    }
    Ok(levels)
}

/// One component's line in the startup report.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentStatus {
    pub name: &'static str,
    pub criticality: Criticality,
    pub depends_on: &'static [&'static str],
    pub state: State,
    /// Time from its start to its last state change, in milliseconds.
    pub duration_ms: Option<f64>,
    pub error: Option<String>,
}

/// The live startup report, shared with the health endpoints.
#[derive(Clone, Default)]
pub struct Report {
    inner: Arc<Mutex<ReportInner>>,
}

#[derive(Default)]
struct ReportInner {
    components: Vec<ComponentStatus>,
    started: Option<Instant>,
    total_ms: Option<f64>,
}

/// A snapshot for `/health/startup`.
#[derive(Debug, Clone, Serialize)]
pub struct ReportSnapshot {
    pub complete: bool,
    pub total_ms: Option<f64>,
    pub components: Vec<ComponentStatus>,
}

impl Report {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReportInner> {
        self.inner.lock().expect("report lock is never held across a panic")
    }

    pub fn snapshot(&self) -> ReportSnapshot {
        let inner = self.lock();
        ReportSnapshot {
            complete: inner.total_ms.is_some(),
            total_ms: inner.total_ms,
            components: inner.components.clone(),
        }
    }

    /// Lists every component as pending, so the report is complete from the start.
    pub fn declare(&self, components: &[Component]) {
        let mut inner = self.lock();
        inner.started = Some(Instant::now());
        inner.components = components
            .iter()
            .map(|c| ComponentStatus {
                name: c.name,
                criticality: c.criticality,
                depends_on: c.deps,
                state: State::Pending,
                duration_ms: None,
                error: None,
            })
            .collect();
    }

    /// Records a state change of `name` after `since`.
    pub fn set(&self, name: &str, state: State, since: Option<Instant>, error: Option<String>) {
        let mut inner = self.lock();
        if let Some(c) = inner.components.iter_mut().find(|c| c.name == name) {
            c.state = state;
            if let Some(since) = since {
                c.duration_ms = Some(since.elapsed().as_secs_f64() * 1000.0);
            }
            c.error = error;
        }
    }

    /// Names of required components that are not ready, with their state.
    pub fn not_ready(&self) -> Vec<String> {
        self.lock()
            .components
            .iter()
            .filter(|c| c.criticality == Criticality::Required && c.state != State::Ready)
            .map(|c| format!("{}: {:?}", c.name, c.state).to_lowercase())
            .collect()
    }

    fn finish(&self) {
        let mut inner = self.lock();
        inner.total_ms = inner.started.map(|s| s.elapsed().as_secs_f64() * 1000.0);
    }
}

/// Why startup stopped.
#[derive(Debug, Clone, thiserror::Error)]
#[error("required component {component} {what}: {error} (needed by: {dependents})", what = if *timed_out { "timed out" } else { "failed" }, dependents = if dependents.is_empty() { "nothing".to_string() } else { dependents.join(", ") })]
pub struct StartupFailure {
    pub component: &'static str,
    pub error: String,
    pub timed_out: bool,
    /// Every component that (transitively) needed it.
    pub dependents: Vec<&'static str>,
}

/// Starts every component in dependency order. Optional failures are retried with
/// backoff in the background until `stop` is cancelled.
pub async fn run(components: Vec<Component>, report: &Report, stop: CancellationToken) -> Result<(), StartupFailure> {
    let levels = levels(&components).map_err(|e| StartupFailure {
        component: "startup",
        error: e.to_string(),
        timed_out: false,
        dependents: Vec::new(),
    })?;
    report.declare(&components);
    for level in levels {
        let starts = level.iter().map(|&i| {
            let c = &components[i];
            let report = report.clone();
            async move {
                let since = Instant::now();
                report.set(c.name, State::Starting, None, None);
                let span = tracing::info_span!("component", name = c.name);
                let result = tracing::Instrument::instrument(tokio::time::timeout(c.timeout, (c.start)()), span).await;
                metrics::histogram!(metric::STARTUP_DURATION, "component" => c.name)
                    .record(since.elapsed().as_secs_f64());
                match result {
                    Ok(Ok(())) => {
                        report.set(c.name, State::Ready, Some(since), None);
                        tracing::debug!(
                            component = c.name,
                            ms = since.elapsed().as_secs_f64() * 1000.0,
                            "component ready"
                        );
                        Ok(())
                    }
                    Ok(Err(error)) => Err((i, error, false, since)),
                    Err(_) => Err((i, format!("not ready within {:?}", c.timeout), true, since)),
                }
            }
        });
        let results = futures_util::future::join_all(starts).await;
        for (i, error, timed_out, since) in results.into_iter().filter_map(Result::err) {
            let c = &components[i];
            match c.criticality {
                Criticality::Required => {
                    report.set(c.name, State::Failed, Some(since), Some(error.clone()));
                    return Err(StartupFailure {
                        component: c.name,
                        error,
                        timed_out,
                        dependents: dependents_of(&components, c.name),
                    });
                }
                Criticality::Optional => {
                    tracing::warn!(component = c.name, %error, "optional component degraded; retrying in the background");
                    report.set(c.name, State::Degraded, Some(since), Some(error));
                    tokio::spawn(retry(c.name, c.start.clone(), c.timeout, report.clone(), stop.clone()));
                }
            }
        }
    }
    report.finish();
    Ok(())
}

async fn retry(name: &'static str, start: StartFn, timeout: Duration, report: Report, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(500);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        match tokio::time::timeout(timeout, start()).await {
            Ok(Ok(())) => {
                tracing::info!(component = name, "optional component recovered");
                report.set(name, State::Ready, None, None);
                return;
            }
            Ok(Err(e)) => report.set(name, State::Degraded, None, Some(e)),
            Err(_) => report.set(name, State::Degraded, None, Some(format!("not ready within {timeout:?}"))),
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn dependents_of(components: &[Component], name: &'static str) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    let mut frontier = vec![name];
    while let Some(n) = frontier.pop() {
        for c in components {
            if c.deps.contains(&n) && !out.contains(&c.name) {
                out.push(c.name);
                frontier.push(c.name);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn ok(name: &'static str, deps: &'static [&'static str]) -> Component {
        Component::new(name, deps, Criticality::Required, Duration::from_secs(1), || async { Ok(()) })
    }

    #[test]
    fn levels_follow_dependencies() {
        let c = vec![ok("gateway", &["agent", "auth"]), ok("store", &[]), ok("agent", &["store"]), ok("auth", &[])];
        let names: Vec<Vec<&str>> =
            levels(&c).expect("valid").iter().map(|l| l.iter().map(|&i| c[i].name).collect()).collect();
        assert_eq!(names, vec![vec!["store", "auth"], vec!["agent"], vec!["gateway"]]);
    }

    #[test]
    fn unknown_names_and_cycles_are_refused_before_anything_starts() {
        let c = vec![ok("a", &["ghost"])];
        assert_eq!(levels(&c), Err(GraphError::UnknownDependency { component: "a", missing: "ghost" }));
        let c = vec![ok("a", &["b"]), ok("b", &["a"]), ok("c", &[])];
        assert_eq!(levels(&c), Err(GraphError::Cycle(vec!["a", "b"])));
    }

    #[tokio::test]
    async fn a_required_failure_names_its_dependents() {
        let failing = Component::new("store", &[], Criticality::Required, Duration::from_secs(1), || async {
            Err("connection refused".to_string())
        });
        let report = Report::default();
        let started = Arc::new(AtomicUsize::new(0));
        let s = started.clone();
        let agent = Component::new("agent", &["store"], Criticality::Required, Duration::from_secs(1), move || {
            s.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        });
        let err = run(vec![failing, agent, ok("gateway", &["agent"])], &report, CancellationToken::new())
            .await
            .expect_err("store fails");
        assert_eq!(err.component, "store");
        assert_eq!(err.dependents, vec!["agent", "gateway"]);
        assert_eq!(started.load(Ordering::SeqCst), 0, "a dependent must not start");
        assert_eq!(report.snapshot().components[0].state, State::Failed);
    }

    #[tokio::test(start_paused = true)]
    async fn an_optional_failure_degrades_then_recovers() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let a = attempts.clone();
        let flaky = Component::new("analytics", &[], Criticality::Optional, Duration::from_secs(1), move || {
            let n = a.fetch_add(1, Ordering::SeqCst);
            async move { if n < 2 { Err("not yet".to_string()) } else { Ok(()) } }
        });
        let report = Report::default();
        let stop = CancellationToken::new();
        run(vec![flaky, ok("gateway", &["analytics"])], &report, stop.clone()).await.expect("optional does not block");
        assert_eq!(report.snapshot().components[0].state, State::Degraded);
        assert_eq!(report.snapshot().components[1].state, State::Ready);
        for _ in 0..100 {
            if report.snapshot().components[0].state == State::Ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(report.snapshot().components[0].state, State::Ready);
        stop.cancel();
    }
}
