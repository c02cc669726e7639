//! The typed configuration: embedded defaults, then an optional `netra.toml`, then the
//! environment. Raw text becomes a validated [`Config`] or the list of every problem at
//! once, so an operator fixes a bad deployment in one round instead of one variable per
//! restart. This is the only module that reads the process environment; `ENVIRONMENT`
//! changes defaults here and nowhere else. There is no test mode: tests differ from
//! production only in the values they pass.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// One invalid or missing setting: which variable, what was wrong, how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}{shown}: {problem}; {fix}", shown = display_value(.value))]
pub struct ConfigError {
    /// The environment variable (or `netra.toml` key, upper-cased) at fault.
    pub var: String,
    /// The offending value, already masked when it is a secret.
    pub value: Option<String>,
    pub problem: String,
    pub fix: String,
}

fn display_value(value: &Option<String>) -> String {
    value.as_ref().map(|v| format!("={v:?}")).unwrap_or_default()
}

/// A documented setting. The table drives unknown-variable detection, `netra check`
/// and the README, so a variable cannot exist without a default and a meaning.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    pub name: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
    secret: bool,
}

const fn var(name: &'static str, default: &'static str, meaning: &'static str) -> Variable {
    Variable { name, default, meaning, secret: false }
}

/// Every setting netra reads, in the order the README lists them.
pub const VARIABLES: &[Variable] = &[
    var(
        "ENVIRONMENT",
        "development",
        "development, staging or production; only changes the defaults marked (dev)/(prod)",
    ),
    var("HOST", "127.0.0.1", "address to bind"),
    var(
        "PORT",
        "8000",
        "port to bind; 0 picks a free one (the bound address is printed as `listening on http://ADDR`)",
    ),
    var("NETRA_DATA_DIR", "./data", "where the SQLite file and the generated development secret live"),
    var("DATABASE_URL", "sqlite://$NETRA_DATA_DIR/netra.db", "`sqlite://PATH` or `postgres://USER@HOST:PORT/DB`"),
    var("NETRA_DB_TIMEOUT", "10s", "how long startup keeps trying to reach the database before it gives up"),
    Variable {
        name: "JWT_SECRET",
        default: "(dev) generated once into the data dir",
        meaning: "HS256 secret for access and refresh tokens; required (16+ characters) outside development",
        secret: true,
    },
    var(
        "JWT_JWKS_URL",
        "(unset)",
        "an identity provider's JWKS URL: access tokens it signs (RS/ES/PS/EdDSA, by kid) are accepted too",
    ),
    var("JWT_ISSUER", "(unset)", "the `iss` that tokens signed by JWT_JWKS_URL must carry"),
    var("JWT_AUDIENCE", "(unset)", "the `aud` that tokens signed by JWT_JWKS_URL must carry"),
    var("NETRA_DEV_LOGIN", "(dev) true, (prod) false", "serve POST /auth/dev/login"),
    var("NETRA_DEV_TOKEN_TTL", "24h", "lifetime of tokens from dev login"),
    var("NETRA_STARTUP_WAIT", "30s", "how long a WebSocket upgrade waits for startup before closing 1011"),
    var(
        "NETRA_MAX_FRAME_BYTES",
        "131072",
        "largest inbound frame (at least 65536); larger closes 1009. Also the largest REST body (413)",
    ),
    var(
        "NETRA_RATE_LIMIT",
        "120",
        "inbound frames per connection per NETRA_RATE_WINDOW; more get `rate_limited`. Also REST run starts per user (429)",
    ),
    var("NETRA_RATE_WINDOW", "60s", "window of the inbound rate limit"),
    var("NETRA_MAX_CONNECTIONS_PER_USER", "10", "open sockets per user; one more closes 1013"),
    var("NETRA_MAX_RUNS_PER_USER", "3", "concurrent agent runs per user; one more gets `busy`"),
    var(
        "NETRA_SEND_QUEUE",
        "1024",
        "frames queued per connection; a consumer that falls this far behind is closed 1013",
    ),
    var(
        "NETRA_SEND_QUEUE_BYTES",
        "2097152",
        "bytes queued per connection, replay included; past it a consumer is closed 1013 (resumes by seq)",
    ),
    var(
        "NETRA_CACHE_BYTES",
        "50331648",
        "memory the store keeps for what it remembers (recent history, thread owners, users); past it a cache starts over",
    ),
    var(
        "NETRA_REPLAY_BATCH",
        "500",
        "events read from the store per page when a client resumes (a page also stops at NETRA_SEND_QUEUE_BYTES)",
    ),
    var("NETRA_RUN_DEADLINE", "120s", "longest an agent run may take (at most 120s)"),
    var("NETRA_HEARTBEAT_INTERVAL", "20s", "WebSocket Ping control frame interval"),
    var("NETRA_IDLE_TIMEOUT", "60s", "close 1001 after this long with no inbound frame"),
    var(
        "NETRA_HEADER_TIMEOUT",
        "10s",
        "time a connection has to send its request's headers, and to stay idle between requests",
    ),
    var("NETRA_REQUEST_TIMEOUT", "30s", "longest a REST request may take, body included (408)"),
    var(
        "NETRA_MAX_PENDING_CONNECTIONS",
        "512",
        "connections that have not sent a request yet; past it the longest-waiting one is closed",
    ),
    var(
        "REDIS_URL",
        "(unset)",
        "`redis://[:PASSWORD@]HOST:PORT[/DB]`: several nodes deliver each other's events (scale-out); unset: one node",
    ),
    var(
        "REDIS_REQUIRED",
        "false",
        "true makes an unreachable Redis stop startup; otherwise each node serves its own users until it is back",
    ),
    var(
        "NETRA_NODE_ID",
        "(generated once into the data dir)",
        "this node's name in a cluster: its runs record it, and only it ends its own leftovers at start",
    ),
    var(
        "NETRA_NODE_LEASE",
        "15s",
        "on PostgreSQL: a node that has not renewed its lease for this long is gone, and another node ends its runs",
    ),
    var("NETRA_DRAIN_TIMEOUT", "10s", "on SIGTERM, how long running runs may finish before they are cancelled"),
    var(
        "NETRA_WORKER_THREADS",
        "auto",
        "threads that run connections and agents; auto is one per core, less the core SQLite's writer thread keeps busy (at least 1)",
    ),
    var("NETRA_AGENT_TOKEN_DELAY", "15ms", "builtin agent: pause between streamed words (0 for benchmarks)"),
    var(
        "NETRA_STREAM_INTERVAL",
        "100ms",
        "streamed answer text is merged into one `partial_result` per interval (0 sends every chunk; under load, a run's deltas waiting for the same commit still go as one)",
    ),
    var(
        "NETRA_WEB_CLIENT_PACE",
        "250ms",
        "least time between run events on a Netra web client socket (`jwt-auth` subprotocol); 0 turns pacing off",
    ),
    var(
        "LLM_PROVIDER",
        "builtin (openai when LLM_BASE_URL is set)",
        "builtin (offline agent) or openai (any OpenAI-compatible chat-completions endpoint)",
    ),
    var("LLM_BASE_URL", "(unset)", "the endpoint's base URL, e.g. http://127.0.0.1:11434/v1 (Ollama)"),
    Variable {
        name: "LLM_API_KEY",
        default: "(unset)",
        meaning: "sent as `Authorization: Bearer …` to the endpoint; never logged",
        secret: true,
    },
    var("LLM_MODEL", DEFAULT_MODEL, "the model name sent to the endpoint"),
    var(
        "LLM_TIMEOUT",
        "60s",
        "per request to the model: longest wait for the reply to start, and between two streamed chunks",
    ),
    var(
        "LLM_REQUIRED",
        "false",
        "true makes an unreachable endpoint stop startup; otherwise runs fail with `agent_error` until it answers",
    ),
    var("NETRA_SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT, "the system message sent first to the model"),
    var("NETRA_HISTORY_BUDGET", "24000", "characters of the thread's earlier messages sent to the model"),
    var("NETRA_TOOL_TIMEOUT", "5s", "longest a tool called by the model may run"),
    var(
        "NETRA_CORS_ORIGINS",
        "http://localhost:3000,http://127.0.0.1:3000",
        "origins allowed to call the REST API with credentials, comma-separated",
    ),
    var(
        "NETRA_WS_ORIGINS",
        "(the CORS origins)",
        "browser origins allowed to open /ws besides the server's own, comma-separated; * allows any",
    ),
    var(
        "NETRA_ECHO_ROUTE",
        "false",
        "serve GET /ws/echo: an unauthenticated echo socket with /ws's limits, for conformance suites",
    ),
    var(
        "CLICKHOUSE_URL",
        "(unset)",
        "ClickHouse's HTTP interface, e.g. http://127.0.0.1:8123: turns analytics on (runs, sessions, errors)",
    ),
    var("CLICKHOUSE_USER", "default", "the ClickHouse user analytics writes as"),
    Variable {
        name: "CLICKHOUSE_PASSWORD",
        default: "(unset)",
        meaning: "that user's password; required for any user but `default`; never logged",
        secret: true,
    },
    var("CLICKHOUSE_DATABASE", "netra", "the database analytics creates its tables in (created if missing)"),
    var(
        "CLICKHOUSE_REQUIRED",
        "false",
        "true makes an unreachable ClickHouse stop startup; otherwise analytics is degraded and spools until it answers",
    ),
    var("NETRA_ANALYTICS_QUEUE", "20000", "analytics rows held in memory; past it new rows are dropped and counted"),
    var("NETRA_ANALYTICS_BATCH", "5000", "rows per insert into ClickHouse"),
    var("NETRA_ANALYTICS_INTERVAL", "1s", "longest an analytics row waits for its batch"),
    var(
        "NETRA_ANALYTICS_SPOOL_BYTES",
        "67108864",
        "bytes of batches kept in the data dir while ClickHouse is away; past it the oldest are dropped and counted",
    ),
    var("NETRA_LOG", "info", "log filter (tracing EnvFilter syntax)"),
    var("NETRA_LOG_FORMAT", "(dev) pretty, (prod) json", "pretty or json"),
];

/// The model asked for when `LLM_MODEL` is unset.
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";
/// The system message when `NETRA_SYSTEM_PROMPT` is unset.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are netra, a helpful assistant. Answer clearly and concisely. \
     Use the calculator for arithmetic and the clock for the current date and time.";

/// Which deployment this is. It only picks defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Development,
    Staging,
    Production,
}

