//! ClickHouse over its HTTP interface: the schema, inserts in `JSONEachRow`, and the few
//! queries analytics needs. Plain HTTP with reqwest (already netra's client for model
//! endpoints) works with every ClickHouse from 18.16 on, the only one installable on the
//! machines netra is tested on; the column types are the simple ones every version has.

use std::collections::HashSet;
use std::time::Duration;

use axum::body::Bytes;
use serde_json::Value;

use super::Table;
use crate::config::{ClickHouse as Settings, Secret};

/// Longest one request may take, connecting included. A ClickHouse that hangs costs the
/// sink this long, never the chat path.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// ClickHouse's error codes for a user it does not know, a wrong or missing password,
/// and (newer servers) a failed authentication.
const CREDENTIAL_CODES: &[u32] = &[192, 193, 194, 516];

/// Why a request to ClickHouse failed. Messages name what an operator sets to fix it
/// and never a credential.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClickHouseError {
    #[error("ClickHouse at {url} is unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("ClickHouse refused CLICKHOUSE_USER={user:?}: check CLICKHOUSE_PASSWORD (ClickHouse said: {message})")]
    Credentials { user: String, message: String },
    #[error("ClickHouse at {url} did not answer within {REQUEST_TIMEOUT:?}")]
    Timeout { url: String },
    #[error("ClickHouse answered {status}: {message}")]
    Server { status: u16, message: String },
}

/// A client for one server and database.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    url: String,
    user: String,
    password: Option<Secret>,
    database: String,
}

