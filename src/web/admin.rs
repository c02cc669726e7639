//! Routes for operators: a token carrying the `admin` permission (`netra token
//! --permission admin`, or an identity provider's `permissions` claim) is required.

use axum::Json;
use axum::extract::Query;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use utoipa::IntoParams;

use super::{ApiError, Authed};
use crate::analytics::stats;

/// The permission that opens the admin routes.
pub(crate) const ADMIN: &str = "admin";

#[derive(Deserialize, IntoParams)]
pub(crate) struct Window {
    /// Hours back from now, 1 to 2160 (90 days); 24 by default.
    #[param(minimum = 1, maximum = 2160)]
    hours: Option<u32>,
}

/// Runs per hour, time to first token (p50/p95), errors by code with their rate per run,
/// and the top users by runs, from ClickHouse.
#[utoipa::path(get, path = "/api/admin/stats", tag = "admin", params(Window), security(("bearer" = [])),
    responses((status = 200, description = "the analytics report", body = Object),
              (status = 403, description = "the token lacks the admin permission", body = super::Detail),
              (status = 422, description = "hours is out of range", body = super::Detail)))]
pub(crate) async fn stats(auth: Authed, Query(window): Query<Window>) -> Result<Json<Value>, ApiError> {
    if !auth.user.permissions.iter().any(|p| p == ADMIN) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "this route needs the admin permission"));
    }
    let hours = window.hours.unwrap_or(24);
    if !(1..=stats::MAX_HOURS).contains(&hours) {
        let detail = format!("hours must be from 1 to {}", stats::MAX_HOURS);
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, detail));
    }
    let Some(client) = &auth.app.clickhouse else {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "analytics is off: set CLICKHOUSE_URL"));
    };
    match stats::collect(client, hours).await {
        Ok(report) => Ok(Json(report)),
        Err(e) => {
            tracing::warn!(error = %e, "analytics report failed");
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "ClickHouse is unavailable; try again"))
        }
    }
}
