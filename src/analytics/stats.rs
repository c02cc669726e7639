//! What operators ask of analytics, answered from ClickHouse: runs per hour, time to first
//! token (p50/p95), errors by code with their rate per run, and the top users by runs,
//! over the last N hours. `netra stats` prints it; `GET /api/admin/stats` returns it.

use serde_json::{Value, json};

use super::{ClickHouseError, Client};

/// The longest window that may be asked for: 90 days.
pub const MAX_HOURS: u32 = 24 * 90;

/// The report for the last `hours` hours, as JSON.
pub async fn collect(client: &Client, hours: u32) -> Result<Value, ClickHouseError> {
    let since = format!("now() - {}", u64::from(hours.clamp(1, MAX_HOURS)) * 3600);
    let per_hour = client
        .select(&format!(
            "SELECT toString(toStartOfHour(ts)) AS hour, count() AS runs, countIf(status != 'completed') AS not_completed \
             FROM runs WHERE ts >= {since} GROUP BY hour ORDER BY hour"
        ))
        .await?;
    let runs: u64 = per_hour.iter().map(|r| number(&r["runs"])).sum();
    let first_token = client
        .select(&format!(
            "SELECT count() AS runs, quantiles(0.5, 0.95)(toFloat64(assumeNotNull(first_token_ms))) AS q \
             FROM runs WHERE ts >= {since} AND isNotNull(first_token_ms)"
        ))
        .await?;
    let first_token = first_token.first().cloned().unwrap_or(Value::Null);
    let with_text = number(&first_token["runs"]);
    let quantile = |i: usize| if with_text == 0 { Value::Null } else { json!(float(&first_token["q"][i])) };
    let errors = client
        .select(&format!(
            "SELECT code, `where`, count() AS n FROM errors WHERE ts >= {since} \
             GROUP BY code, `where` ORDER BY n DESC, code LIMIT 50"
        ))
        .await?;
    let errors: Vec<Value> = errors
        .iter()
        .map(|e| {
            let n = number(&e["n"]);
            let per_run = if runs == 0 { Value::Null } else { json!(round(n as f64 / runs as f64)) };
            json!({"code": e["code"], "where": e["where"], "count": n, "per_run": per_run})
        })
        .collect();
    let users = client
        .select(&format!(
            "SELECT user_id, count() AS runs, sum(tokens_in + tokens_out) AS tokens FROM runs \
             WHERE ts >= {since} GROUP BY user_id ORDER BY runs DESC, user_id LIMIT 10"
        ))
        .await?;
    Ok(json!({
        "hours": hours.clamp(1, MAX_HOURS),
        "runs": runs,
        "runs_per_hour": per_hour.iter().map(|r| json!({
            "hour": r["hour"], "runs": number(&r["runs"]), "not_completed": number(&r["not_completed"]),
        })).collect::<Vec<_>>(),
        "first_token_ms": {"runs": with_text, "p50": quantile(0), "p95": quantile(1)},
        "errors": errors,
        "top_users": users.iter().map(|u| json!({
            "user_id": u["user_id"], "runs": number(&u["runs"]), "tokens": number(&u["tokens"]),
        })).collect::<Vec<_>>(),
    }))
}

/// The report as text for a terminal.
pub fn render(stats: &Value) -> String {
    let mut out = String::new();
    let hours = number(&stats["hours"]);
    out.push_str(&format!("last {hours} h: {} runs\n\nruns per hour (UTC)\n", number(&stats["runs"])));
    for r in stats["runs_per_hour"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {}  {:>6} runs  {:>4} not completed\n",
            r["hour"].as_str().unwrap_or("?"),
            number(&r["runs"]),
            number(&r["not_completed"])
        ));
    }
    let ft = &stats["first_token_ms"];
    out.push_str("\ntime to first token\n");
    match (ft["p50"].as_f64(), ft["p95"].as_f64()) {
        (Some(p50), Some(p95)) => {
            out.push_str(&format!("  p50 {p50:.0} ms  p95 {p95:.0} ms  ({} runs with text)\n", number(&ft["runs"])));
        }
        _ => out.push_str("  no run streamed text\n"),
    }
    out.push_str("\nerrors by code\n");
    let errors = stats["errors"].as_array().cloned().unwrap_or_default();
    if errors.is_empty() {
        out.push_str("  none\n");
    }
    for e in errors {
        let rate = e["per_run"].as_f64().map_or("-".to_string(), |r| format!("{r:.3}"));
        out.push_str(&format!(
            "  {:<20} {:<7} {:>6}  {rate} per run\n",
            e["code"].as_str().unwrap_or("?"),
            e["where"].as_str().unwrap_or("?"),
            number(&e["count"])
        ));
    }
    out.push_str("\ntop users by runs\n");
    for u in stats["top_users"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {:<32} {:>6} runs  {:>8} tokens\n",
            u["user_id"].as_str().unwrap_or("?"),
            number(&u["runs"]),
            number(&u["tokens"])
        ));
    }
    out
}

/// A count from ClickHouse, which quotes 64-bit integers in JSON by default.
fn number(v: &Value) -> u64 {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or(0)
}

fn float(v: &Value) -> f64 {
    v.as_f64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or(0.0)
}

fn round(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_and_plain_counts_read_the_same() {
        assert_eq!(number(&json!("42")), 42);
        assert_eq!(number(&json!(42)), 42);
        assert_eq!(number(&Value::Null), 0);
    }

    #[test]
    fn the_text_report_shows_every_part() {
        let stats = json!({
            "hours": 24, "runs": 3,
            "runs_per_hour": [{"hour": "2026-12-02 18:00:00", "runs": 3, "not_completed": 1}],
            "first_token_ms": {"runs": 2, "p50": 40.0, "p95": 90.4},
            "errors": [{"code": "rate_limited", "where": "socket", "count": 2, "per_run": 0.6667}],
            "top_users": [{"user_id": "alice", "runs": 3, "tokens": 0}],
        });
        let text = render(&stats);
        for part in ["last 24 h: 3 runs", "2026-12-02 18:00:00", "p50 40 ms  p95 90 ms", "rate_limited", "alice"] {
            assert!(text.contains(part), "{part} in\n{text}");
        }
    }
}
