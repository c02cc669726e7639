//! Routes the Netra web client calls at start for features netra does not have (service
//! discovery, MCP servers). Each answers the empty shape the client's services accept, so
//! its console stays clean and nothing it shows is made up (docs/protocol.md).

use axum::Json;
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::protocol::now_rfc3339;

/// `GET /api/discovery/services`: the client asks where the backend's services run.
#[derive(Serialize, ToSchema)]
pub(crate) struct Services {
    /// Keyed by service name; empty: the client keeps the URLs it was built with.
    #[schema(value_type = Object)]
    services: Map<String, Value>,
    timestamp: String,
    /// False: netra publishes no discovery files.
    available: bool,
}

#[utoipa::path(get, path = "/api/discovery/services", tag = "client",
    responses((status = 200, body = Services)))]
pub(crate) async fn discovery() -> Json<Services> {
    Json(Services { services: Map::new(), timestamp: now_rfc3339(), available: false })
}

/// The envelope of the client's MCP service (`MCPApiResponse`).
#[derive(Serialize, ToSchema)]
pub(crate) struct McpResponse {
    success: bool,
    /// A list, or for `/api/mcp/config` an object.
    data: Value,
    message: &'static str,
}

const NO_MCP: &str = "netra has no MCP servers";

fn mcp(data: Value) -> Json<McpResponse> {
    Json(McpResponse { success: true, data, message: NO_MCP })
}

#[utoipa::path(get, path = "/api/mcp/servers", tag = "client", responses((status = 200, body = McpResponse)))]
pub(crate) async fn mcp_servers() -> Json<McpResponse> {
    mcp(Value::Array(Vec::new()))
}

#[utoipa::path(get, path = "/api/mcp/tools", tag = "client", responses((status = 200, body = McpResponse)))]
pub(crate) async fn mcp_tools() -> Json<McpResponse> {
    mcp(Value::Array(Vec::new()))
}

#[utoipa::path(get, path = "/api/mcp/config", tag = "client", responses((status = 200, body = McpResponse)))]
pub(crate) async fn mcp_config() -> Json<McpResponse> {
    mcp(serde_json::json!({"mcpServers": {}}))
}