impl FromStr for Environment {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "development" | "dev" | "local" => Ok(Self::Development),
            "staging" => Ok(Self::Staging),
            "production" | "prod" => Ok(Self::Production),
            _ => Err("not one of development, staging, production".into()),
        }
    }
}

/// A value that must never reach a log line; `Debug` prints `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where the store lives; the scheme picks the backend.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    Postgres(Secret),
}

impl DatabaseUrl {
    fn parse(raw: &str) -> Result<Self, String> {
        if let Some(path) = raw.strip_prefix("sqlite://").or_else(|| raw.strip_prefix("sqlite:")) {
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() || path.starts_with(":memory:") {
                return Err("an in-memory SQLite database would lose every thread on restart".into());
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
            return Ok(Self::Postgres(Secret::new(raw)));
        }
        Err("unknown scheme".into())
    }

    /// The URL with any password replaced by `***`, safe to log.
    pub fn masked(&self) -> String {
        match self {
            Self::Sqlite(path) => format!("sqlite://{}", path.display()),
            Self::Postgres(url) => mask_url(url.expose()),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// A comma-separated list of origins, each without a trailing `/`.
fn origin_list(raw: &str) -> Vec<String> {
    raw.split(',').map(|o| o.trim().trim_end_matches('/').to_string()).filter(|o| !o.is_empty()).collect()
}

/// The first entry that is not an http(s) origin (`*` included).
fn first_non_origin(origins: &[String]) -> Option<&String> {
    origins.iter().find(|o| !(o.starts_with("http://") || o.starts_with("https://")))
}

/// `url` with its password and every secret-looking query value replaced by `***`, safe
/// to print. A password may itself hold `/`, `:`, `@`, `?` or `#` unescaped: the user
/// part runs to the last `@` anywhere (masking too much beats showing a password).
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (user, rest) = match rest.rsplit_once('@') {
        Some((userinfo, after)) => match userinfo.split_once(':') {
            Some((user, _password)) => (format!("{user}:***@"), after),
            None => (format!("{userinfo}@"), after),
        },
        None => (String::new(), rest),
    };
    let (location, query) = rest.split_at(rest.find(['?', '#']).unwrap_or(rest.len()));
    format!("{scheme}://{user}{location}{}", mask_query(query))
}

/// Query keys whose values are credentials (`password`, `sslpassword`, `api_key`, …).
const SECRET_KEY_PARTS: &[&str] = &["pass", "pwd", "secret", "token", "key", "auth", "cred", "sig"];

fn mask_query(query: &str) -> String {
    let Some(pairs) = query.strip_prefix('?') else { return query.to_string() };
    let (pairs, fragment) = pairs.split_at(pairs.find('#').unwrap_or(pairs.len()));
    let masked: Vec<String> = pairs
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if SECRET_KEY_PARTS.iter().any(|p| key.to_ascii_lowercase().contains(p)) => {
                format!("{key}=***")
            }
            _ => pair.to_string(),
        })
        .collect();
    format!("?{}{fragment}", masked.join("&"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Limits enforced per connection and per user. Each has a test that crosses it.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub rate_limit: u32,
    pub rate_window: Duration,
    pub connections_per_user: usize,
    pub runs_per_user: usize,
    pub send_queue: usize,
    /// Bytes a connection's outbox may hold; a replay page stops at this many too.
    pub send_queue_bytes: usize,
    /// Memory the store's caches may keep.
    pub cache_bytes: usize,
    pub replay_batch: u32,
    pub run_deadline: Duration,
    pub heartbeat_interval: Duration,
    pub idle_timeout: Duration,
    /// Least time between run events on a connection of the Netra web client, which
    /// processes at most one event per render; zero sends at full speed.
    pub web_client_pace: Duration,
    /// Time to send a request's headers, and to idle between two requests.
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    /// Accepted connections that have not sent a request yet.
    pub max_pending_connections: usize,
}

/// An OpenAI-compatible chat-completions endpoint.
#[derive(Clone, PartialEq, Eq)]
pub struct OpenAiEndpoint {
    /// Without a trailing `/`, e.g. `http://127.0.0.1:11434/v1`.
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub model: String,
    /// Longest wait for a reply to start, and between two streamed chunks.
    pub timeout: Duration,
}

impl OpenAiEndpoint {
    /// The base URL with any credentials masked: the form every message and log shows.
    pub fn shown_url(&self) -> String {
        mask_url(&self.base_url)
    }
}

impl fmt::Debug for OpenAiEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiEndpoint")
            .field("base_url", &self.shown_url())
            .field("api_key", &self.api_key)
            .field("model", &self.model)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// An identity provider whose signed access tokens netra accepts besides its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityProvider {
    pub jwks_url: String,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

/// Where runs get their words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LlmProvider {
    /// The offline builtin agent.
    Builtin,
    OpenAi(OpenAiEndpoint),
}

/// The model and what a run sends it.
#[derive(Debug, Clone)]
pub struct Llm {
    pub provider: LlmProvider,
    /// An unreachable endpoint stops startup instead of degrading runs.
    pub required: bool,
    pub system_prompt: String,
    /// Characters of earlier messages sent with a run.
    pub history_budget: usize,
    /// Longest a tool called by the model may run.
    pub tool_timeout: Duration,
}

/// Redis, for the nodes of a cluster to deliver each other's events.
#[derive(Clone, PartialEq, Eq)]
pub struct Redis {
    pub url: Secret,
    /// An unreachable Redis stops startup instead of degrading to one node's users.
    pub required: bool,
}

impl Redis {
    /// The URL with any password masked: the form every message and log shows.
    pub fn shown_url(&self) -> String {
        mask_url(self.url.expose())
    }
}

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redis").field("url", &self.shown_url()).field("required", &self.required).finish()
    }
}

