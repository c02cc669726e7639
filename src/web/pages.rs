//! The pages netra serves to a browser: the chat page at `/`, the operator page at
//! `/status`, their scripts, styles and favicon. Every file is embedded in the binary, so
//! the pages work offline and need no build step. The pages only call the public
//! endpoints (`/auth/*`, `/api/*`, `/ws`, `/health*`, `/metrics`), which enforce what
//! they enforce: this module holds no data and checks nothing.

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// No inline script or style anywhere, no framing, no plugins; the socket and the REST
/// calls go to this origin only (CSP3 lets `'self'` match `ws:`/`wss:` of the same host).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

/// A file of a page: its content type and bytes.
struct Asset {
    content_type: &'static str,
    body: &'static str,
}

const INDEX: Asset = Asset { content_type: "text/html; charset=utf-8", body: include_str!("static/index.html") };
const STATUS: Asset = Asset { content_type: "text/html; charset=utf-8", body: include_str!("static/status.html") };
const APP_JS: Asset = Asset { content_type: "text/javascript; charset=utf-8", body: include_str!("static/app.js") };
const COMMON_JS: Asset =
    Asset { content_type: "text/javascript; charset=utf-8", body: include_str!("static/common.js") };
const MARKDOWN_JS: Asset =
    Asset { content_type: "text/javascript; charset=utf-8", body: include_str!("static/markdown.js") };
const STATUS_JS: Asset =
    Asset { content_type: "text/javascript; charset=utf-8", body: include_str!("static/status.js") };
const APP_CSS: Asset = Asset { content_type: "text/css; charset=utf-8", body: include_str!("static/app.css") };
const FAVICON: Asset = Asset { content_type: "image/svg+xml", body: include_str!("static/favicon.svg") };

impl Asset {
    fn respond(&self) -> Response {
        (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static(self.content_type)),
                // Embedded files change only with the binary: revalidate, never serve stale.
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
                (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
                (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
                (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
                (HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin")),
            ],
            self.body,
        )
            .into_response()
    }
}

/// The page routes, to be merged into the API router.
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { INDEX.respond() }))
        .route("/status", get(|| async { STATUS.respond() }))
        .route("/static/app.js", get(|| async { APP_JS.respond() }))
        .route("/static/common.js", get(|| async { COMMON_JS.respond() }))
        .route("/static/markdown.js", get(|| async { MARKDOWN_JS.respond() }))
        .route("/static/status.js", get(|| async { STATUS_JS.respond() }))
        .route("/static/app.css", get(|| async { APP_CSS.respond() }))
        .route("/favicon.svg", get(|| async { FAVICON.respond() }))
        .route("/favicon.ico", get(|| async { FAVICON.respond() }))
}