impl Client {
    pub fn new(settings: &Settings) -> Result<Self, ClickHouseError> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| ClickHouseError::Unreachable { url: settings.url.clone(), detail: e.to_string() })?;
        Ok(Self {
            http,
            url: settings.url.clone(),
            user: settings.user.clone(),
            password: settings.password.clone(),
            database: settings.database.clone(),
        })
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// Sends `data` to the HTTP interface with `query` in the URL, or `query` as the body
    /// when there is no data, and returns the answer's text.
    async fn send(&self, query: &str, data: Option<Bytes>, in_database: bool) -> Result<String, ClickHouseError> {
        let mut params = Vec::new();
        if in_database {
            params.push(("database", self.database.as_str()));
        }
        let body = match data {
            Some(data) => {
                params.push(("query", query));
                data
            }
            None => Bytes::from(query.to_string()),
        };
        let request = self
            .http
            .post(format!("{}/", self.url))
            .query(&params)
            .basic_auth(&self.user, self.password.as_ref().map(Secret::expose))
            .body(body);
        let response = request.send().await.map_err(|e| self.transport(&e))?;
        let status = response.status();
        let code = response
            .headers()
            .get("x-clickhouse-exception-code")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        let text = response.text().await.map_err(|e| self.transport(&e))?;
        if status.is_success() {
            return Ok(text);
        }
        let code = code.or_else(|| exception_code(&text));
        let message = first_line(&text);
        if code.is_some_and(|c| CREDENTIAL_CODES.contains(&c)) {
            return Err(ClickHouseError::Credentials { user: self.user.clone(), message });
        }
        Err(ClickHouseError::Server { status: status.as_u16(), message })
    }

    fn transport(&self, e: &reqwest::Error) -> ClickHouseError {
        if e.is_timeout() {
            return ClickHouseError::Timeout { url: self.url.clone() };
        }
        // reqwest's own text names the URL and the cause, never a credential (basic auth
        // travels in a header it does not print).
        let mut detail = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            detail = format!("{detail}: {s}");
            source = s.source();
        }
        ClickHouseError::Unreachable { url: self.url.clone(), detail }
    }

    /// `SELECT 1`, with the configured credentials.
    pub async fn ping(&self) -> Result<(), ClickHouseError> {
        self.send("SELECT 1", None, false).await.map(|_| ())
    }

    /// Creates the database and the tables that are missing. Safe to repeat.
    pub async fn ensure_schema(&self) -> Result<(), ClickHouseError> {
        let db = &self.database;
        self.send(&format!("CREATE DATABASE IF NOT EXISTS {db}"), None, false).await?;
        for table in Table::ALL {
            let columns = match table {
                Table::Runs => {
                    "batch_id String, ts DateTime('UTC'), run_id String, user_id String, thread_id String, \
                     node String, provider String, model String, status String, error_code String, \
                     queue_ms UInt32, first_token_ms Nullable(UInt32), total_ms UInt32, \
                     tokens_in UInt64, tokens_out UInt64, tool_calls UInt32"
                }
                Table::Sessions => {
                    "batch_id String, opened_at DateTime('UTC'), closed_at DateTime('UTC'), \
                     connection_id String, user_id String, node String, client String, close_code UInt16, \
                     frames_in UInt64, frames_out UInt64, bytes_in UInt64, bytes_out UInt64, duration_ms UInt32"
                }
                Table::Errors => {
                    "batch_id String, ts DateTime('UTC'), user_id String, node String, code String, \
                     `where` String, thread_id String, run_id String"
                }
            };
            let (name, time) = (table.name(), table.time_column());
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {db}.{name} ({columns}) ENGINE = MergeTree() \
                 PARTITION BY toDate({time}) ORDER BY ({time}, user_id)"
            );
            self.send(&sql, None, false).await?;
        }
        Ok(())
    }

    /// Drops the database and every table in it (benchmarks clean up with it).
    pub async fn drop_database(&self) -> Result<(), ClickHouseError> {
        self.send(&format!("DROP DATABASE IF EXISTS {}", self.database), None, false).await.map(|_| ())
    }

    /// Inserts `JSONEachRow` lines into `table`, as one request: ClickHouse writes a
    /// request of fewer rows than its block size (a million) as one block, and a block
    /// within one partition as one part, so it lands whole or not at all.
    pub async fn insert(&self, table: Table, lines: Bytes) -> Result<(), ClickHouseError> {
        let query = format!("INSERT INTO {}.{} FORMAT JSONEachRow", self.database, table.name());
        self.send(&query, Some(lines), false).await.map(|_| ())
    }

    /// Which of `ids` already have rows in `table`: a batch whose insert may have landed
    /// before its answer was lost is not sent again.
    pub async fn present_batches(&self, table: Table, ids: &[String]) -> Result<HashSet<String>, ClickHouseError> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        // Batch ids are hex UUIDs made here; anything else never reaches this query.
        let list: Vec<String> =
            ids.iter().filter(|id| id.chars().all(|c| c.is_ascii_hexdigit())).map(|id| format!("'{id}'")).collect();
        let query = format!(
            "SELECT DISTINCT batch_id FROM {}.{} WHERE batch_id IN ({}) FORMAT TabSeparated",
            self.database,
            table.name(),
            list.join(",")
        );
        let text = self.send(&query, None, false).await?;
        Ok(text.lines().map(str::to_string).collect())
    }

    /// Runs a `SELECT` and returns its rows as JSON objects.
    pub async fn select(&self, query: &str) -> Result<Vec<Value>, ClickHouseError> {
        let text = self.send(&format!("{query} FORMAT JSONEachRow"), None, true).await?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .map_err(|e| ClickHouseError::Server { status: 200, message: format!("unreadable row: {e}") })
            })
            .collect()
    }
}

/// The `Code: N` ClickHouse puts at the start of an error's text.
fn exception_code(text: &str) -> Option<u32> {
    let rest = text.trim_start().strip_prefix("Code: ")?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// The first line of an error's text, bounded: ClickHouse appends a stack trace.
fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default().trim();
    line.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_is_read_from_an_error_text() {
        let text =
            "Code: 193, e.displayText() = DB::Exception: Wrong password for user netra, e.what() = DB::Exception\n";
        assert_eq!(exception_code(text), Some(193));
        assert_eq!(exception_code("Code: 81. DB::Exception: Database nope doesn't exist"), Some(81));
        assert_eq!(exception_code("something else"), None);
        assert_eq!(
            first_line(text),
            "Code: 193, e.displayText() = DB::Exception: Wrong password for user netra, e.what() = DB::Exception"
        );
    }
}
