//! Health probes and metrics. They only read state that startup and the background checks
//! keep current; no probe does expensive work, so they answer from the first millisecond
//! and stay cheap under a probe storm.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::Shared;
use crate::startup::{Criticality, State as ComponentState};
use crate::telemetry::metric;

pub(crate) async fn live() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// 200 once every required component is ready and the self-test passed; 503 with the
/// reasons before that, while the database is away, and while shutting down.
pub(crate) async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    let reasons = shared.unready_reasons();
    if reasons.is_empty() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unready", "reasons": reasons}))).into_response()
    }
}

/// The startup report: each component, its state, milliseconds and error.
pub(crate) async fn startup_report(State(shared): State<Arc<Shared>>) -> Response {
    let snapshot = shared.report.snapshot();
    let status = if snapshot.complete { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(snapshot)).into_response()
}

/// `application/health+json` (draft-inadarei-api-health-check), one check per component.
pub(crate) async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let snapshot = shared.report.snapshot();
    let mut worst = "pass";
    let mut checks = serde_json::Map::new();
    for c in &snapshot.components {
        let status = match (c.state, c.criticality) {
            (ComponentState::Ready, _) => "pass",
            (_, Criticality::Optional) | (ComponentState::Pending | ComponentState::Starting, _) => "warn",
            _ => "fail",
        };
        if status == "fail" || (status == "warn" && worst == "pass") {
            worst = status;
        }
        let mut check = json!({"componentType": "component", "status": status, "state": c.state,
                               "criticality": c.criticality, "observedUnit": "ms", "observedValue": c.duration_ms});
        if let Some(e) = &c.error {
            check["output"] = json!(e);
        }
        checks.insert(c.name.to_string(), json!([check]));
    }
    if shared.is_draining() {
        worst = "fail";
    }
    let code = if worst == "fail" { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let body = json!({"status": worst, "serviceId": "netra", "version": env!("CARGO_PKG_VERSION"), "checks": checks});
    (code, [(header::CONTENT_TYPE, "application/health+json")], body.to_string()).into_response()
}

pub(crate) async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    if let Some(app) = shared.app_now() {
        app.store.record_cache_sizes();
        if app.analytics.is_on() {
            metrics::gauge!(metric::ANALYTICS_QUEUE).set(app.analytics.queued() as f64);
        }
    }
    shared.metrics.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], shared.metrics.render()).into_response()
}