/// Where analytics rows go, and how they wait: ClickHouse's HTTP interface. The URL holds
/// no credentials (refused) and the password is a [`Secret`]: `Debug` shows neither.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClickHouse {
    /// Without a trailing `/` and without credentials, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    pub user: String,
    pub password: Option<Secret>,
    /// A plain identifier (letters, digits, `_`), safe to write into SQL.
    pub database: String,
    /// An unreachable server stops startup instead of degrading analytics.
    pub required: bool,
    /// Rows held in memory before new ones are dropped.
    pub queue: usize,
    /// Rows per insert.
    pub batch: usize,
    /// Longest a row waits for its batch.
    pub interval: Duration,
    /// Where batches wait while the server is away, and how many bytes of them.
    pub spool_dir: PathBuf,
    pub spool_bytes: u64,
}

/// The whole validated configuration. Built once, then shared read-only.
#[derive(Debug, Clone)]
pub struct Config {
    pub environment: Environment,
    pub host: IpAddr,
    pub port: u16,
    pub data_dir: PathBuf,
    pub database: DatabaseUrl,
    pub db_timeout: Duration,
    /// `None` means: development, use (or create) the secret file in the data dir.
    pub jwt_secret: Option<Secret>,
    /// Accept access tokens signed by this provider too.
    pub identity_provider: Option<IdentityProvider>,
    pub dev_login: bool,
    pub dev_token_ttl: Duration,
    pub startup_wait: Duration,
    pub limits: Limits,
    pub drain_timeout: Duration,
    /// Threads of the async runtime; `None`: [`Config::worker_threads`] decides.
    pub workers: Option<usize>,
    /// The broker between nodes; `None`: this node alone (in-process).
    pub redis: Option<Redis>,
    /// `None`: the id kept in the data dir (see `cluster::node_id`).
    pub node_id: Option<String>,
    /// A node silent for this long is gone (shared PostgreSQL only).
    pub node_lease: Duration,
    pub agent_token_delay: Duration,
    /// Streamed text of a run is merged into one `partial_result` per this interval.
    pub stream_interval: Duration,
    pub llm: Llm,
    pub cors_origins: Vec<String>,
    /// Origins that may open a socket besides the server's own; `None` allows any.
    pub ws_origins: Option<Vec<String>>,
    pub echo_route: bool,
    /// Analytics into ClickHouse; `None` turns it off.
    pub analytics: Option<ClickHouse>,
    pub log_filter: String,
    pub log_format: LogFormat,
}

impl Config {
    /// Threads of the async runtime on a machine of `cores` cores: as configured, else
    /// one per core, less the core SQLite's writer thread keeps busy under load. On 2
    /// cores, two workers beside that thread measured ~20 % more CPU per chat message and
    /// ~20 % more memory per idle connection than one (bench/PROFILE.md, 26). PostgreSQL's
    /// writer is a task of the runtime: every core.
    pub fn worker_threads(&self, cores: usize) -> usize {
        self.workers.unwrap_or(match self.database {
            DatabaseUrl::Sqlite(_) => cores.saturating_sub(1).max(1),
            DatabaseUrl::Postgres(_) => cores.max(1),
        })
    }
}

