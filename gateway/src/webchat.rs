//! The browser chat page at `/` on the HTTP port. Its markup and styles
//! (`web/src`) and its script (bundled by `web/build.sh` into `web/dist`,
//! committed) are embedded in the binary here, so `pingme serve` needs
//! nothing on disk. Every file goes
//! out with its content type and a Content-Security-Policy that lets the
//! page load only its own files and connect only to this server: its HTTP
//! API and its WebSocket endpoint.

use axum::Router;
use axum::http::uri::Authority;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// One embedded file of the page.
#[derive(Debug, Clone, Copy)]
struct PageFile {
    /// Where it is served.
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

/// The page's files.
const PAGE_FILES: [PageFile; 3] = [
    PageFile {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../../web/src/index.html"),
    },
    PageFile {
        path: "/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../web/dist/app.js"),
    },
    PageFile {
        path: "/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../web/src/style.css"),
    },
];

/// The WebSocket route the page connects to (see `transport::ws`).
const WS_PATH: &str = "/v1/ws";

/// The page's routes, to merge into the HTTP app next to the API and
/// `/v1/ws`.
pub fn webchat_router() -> Router {
    PAGE_FILES.iter().fold(Router::new(), |router, file| {
        let file = *file;
        router.route(
            file.path,
            get(move |headers: HeaderMap| async move { serve_file(file, &headers) }),
        )
    })
}

fn serve_file(file: PageFile, request: &HeaderMap) -> Response {
    let policy = content_security_policy(request.get(header::HOST));
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(file.content_type),
            ),
            (header::CONTENT_SECURITY_POLICY, policy),
            // The files change with the binary: revalidate on every load.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        file.body,
    )
        .into_response()
}

/// Only this server's own files; fetches to its API (`'self'`) and the
/// WebSocket endpoint on the host the browser used. The host is spelled out
/// because `'self'` covers `ws:`/`wss:` only in newer browsers; a `Host`
/// header that is not a plain `host[:port]` gets no WebSocket entry (it
/// could otherwise inject directives).
fn content_security_policy(host: Option<&HeaderValue>) -> HeaderValue {
    let websocket = host
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<Authority>().ok())
        .filter(|authority| {
            authority
                .as_str()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
        .map(|authority| format!(" ws://{authority}{WS_PATH} wss://{authority}{WS_PATH}"))
        .unwrap_or_default();
    let policy = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'{websocket}; base-uri 'none'; form-action 'self'; \
         frame-ancestors 'none'"
    );
    HeaderValue::from_str(&policy)
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    async fn get(path: &str, host: &str) -> (StatusCode, HeaderMap, String) {
        let request = Request::get(path)
            .header(header::HOST, host)
            .body(Body::empty())
            .unwrap();
        let response = webchat_router().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (
            parts.status,
            parts.headers,
            String::from_utf8(bytes.to_vec()).unwrap(),
        )
    }

    fn policy(headers: &HeaderMap) -> &str {
        headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap()
    }

    #[tokio::test]
    async fn the_root_is_the_chat_page_with_a_policy_naming_the_websocket() {
        let (status, headers, body) = get("/", "chat.example:8080").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert!(
            body.contains(r#"<script type="module" src="/app.js">"#),
            "{body}"
        );
        let policy = policy(&headers);
        assert!(policy.contains("default-src 'none'"), "{policy}");
        assert!(policy.contains("script-src 'self';"), "{policy}");
        assert!(
            policy.contains(
                "connect-src 'self' ws://chat.example:8080/v1/ws wss://chat.example:8080/v1/ws;"
            ),
            "{policy}"
        );
        assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    }

    #[tokio::test]
    async fn every_file_the_page_references_is_served_with_its_type() {
        let (_, _, page) = get("/", "localhost").await;
        for (reference, content_type) in [
            (r#"src="/app.js""#, "text/javascript; charset=utf-8"),
            (r#"href="/style.css""#, "text/css; charset=utf-8"),
        ] {
            assert!(page.contains(reference), "{reference} not in the page");
            let path = reference.split('"').nth(1).unwrap();
            let (status, headers, body) = get(path, "localhost").await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(headers[header::CONTENT_TYPE], content_type, "{path}");
            assert!(!body.is_empty(), "{path}");
            assert!(policy(&headers).starts_with("default-src 'none'"));
        }
        // The bundle speaks the binary protocol over the WebSocket route.
        let (_, _, script) = get("/app.js", "localhost").await;
        assert!(script.contains(WS_PATH));
    }

    #[tokio::test]
    async fn a_host_header_that_is_not_a_plain_authority_adds_no_websocket_source() {
        for host in ["evil;script-src *", "user@host", "a b"] {
            let (status, headers, _) = get("/", host).await;
            assert_eq!(status, StatusCode::OK);
            let policy = policy(&headers);
            assert!(policy.contains("connect-src 'self';"), "{host}: {policy}");
            assert!(!policy.contains("ws://"), "{host}: {policy}");
            assert!(!policy.contains("script-src *"), "{host}: {policy}");
        }
    }
}