/// The longest any run may take, whatever the configuration says.
pub const MAX_RUN_DEADLINE: Duration = Duration::from_secs(120);
/// The smallest send queue that a client reading at full speed never overflows.
pub const MIN_SEND_QUEUE: usize = 16;
/// The frame limit may not go below this: the client's input box allows 10 000 characters.
pub const MIN_FRAME_BYTES: usize = 64 * 1024;

/// Reads the process environment and the config file. The one place that may.
#[allow(clippy::disallowed_methods)]
pub fn from_process(file: Option<&Path>) -> Result<Config, Vec<ConfigError>> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    load(&env, file)
}

/// Builds the configuration from an environment map and an optional TOML file whose keys
/// are the variable names, lower-cased, with `NETRA_` dropped (`data_dir = "/srv/netra"`).
pub fn load(env: &BTreeMap<String, String>, file: Option<&Path>) -> Result<Config, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut values: BTreeMap<&'static str, String> = BTreeMap::new();
    if let Some(path) = file {
        match read_file(path) {
            Ok(entries) => {
                for (key, value) in entries {
                    match VARIABLES.iter().find(|v| file_key(v.name) == key) {
                        Some(v) => {
                            values.insert(v.name, value);
                        }
                        None => errors.push(ConfigError {
                            var: key.to_ascii_uppercase(),
                            value: None,
                            problem: format!("unknown key in {}", path.display()),
                            fix: "remove it or correct its spelling (see the README's table)".into(),
                        }),
                    }
                }
            }
            Err(problem) => errors.push(ConfigError {
                var: "--config".into(),
                value: Some(path.display().to_string()),
                problem,
                fix: "pass a readable TOML file of `key = value` lines".into(),
            }),
        }
    }
    for (key, value) in env {
        if let Some(v) = VARIABLES.iter().find(|v| v.name == key) {
            values.insert(v.name, value.clone());
        } else if key.starts_with("NETRA_") {
            // Its value stays unprinted: a misspelled secret is still a secret.
            errors.push(ConfigError {
                var: key.clone(),
                value: None,
                problem: "not a netra setting".into(),
                fix: "remove it or correct its spelling (see the README's table)".into(),
            });
        }
    }
    let mut r = Reader { values, errors };
    let config = r.build();
    if r.errors.is_empty() { Ok(config) } else { Err(r.errors) }
}

fn file_key(name: &str) -> String {
    name.strip_prefix("NETRA_").unwrap_or(name).to_ascii_lowercase()
}

fn read_file(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| format!("not valid TOML: {}", e.message()))?;
    Ok(table
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                toml::Value::String(s) => s,
                toml::Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().map(str::to_string).unwrap_or_else(|| i.to_string()))
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            (k, v)
        })
        .collect())
}

struct Reader {
    values: BTreeMap<&'static str, String>,
    errors: Vec<ConfigError>,
}

impl Reader {
    fn raw(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    fn fail(&mut self, name: &str, problem: impl Into<String>, fix: impl Into<String>) {
        let secret = VARIABLES.iter().any(|v| v.name == name && v.secret);
        let value = self.raw(name).map(|v| if secret { "***".to_string() } else { mask_url(v) });
        self.errors.push(ConfigError { var: name.to_string(), value, problem: problem.into(), fix: fix.into() });
    }

    fn parse<T: FromStr>(&mut self, name: &str, default: T, fix: &str) -> T
    where
        T::Err: fmt::Display,
    {
        let Some(raw) = self.raw(name) else { return default };
        match raw.parse::<T>() {
            Ok(v) => v,
            Err(e) => {
                self.fail(name, e.to_string(), fix);
                default
            }
        }
    }

    fn duration(&mut self, name: &str, default: Duration) -> Duration {
        let Some(raw) = self.raw(name) else { return default };
        match humantime::parse_duration(raw) {
            Ok(d) => d,
            Err(e) => {
                self.fail(name, e.to_string(), "write a duration such as 500ms, 30s, 2m or 1h");
                default
            }
        }
    }

    fn positive<T: FromStr + PartialEq + Default + Copy>(&mut self, name: &str, default: T) -> T
    where
        T::Err: fmt::Display,
    {
        let v = self.parse(name, default, "write a positive whole number");
        if v == T::default() {
            self.fail(name, "must be greater than zero", "write a positive whole number");
            return default;
        }
        v
    }

    fn identity_provider(&mut self) -> Option<IdentityProvider> {
        let issuer = self.raw("JWT_ISSUER").map(str::to_string);
        let audience = self.raw("JWT_AUDIENCE").map(str::to_string);
        let Some(jwks_url) = self.raw("JWT_JWKS_URL").map(str::to_string) else {
            for name in ["JWT_ISSUER", "JWT_AUDIENCE"] {
                if self.raw(name).is_some() {
                    self.fail(name, "has no effect without JWT_JWKS_URL", "set JWT_JWKS_URL too, or remove it");
                }
            }
            return None;
        };
        let host = jwks_url.strip_prefix("https://").or_else(|| jwks_url.strip_prefix("http://"));
        if host.is_none_or(str::is_empty) {
            self.fail("JWT_JWKS_URL", "not an http(s) URL", "write e.g. https://idp.example.com/.well-known/jwks.json");
        }
        Some(IdentityProvider { jwks_url, issuer, audience })
    }

    fn llm(&mut self) -> Llm {
        let base_url = self.raw("LLM_BASE_URL").map(|u| u.trim_end_matches('/').to_string());
        if let Some(url) = &base_url {
            let host = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
            if host.is_none_or(str::is_empty) {
                self.fail("LLM_BASE_URL", "not an http(s) URL", "write e.g. http://127.0.0.1:11434/v1");
            }
        }
        let openai = match self.raw("LLM_PROVIDER").map(str::to_ascii_lowercase).as_deref() {
            None => base_url.is_some(),
            Some("builtin") => false,
            Some("openai") => {
                if base_url.is_none() {
                    self.fail(
                        "LLM_BASE_URL",
                        "required when LLM_PROVIDER is openai",
                        "set it to the endpoint, e.g. https://api.openai.com/v1 or http://127.0.0.1:11434/v1",
                    );
                }
                true
            }
            Some(_) => {
                self.fail("LLM_PROVIDER", "not builtin or openai", "use builtin or openai");
                false
            }
        };
        let api_key = self.raw("LLM_API_KEY").map(Secret::new);
        let model = self.raw("LLM_MODEL").unwrap_or(DEFAULT_MODEL).to_string();
        let timeout = self.duration("LLM_TIMEOUT", Duration::from_secs(60));
        if timeout.is_zero() {
            self.fail("LLM_TIMEOUT", "must be above zero", "use a duration such as 60s");
        }
        let required = self.parse("LLM_REQUIRED", false, "write true or false");
        let system_prompt = self.raw("NETRA_SYSTEM_PROMPT").unwrap_or(DEFAULT_SYSTEM_PROMPT).to_string();
        let history_budget = self.parse("NETRA_HISTORY_BUDGET", 24_000usize, "write a number of characters");
        let tool_timeout = self.duration("NETRA_TOOL_TIMEOUT", Duration::from_secs(5));
        if tool_timeout.is_zero() {
            self.fail("NETRA_TOOL_TIMEOUT", "must be above zero", "use a duration such as 5s");
        }
        let provider = match base_url {
            Some(base_url) if openai => LlmProvider::OpenAi(OpenAiEndpoint { base_url, api_key, model, timeout }),
            _ => LlmProvider::Builtin,
        };
        Llm { provider, required, system_prompt, history_budget, tool_timeout }
    }

    fn clickhouse(&mut self, data_dir: &Path) -> Option<ClickHouse> {
        let queue = self.positive("NETRA_ANALYTICS_QUEUE", 20_000usize);
        let batch = self.positive("NETRA_ANALYTICS_BATCH", 5_000usize);
        let interval = self.duration("NETRA_ANALYTICS_INTERVAL", Duration::from_secs(1));
        if interval.is_zero() {
            self.fail("NETRA_ANALYTICS_INTERVAL", "must be above zero", "use a duration such as 1s");
        }
        let spool_bytes = self.parse("NETRA_ANALYTICS_SPOOL_BYTES", 64u64 << 20, "write a number of bytes");
        let required = self.parse("CLICKHOUSE_REQUIRED", false, "write true or false");
        let user = self.raw("CLICKHOUSE_USER").unwrap_or("default").to_string();
        let password = self.raw("CLICKHOUSE_PASSWORD").map(Secret::new);
        let database = self.raw("CLICKHOUSE_DATABASE").unwrap_or("netra").to_string();
        let Some(raw) = self.raw("CLICKHOUSE_URL").map(|u| u.trim_end_matches('/').to_string()) else {
            for name in ["CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD", "CLICKHOUSE_DATABASE", "CLICKHOUSE_REQUIRED"] {
                if self.raw(name).is_some() {
                    self.fail(name, "has no effect without CLICKHOUSE_URL", "set CLICKHOUSE_URL too, or remove it");
                }
            }
            return None;
        };
        let host = raw.strip_prefix("http://").or_else(|| raw.strip_prefix("https://"));
        match host {
            None | Some("") => {
                self.fail(
                    "CLICKHOUSE_URL",
                    "not an http(s) URL",
                    "write ClickHouse's HTTP interface, e.g. http://127.0.0.1:8123",
                );
            }
            Some(rest) if rest.split('/').next().is_some_and(|authority| authority.contains('@')) => {
                self.fail(
                    "CLICKHOUSE_URL",
                    "holds credentials",
                    "put the user in CLICKHOUSE_USER and the password in CLICKHOUSE_PASSWORD",
                );
            }
            Some(_) => {}
        }
        if password.is_none() && user != "default" {
            self.fail(
                "CLICKHOUSE_PASSWORD",
                format!("required for CLICKHOUSE_USER={user:?}"),
                "set the password of that ClickHouse user",
            );
        }
        if database.is_empty() || !database.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            self.fail("CLICKHOUSE_DATABASE", "not a plain name", "use letters, digits and _ only, e.g. netra");
        }
        Some(ClickHouse {
            url: raw,
            user,
            password,
            database,
            required,
            queue,
            batch,
            interval,
            spool_dir: data_dir.join("analytics-spool"),
            spool_bytes,
        })
    }

    fn build(&mut self) -> Config {
        let environment = self.parse("ENVIRONMENT", Environment::Development, "use development, staging or production");
        let dev = environment == Environment::Development;
        let host = self.parse("HOST", IpAddr::from([127, 0, 0, 1]), "write an IP address such as 127.0.0.1 or 0.0.0.0");
        let port = self.parse("PORT", 8000u16, "write a port number from 0 to 65535");
        let data_dir = PathBuf::from(self.raw("NETRA_DATA_DIR").unwrap_or("./data"));
        let database = match self.raw("DATABASE_URL") {
            None => DatabaseUrl::Sqlite(data_dir.join("netra.db")),
            Some(raw) => match DatabaseUrl::parse(raw) {
                Ok(url) => url,
                Err(problem) => {
                    let fix = "use sqlite://PATH or postgres://USER@HOST:PORT/DB";
                    let masked = mask_url(raw);
                    self.errors.push(ConfigError {
                        var: "DATABASE_URL".into(),
                        value: Some(masked),
                        problem,
                        fix: fix.into(),
                    });
                    DatabaseUrl::Sqlite(data_dir.join("netra.db"))
                }
            },
        };
        let db_timeout = self.duration("NETRA_DB_TIMEOUT", Duration::from_secs(10));
        let jwt_secret = self.raw("JWT_SECRET").map(Secret::new);
        match &jwt_secret {
            Some(s) if !dev && s.expose().len() < 16 => {
                self.fail("JWT_SECRET", "shorter than 16 characters", "generate one with `openssl rand -hex 32`")
            }
            None if !dev => self.errors.push(ConfigError {
                var: "JWT_SECRET".into(),
                value: None,
                problem: "required when ENVIRONMENT is staging or production".into(),
                fix: "set it to a random string, e.g. from `openssl rand -hex 32`".into(),
            }),
            _ => {}
        }
        let identity_provider = self.identity_provider();
        let dev_login = self.parse("NETRA_DEV_LOGIN", dev, "write true or false");
        let dev_token_ttl = self.duration("NETRA_DEV_TOKEN_TTL", Duration::from_secs(24 * 3600));
        let startup_wait = self.duration("NETRA_STARTUP_WAIT", Duration::from_secs(30));
        let max_frame_bytes = self.parse("NETRA_MAX_FRAME_BYTES", 128 * 1024usize, "write a size in bytes");
        if max_frame_bytes < MIN_FRAME_BYTES {
            self.fail(
                "NETRA_MAX_FRAME_BYTES",
                format!("below {MIN_FRAME_BYTES}, which would cut long messages from the web client"),
                "use 65536 or more",
            );
        }
        let rate_limit = self.positive("NETRA_RATE_LIMIT", 120u32);
        let rate_window = self.duration("NETRA_RATE_WINDOW", Duration::from_secs(60));
        let connections_per_user = self.positive("NETRA_MAX_CONNECTIONS_PER_USER", 10usize);
        let runs_per_user = self.positive("NETRA_MAX_RUNS_PER_USER", 3usize);
        let send_queue = self.parse("NETRA_SEND_QUEUE", 1024usize, "write a whole number of frames");
        if send_queue < MIN_SEND_QUEUE {
            // One commit publishes up to a handful of frames at once (a new thread's
            // first job has three), so a smaller queue overflows on a client that keeps up.
            self.fail("NETRA_SEND_QUEUE", format!("below {MIN_SEND_QUEUE}"), "use 16 or more");
        }
        let send_queue_bytes = self.parse("NETRA_SEND_QUEUE_BYTES", 2 * 1024 * 1024usize, "write a size in bytes");
        if send_queue_bytes < MIN_FRAME_BYTES {
            self.fail(
                "NETRA_SEND_QUEUE_BYTES",
                format!("below {MIN_FRAME_BYTES}"),
                "use 1048576 to 4194304; it must hold a few frames",
            );
        }
        let cache_bytes = self.parse("NETRA_CACHE_BYTES", crate::store::DEFAULT_CACHE_BYTES, "write a size in bytes");
        if cache_bytes < 1 << 20 {
            self.fail("NETRA_CACHE_BYTES", "below 1048576", "use 1048576 or more (the default is 50331648)");
        }
        let replay_batch = self.positive("NETRA_REPLAY_BATCH", 500u32);
        let run_deadline = self.duration("NETRA_RUN_DEADLINE", MAX_RUN_DEADLINE);
        if run_deadline > MAX_RUN_DEADLINE || run_deadline.is_zero() {
            self.fail("NETRA_RUN_DEADLINE", "must be above zero and at most 120s", "use a duration up to 120s");
        }
        let heartbeat_interval = self.duration("NETRA_HEARTBEAT_INTERVAL", Duration::from_secs(20));
        let idle_timeout = self.duration("NETRA_IDLE_TIMEOUT", Duration::from_secs(60));
        if heartbeat_interval.is_zero() || heartbeat_interval >= idle_timeout {
            self.fail(
                "NETRA_HEARTBEAT_INTERVAL",
                "must be above zero and shorter than NETRA_IDLE_TIMEOUT",
                "pings keep healthy clients from idling out; use e.g. 20s with a 60s idle timeout",
            );
        }
        let header_timeout = self.duration("NETRA_HEADER_TIMEOUT", Duration::from_secs(10));
        let request_timeout = self.duration("NETRA_REQUEST_TIMEOUT", Duration::from_secs(30));
        for (name, value) in [("NETRA_HEADER_TIMEOUT", header_timeout), ("NETRA_REQUEST_TIMEOUT", request_timeout)] {
            if value.is_zero() {
                self.fail(name, "must be above zero", "use a duration such as 10s");
            }
        }
        let max_pending_connections = self.positive("NETRA_MAX_PENDING_CONNECTIONS", 512usize);
        let drain_timeout = self.duration("NETRA_DRAIN_TIMEOUT", Duration::from_secs(10));
        let redis_required = self.parse("REDIS_REQUIRED", false, "write true or false");
        let redis = match self.raw("REDIS_URL") {
            None => {
                if self.raw("REDIS_REQUIRED").is_some() {
                    self.fail("REDIS_REQUIRED", "has no effect without REDIS_URL", "set REDIS_URL too, or remove it");
                }
                None
            }
            Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
                Some(Redis { url: Secret::new(url), required: redis_required })
            }
            Some(_) => {
                self.fail("REDIS_URL", "not a redis:// URL", "write e.g. redis://127.0.0.1:6379");
                None
            }
        };
        let node_id = self.raw("NETRA_NODE_ID").map(str::to_string);
        if let Some(id) = &node_id
            && (id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            self.fail("NETRA_NODE_ID", "not a plain name of at most 64 characters", "use letters, digits, - _ and .");
        }
        let node_lease = self.duration("NETRA_NODE_LEASE", Duration::from_secs(15));
        if node_lease < Duration::from_secs(3) {
            self.fail("NETRA_NODE_LEASE", "shorter than 3s", "use a duration such as 15s");
        }
        let agent_token_delay = self.duration("NETRA_AGENT_TOKEN_DELAY", Duration::from_millis(15));
        let stream_interval = self.duration("NETRA_STREAM_INTERVAL", Duration::from_millis(100));
        let workers = match self.raw("NETRA_WORKER_THREADS") {
            None | Some("auto") => None,
            Some(_) => Some(self.positive("NETRA_WORKER_THREADS", 1usize)),
        };
        let web_client_pace = self.duration("NETRA_WEB_CLIENT_PACE", Duration::from_millis(250));
        let llm = self.llm();
        let cors_origins =
            origin_list(self.raw("NETRA_CORS_ORIGINS").unwrap_or("http://localhost:3000,http://127.0.0.1:3000"));
        if let Some(bad) = first_non_origin(&cors_origins) {
            let problem = format!("{bad:?} is not an origin (credentials need exact origins, never *)");
            self.fail("NETRA_CORS_ORIGINS", problem, "list origins such as http://localhost:3000");
        }
        let ws_origins = match self.raw("NETRA_WS_ORIGINS") {
            None => Some(cors_origins.clone()),
            Some("*") => None,
            Some(list) => {
                let origins = origin_list(list);
                if let Some(bad) = first_non_origin(&origins) {
                    let problem = format!("{bad:?} is not an origin");
                    self.fail("NETRA_WS_ORIGINS", problem, "list origins such as https://chat.example.com, or *");
                }
                Some(origins)
            }
        };
        let echo_route = self.parse("NETRA_ECHO_ROUTE", false, "write true or false");
        let analytics = self.clickhouse(&data_dir);
        let log_filter = self.raw("NETRA_LOG").unwrap_or("info").to_string();
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_filter) {
            self.fail("NETRA_LOG", e.to_string(), "use a filter such as info or netra=debug,info");
        }
        let log_format = match self.raw("NETRA_LOG_FORMAT") {
            None if dev => LogFormat::Pretty,
            None => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(_) => {
                self.fail("NETRA_LOG_FORMAT", "not pretty or json", "use pretty or json");
                LogFormat::Pretty
            }
        };
        Config {
            environment,
            host,
            port,
            data_dir,
            database,
            db_timeout,
            jwt_secret,
            identity_provider,
            dev_login,
            dev_token_ttl,
            startup_wait,
            limits: Limits {
                max_frame_bytes,
                rate_limit,
                rate_window,
                connections_per_user,
                runs_per_user,
                send_queue,
                send_queue_bytes,
                cache_bytes,
                replay_batch,
                run_deadline,
                heartbeat_interval,
                idle_timeout,
                web_client_pace,
                header_timeout,
                request_timeout,
                max_pending_connections,
            },
            drain_timeout,
            workers,
            redis,
            node_id,
            node_lease,
            agent_token_delay,
            stream_interval,
            llm,
            cors_origins,
            ws_origins,
            echo_route,
            analytics,
            log_filter,
            log_format,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn empty_environment_gives_embedded_defaults() {
        let c = load(&env(&[]), None).expect("defaults are valid");
        assert_eq!(c.environment, Environment::Development);
        assert_eq!(c.port, 8000);
        assert_eq!(c.database, DatabaseUrl::Sqlite(PathBuf::from("./data/netra.db")));
        assert!(c.dev_login);
        assert_eq!(c.limits.max_frame_bytes, 131072);
        assert_eq!(c.limits.rate_limit, 120);
        assert_eq!(c.limits.connections_per_user, 10);
        assert_eq!(c.limits.run_deadline, Duration::from_secs(120));
    }

    #[test]
    fn config_lists_every_invalid_variable() {
        let errors = load(
            &env(&[
                ("PORT", "eighty"),
                ("NETRA_MAX_FRAME_BYTES", "1024"),
                ("NETRA_RUN_DEADLINE", "10m"),
                ("NETRA_BOGUS", "1"),
            ]),
            None,
        )
        .expect_err("four problems");
        let vars: Vec<&str> = errors.iter().map(|e| e.var.as_str()).collect();
        assert_eq!(vars.len(), 4, "{errors:?}");
        for v in ["PORT", "NETRA_MAX_FRAME_BYTES", "NETRA_RUN_DEADLINE", "NETRA_BOGUS"] {
            assert!(vars.contains(&v), "{v} missing from {vars:?}");
        }
    }

    #[test]
    fn production_requires_a_secret_and_turns_dev_login_off() {
        let errors = load(&env(&[("ENVIRONMENT", "production")]), None).expect_err("no secret");
        assert_eq!(errors[0].var, "JWT_SECRET");
        let c =
            load(&env(&[("ENVIRONMENT", "production"), ("JWT_SECRET", "0123456789abcdef0123")]), None).expect("valid");
        assert!(!c.dev_login);
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn secrets_and_passwords_never_print() {
        let c = load(
            &env(&[("JWT_SECRET", "super-secret-value-123"), ("DATABASE_URL", "postgres://bob:hunter2@db:5432/netra")]),
            None,
        )
        .expect("valid");
        let shown = format!("{c:?}");
        assert!(!shown.contains("super-secret"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("postgres://bob:***@db:5432/netra"), "{shown}");
        let errors =
            load(&env(&[("ENVIRONMENT", "production"), ("JWT_SECRET", "short")]), None).expect_err("too short");
        assert!(!errors[0].to_string().contains("short\""), "{}", errors[0]);
    }

    #[test]
    fn urls_are_masked_however_the_password_is_written() {
        for (url, shown) in [
            ("postgres://bob:hunter2@db:5432/netra", "postgres://bob:***@db:5432/netra"),
            ("postgres://bob:hun/ter@2@db/netra", "postgres://bob:***@db/netra"),
            (
                "postgres://db/netra?user=bob&password=hunter2&sslmode=require",
                "postgres://db/netra?user=bob&password=***&sslmode=require",
            ),
            ("http://user:pa:ss@host:8080/v1", "http://user:***@host:8080/v1"),
            ("https://host/v1?api_key=sk-1#frag", "https://host/v1?api_key=***#frag"),
            ("postgres://postgres@127.0.0.1/test", "postgres://postgres@127.0.0.1/test"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(mask_url(url), shown, "{url}");
        }
    }

    proptest::proptest! {
        /// Whatever a password holds (`/`, `:`, `@` included), the masked URL does not show it.
        #[test]
        fn a_masked_url_never_shows_its_password(password in "[A-Za-z0-9/:@?#!$%&*+=~-]{8,40}", tail in "(/[a-z]{1,8})?(\\?sslmode=require)?") {
            let url = format!("postgres://netra:{password}@db.internal:5432{tail}");
            let shown = mask_url(&url);
            proptest::prop_assert!(!shown.contains(&password), "{} shows the password", shown);
            proptest::prop_assert!(shown.starts_with("postgres://netra:***@"), "{}", shown);
        }
    }

    #[test]
    fn no_credential_reaches_a_config_error_or_the_printed_config() {
        let leaks = |vars: &[(&str, &str)], secret: &str| {
            let shown = match load(&env(vars), None) {
                Ok(c) => format!("{c:?}"),
                Err(errors) => errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"),
            };
            assert!(!shown.contains(secret), "{secret} printed: {shown}");
        };
        leaks(&[("DATABASE_URL", "postgres://db/netra?password=hunter2")], "hunter2");
        leaks(&[("DATABASE_URL", "postgres://bob:hun/ter2@db/netra")], "ter2");
        leaks(&[("DATABASE_URL", "mysql://bob:hunter2@db/netra")], "hunter2");
        leaks(&[("NETRA_JWT_SECRE", "misspelled-secret-value")], "misspelled-secret-value");
        leaks(&[("LLM_BASE_URL", "ftp://user:hunter2@host/v1")], "hunter2");
        leaks(&[("LLM_BASE_URL", "http://user:hunter2@host/v1")], "hunter2");
    }

    #[test]
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("netra.toml");
        std::fs::write(&path, "port = 9000\ndata_dir = \"/srv/netra\"\nrate_limit = 7\n").expect("write");
        let c = load(&env(&[("PORT", "9001")]), Some(&path)).expect("valid");
        assert_eq!(c.port, 9001);
        assert_eq!(c.data_dir, PathBuf::from("/srv/netra"));
        assert_eq!(c.limits.rate_limit, 7);
        std::fs::write(&path, "prot = 1\n").expect("write");
        let errors = load(&env(&[]), Some(&path)).expect_err("unknown key");
        assert_eq!(errors[0].var, "PROT");
    }

    #[test]
    fn the_runtime_leaves_sqlites_writer_a_core_unless_told() {
        let sqlite = load(&env(&[]), None).expect("defaults are valid");
        assert_eq!([1, 2, 8].map(|cores| sqlite.worker_threads(cores)), [1, 1, 7]);
        let pg = load(&env(&[("DATABASE_URL", "postgres://db.internal/netra")]), None).expect("valid");
        assert_eq!([1, 2, 8].map(|cores| pg.worker_threads(cores)), [1, 2, 8]);
        let told = load(&env(&[("NETRA_WORKER_THREADS", "3")]), None).expect("valid");
        assert_eq!(told.worker_threads(2), 3);
        let auto = load(&env(&[("NETRA_WORKER_THREADS", "auto")]), None).expect("valid");
        assert_eq!(auto.worker_threads(4), 3);
        for bad in ["0", "-1", "many"] {
            let errors = load(&env(&[("NETRA_WORKER_THREADS", bad)]), None).expect_err(bad);
            let vars: Vec<&str> = errors.iter().map(|e| e.var.as_str()).collect();
            assert_eq!(vars, vec!["NETRA_WORKER_THREADS"], "{bad}: {errors:?}");
        }
    }

    #[test]
    fn the_readme_documents_every_variable_with_its_default() {
        let readme = include_str!("../README.md");
        for v in VARIABLES {
            let row = format!("| `{}` | {} |", v.name, v.default);
            assert!(readme.contains(&row), "README lacks the row starting {row}");
        }
    }

    #[test]
    fn a_base_url_implies_the_openai_provider() {
        let c = load(&env(&[]), None).expect("defaults are valid");
        assert_eq!(c.llm.provider, LlmProvider::Builtin);
        assert!(!c.llm.required);
        let c = load(&env(&[("LLM_BASE_URL", "http://127.0.0.1:11434/v1/"), ("LLM_API_KEY", "sk-hidden-key")]), None)
            .expect("valid");
        let LlmProvider::OpenAi(endpoint) = &c.llm.provider else { panic!("openai implied: {c:?}") };
        assert_eq!(endpoint.base_url, "http://127.0.0.1:11434/v1");
        assert_eq!(endpoint.model, "gpt-4o-mini");
        assert_eq!(endpoint.timeout, Duration::from_secs(60));
        assert_eq!(c.llm.history_budget, 24_000);
        assert!(!format!("{c:?}").contains("sk-hidden-key"));
        let c = load(&env(&[("LLM_PROVIDER", "builtin"), ("LLM_BASE_URL", "http://h/v1")]), None).expect("valid");
        assert_eq!(c.llm.provider, LlmProvider::Builtin, "an explicit choice wins");
    }

    #[test]
    fn llm_settings_are_validated_together() {
        let errors = load(&env(&[("LLM_PROVIDER", "openai"), ("LLM_TIMEOUT", "soon")]), None).expect_err("invalid");
        let vars: Vec<&str> = errors.iter().map(|e| e.var.as_str()).collect();
        assert_eq!(vars, vec!["LLM_BASE_URL", "LLM_TIMEOUT"], "{errors:?}");
        let errors = load(&env(&[("LLM_BASE_URL", "ftp://x"), ("LLM_PROVIDER", "claude")]), None).expect_err("bad");
        let vars: Vec<&str> = errors.iter().map(|e| e.var.as_str()).collect();
        assert_eq!(vars, vec!["LLM_BASE_URL", "LLM_PROVIDER"], "{errors:?}");
    }

    #[test]
    fn analytics_is_off_by_default_and_its_settings_are_checked_together() {
        assert!(load(&env(&[]), None).expect("defaults").analytics.is_none());
        let c = load(&env(&[("CLICKHOUSE_URL", "http://127.0.0.1:8123/")]), None).expect("valid");
        let ch = c.analytics.expect("on");
        assert_eq!(
            (ch.url.as_str(), ch.user.as_str(), ch.database.as_str()),
            ("http://127.0.0.1:8123", "default", "netra")
        );
        assert!(!ch.required);
        assert_eq!(ch.spool_dir, PathBuf::from("./data/analytics-spool"));
        let errors = load(
            &env(&[
                ("CLICKHOUSE_URL", "http://ops:pa55word@ch:8123"),
                ("CLICKHOUSE_USER", "netra"),
                ("CLICKHOUSE_DATABASE", "netra; DROP TABLE x"),
                ("CLICKHOUSE_REQUIRED", "yes"),
                ("NETRA_ANALYTICS_INTERVAL", "0s"),
            ]),
            None,
        )
        .expect_err("every problem at once");
        let vars: Vec<&str> = errors.iter().map(|e| e.var.as_str()).collect();
        for var in [
            "CLICKHOUSE_URL",
            "CLICKHOUSE_PASSWORD",
            "CLICKHOUSE_DATABASE",
            "CLICKHOUSE_REQUIRED",
            "NETRA_ANALYTICS_INTERVAL",
        ] {
            assert!(vars.contains(&var), "{var} missing from {errors:?}");
        }
        let shown = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        assert!(!shown.contains("pa55word"), "{shown}");
        let errors = load(&env(&[("CLICKHOUSE_PASSWORD", "s3cret-value")]), None).expect_err("no URL");
        assert_eq!(errors[0].var, "CLICKHOUSE_PASSWORD");
        assert!(!errors[0].to_string().contains("s3cret-value"));
        let c = load(
            &env(&[("CLICKHOUSE_URL", "http://ch:8123"), ("CLICKHOUSE_USER", "netra"), ("CLICKHOUSE_PASSWORD", "pw")]),
            None,
        )
        .expect("valid");
        assert!(!format!("{c:?}").contains("\"pw\""), "the password never prints");
    }

    #[test]
    fn the_cache_budget_is_a_size_of_at_least_one_mebibyte() {
        assert_eq!(load(&env(&[]), None).expect("defaults").limits.cache_bytes, crate::store::DEFAULT_CACHE_BYTES);
        let c = load(&env(&[("NETRA_CACHE_BYTES", "2097152")]), None).expect("valid");
        assert_eq!(c.limits.cache_bytes, 2_097_152);
        for bad in ["1048575", "lots", "-1"] {
            let errors = load(&env(&[("NETRA_CACHE_BYTES", bad)]), None).expect_err(bad);
            let vars: Vec<&str> = errors.iter().map(|e| e.var.as_str()).collect();
            assert_eq!(vars, vec!["NETRA_CACHE_BYTES"], "{bad}: {errors:?}");
            assert_eq!(errors[0].value.as_deref(), Some(bad));
        }
    }

    #[test]
    fn unknown_database_scheme_is_an_error() {
        let errors = load(&env(&[("DATABASE_URL", "mysql://x")]), None).expect_err("bad scheme");
        assert_eq!(errors[0].var, "DATABASE_URL");
    }
}
