//! Operations: structured logging, optional OpenTelemetry span export
//! (OTLP/HTTP), the Prometheus recorder and its
//! `/metrics` + `/health` endpoint (port 9093 by default), the readiness
//! flag behind every `/health`, the ops port's guards (`Host` allow-list,
//! JSON-only requests that change state), and the build's version
//! information.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use pingme_protocol::ErrorCode;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer as _;

use crate::config::{Config, LogFormat, OpsConfig};
use crate::http::ApiError;
use crate::http::server::HttpLimits;

/// HTTP requests by matched route and status (`route`, `status` labels).
pub const HTTP_REQUESTS: &str = "pingme_http_requests_total";
/// Login attempts by outcome (`result`: ok, bad_credentials, rate_limited,
/// busy, error).
pub const LOGINS: &str = "pingme_logins_total";
/// Registrations by outcome (`result`: ok, taken, invalid, rate_limited,
/// busy, error).
pub const REGISTRATIONS: &str = "pingme_registrations_total";
/// Password hashes (and verifications) running now; bounded by
/// `auth.password_hash_concurrency`.
pub const PASSWORD_HASHES_RUNNING: &str = "pingme_password_hashes_running";
/// Resident set size of the process, refreshed on every scrape.
pub const RESIDENT_MEMORY: &str = "pingme_process_resident_memory_bytes";
/// 1 while `/health` answers 200, else 0; refreshed on every scrape.
pub const READY: &str = "pingme_ready";

/// Histogram buckets of every `*_seconds` metric (latencies, 250 µs to
/// 10 s): real Prometheus histograms, so a dashboard can take percentiles
/// over several nodes, which per-process quantiles cannot give.
const SECONDS_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Histogram buckets of the append batch size (messages per store call).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// The crate version, git commit and build time of this binary.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VersionInfo {
    /// Cargo package version.
    pub version: &'static str,
    /// `git rev-parse HEAD` at build time (or `unknown`).
    pub git_commit: &'static str,
    /// Build time, RFC 3339 UTC.
    pub build_time: &'static str,
}

/// This build's version information.
pub fn version_info() -> VersionInfo {
    VersionInfo {
        version: env!("CARGO_PKG_VERSION"),
        git_commit: env!("PINGME_GIT_COMMIT"),
        build_time: env!("PINGME_BUILD_TIME"),
    }
}

/// "Ready to serve": set by the integrator once the store is open and every
/// listener is up, cleared when shutdown begins, and held back while a
/// service the process depends on (Redis) does not answer. Every `/health`
/// answers 200 only while it is set and every dependency is up.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    started: Arc<AtomicBool>,
    dependencies: Arc<std::sync::Mutex<Vec<Dependency>>>,
}

/// One service readiness waits for, marked up or down by whoever watches it.
#[derive(Debug, Clone)]
pub struct Dependency {
    name: &'static str,
    up: Arc<AtomicBool>,
}

impl Dependency {
    /// Marks the service reachable or not.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
    }

    /// Whether the service was reachable at its last check.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
}

impl Readiness {
    /// A flag that starts not ready.
    pub fn new() -> Readiness {
        Readiness::default()
    }

    /// Sets or clears readiness.
    pub fn set(&self, ready: bool) {
        self.started.store(ready, Ordering::Release);
    }

    /// A service readiness now waits for, down until marked up.
    pub fn dependency(&self, name: &'static str) -> Dependency {
        let dependency = Dependency {
            name,
            up: Arc::new(AtomicBool::new(false)),
        };
        self.dependencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dependency.clone());
        dependency
    }

    /// The services that are down now, by name.
    pub fn unavailable(&self) -> Vec<&'static str> {
        self.dependencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|d| !d.is_up())
            .map(|d| d.name)
            .collect()
    }

    /// Whether the process is ready.
    pub fn is_ready(&self) -> bool {
        self.started.load(Ordering::Acquire) && self.unavailable().is_empty()
    }
}

#[derive(Serialize)]
struct HealthBody {
    status: &'static str,
    /// The services readiness waits for (e.g. `redis`), when any is down.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    unavailable: Vec<&'static str>,
}

/// The `/health` handler: 200 `{"status":"ok"}` when ready, else 503
/// `{"status":"unavailable"}`, naming the services that are down
/// (`"unavailable":["redis"]`) if that is why.
pub async fn health(State(readiness): State<Readiness>) -> Response {
    if readiness.is_ready() {
        (
            StatusCode::OK,
            axum::Json(HealthBody {
                status: "ok",
                unavailable: Vec::new(),
            }),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(HealthBody {
                status: "unavailable",
                unavailable: readiness.unavailable(),
            }),
        )
            .into_response()
    }
}

/// The `/version` handler.
pub async fn version() -> axum::Json<VersionInfo> {
    axum::Json(version_info())
}

/// The span export installed by [`init_logging`], flushed and stopped by
/// [`SpanExport::shutdown`] on the way out. Holds nothing when export is off.
#[derive(Debug, Default)]
#[must_use = "spans still queued are lost unless the export is shut down"]
pub struct SpanExport {
    provider: Option<SdkTracerProvider>,
}

impl SpanExport {
    /// Whether spans are being exported.
    pub fn is_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still queued and stops the exporter. Blocks a
    /// blocking-pool thread, not the runtime, while the batch task drains.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let stopped = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match stopped {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "OTLP span export did not shut down cleanly"),
            Err(error) => tracing::warn!(%error, "OTLP span export shutdown panicked"),
        }
    }
}

/// Installs the global tracing subscriber: log lines (text or JSON) with
/// the filter `config.log_level` (`RUST_LOG` overrides it) and, when
/// `config.otlp_endpoint` is set, span export over OTLP/HTTP (protobuf,
/// batched on the tokio runtime; call from inside it). The export layer
/// sees the router's `debug` message-path spans (each carries the
/// `msg_id`) whatever the log level; without it those spans are disabled
/// at their callsites. A second call installs nothing (tests start many
/// servers) and returns a disabled [`SpanExport`].
pub fn init_logging(config: &Config) -> anyhow::Result<SpanExport> {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let level = config.log_level.as_str();
    let log_filter = || {
        EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(level))
            .unwrap_or_else(|_| EnvFilter::new("info"))
    };
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = match config.log_format {
        LogFormat::Json => lines.json().flatten_event(true).boxed(),
        LogFormat::Text => lines.boxed(),
    }
    .with_filter(log_filter());

    let provider = if config.otlp_endpoint.is_empty() {
        None
    } else {
        Some(otlp_provider(
            &config.otlp_endpoint,
            &config.otlp_service_name,
        )?)
    };
    let export = provider.as_ref().map(|provider| {
        let spans = log_filter().add_directive(
            "pingme_router=debug"
                .parse()
                .expect("a constant, valid directive"),
        );
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("pingme"))
            .with_filter(spans)
    });
    let installed = tracing_subscriber::registry()
        .with(lines)
        .with(export)
        .try_init()
        .is_ok();
    match provider {
        Some(provider) if !installed => {
            // Another subscriber was first: this exporter would never see a span.
            let _ = provider.shutdown();
            Ok(SpanExport::default())
        }
        provider => Ok(SpanExport { provider }),
    }
}

/// A tracer provider batching spans to `{endpoint}/v1/traces`.
fn otlp_provider(endpoint: &str, service_name: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .with_timeout(std::time::Duration::from_secs(10))
        .build()
        .context("building the OTLP span exporter (otlp_endpoint)")?;
    let batch =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batch)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name.to_string())
                .build(),
        )
        .build())
}

/// The process-wide Prometheus recorder, installed on first use, with
/// every metric the binary exports described. Later calls return the same
/// handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = prometheus_builder().install_recorder().unwrap_or_else(|_| {
                // Another recorder is installed (not ours): keep a
                // detached one so /metrics still answers.
                prometheus_builder().build_recorder().handle()
            });
            crate::exported_metrics::describe_all();
            handle
        })
        .clone()
}

fn prometheus_builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|builder| {
            builder.set_buckets_for_metric(
                Matcher::Full(pingme_router::telemetry::APPEND_BATCH.into()),
                BATCH_BUCKETS,
            )
        })
        .expect("bucket lists are not empty")
}

/// Help texts of the API's and the process's metrics.
pub(crate) fn describe_metrics() {
    metrics::describe_counter!(HTTP_REQUESTS, "HTTP API requests by route and status");
    metrics::describe_counter!(LOGINS, "Login attempts by result");
    metrics::describe_counter!(REGISTRATIONS, "Registrations by result");
    metrics::describe_gauge!(
        PASSWORD_HASHES_RUNNING,
        "Password hashes and verifications running now"
    );
    metrics::describe_counter!(
        crate::http::server::HTTP_CONNECTIONS_REFUSED,
        "HTTP connections refused at the total or per-IP cap, by reason"
    );
    metrics::describe_counter!(
        crate::accept::ACCEPT_ERRORS,
        "Failed accepts on any listener, by kind (out_of_files, other)"
    );
    metrics::describe_gauge!(
        RESIDENT_MEMORY,
        metrics::Unit::Bytes,
        "Resident set size of the process"
    );
    metrics::describe_gauge!(
        READY,
        "1 while /health answers 200 (store open, listeners up, Redis answering if used), 0 while starting, draining or waiting for Redis"
    );
}

/// Resident set size in bytes from `/proc/self/statm` (Linux), or `None`.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

#[allow(unsafe_code)]
fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the running system; no memory is touched.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as u64 } else { 4096 }
}

/// Renders the Prometheus text exposition, refreshing process gauges first.
pub fn render_metrics(handle: &PrometheusHandle) -> String {
    if let Some(rss) = resident_memory_bytes() {
        metrics::gauge!(RESIDENT_MEMORY).set(rss as f64);
    }
    handle.render()
}

#[derive(Clone)]
struct OpsState {
    handle: PrometheusHandle,
    readiness: Readiness,
}

/// The metrics port's app: `GET /metrics` and `GET /health`.
pub fn ops_router(readiness: Readiness) -> Router {
    let state = OpsState {
        handle: metrics_handle(),
        readiness,
    };
    Router::new()
        .route(
            "/metrics",
            get(|State(s): State<OpsState>| async move {
                metrics::gauge!(READY).set(if s.readiness.is_ready() { 1.0 } else { 0.0 });
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    render_metrics(&s.handle),
                )
            }),
        )
        .route(
            "/health",
            get(|State(s): State<OpsState>| health(State(s.readiness))),
        )
        .with_state(state)
}

/// The whole ops app: [`ops_router`] with `admin` nested under `/admin`,
/// behind the port's guards ([`guard_request`]).
pub fn ops_app(readiness: Readiness, admin: Router, config: &OpsConfig) -> Router {
    let allowed_hosts: Arc<[String]> = config.allowed_hosts.clone().into();
    ops_router(readiness)
        .nest("/admin", admin)
        .method_not_allowed_fallback(crate::http::method_not_allowed)
        .layer(middleware::from_fn_with_state(allowed_hosts, guard_request))
}

/// The ops port's guards, for every route: the `Host` header, when there
/// is one, must name this machine (`localhost`, an IP address, or one of `allowed_hosts`),
/// so a web page whose name was rebound to 127.0.0.1 gets 403; and a
/// request that may change something (any method but GET, HEAD, OPTIONS)
/// must say `Content-Type: application/json`, which a cross-origin page
/// cannot send without a preflight (else 415).
async fn guard_request(
    State(allowed_hosts): State<Arc<[String]>>,
    request: Request,
    next: Next,
) -> Response {
    // No Host at all (HTTP/1.0 health checkers) is no rebinding: browsers
    // always send one.
    let host = request
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or(""));
    if let Some(host) = host
        && !host_allowed(host, &allowed_hosts)
    {
        return ApiError::forbidden(format!(
            "Host {host:?} is not served here (add it to ops.allowed_hosts)"
        ))
        .into_response();
    }
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !safe && !is_json(request.headers()) {
        return ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "requests that change state need Content-Type: application/json",
        )
        .into_response();
    }
    next.run(request).await
}

/// Whether a `Host` header value names this machine: `localhost`, an IP
/// literal (never the result of a DNS lookup, so never rebound), or a
/// configured name; with or without a port.
pub fn host_allowed(host: &str, allowed_hosts: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6] or [v6]:port
        match rest.split_once(']') {
            Some((v6, _)) => return v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    !name.is_empty()
        && (name.eq_ignore_ascii_case("localhost")
            || name.parse::<std::net::IpAddr>().is_ok()
            || allowed_hosts
                .iter()
                .any(|a| a.eq_ignore_ascii_case(name) || a.eq_ignore_ascii_case(host)))
}

/// Whether the request says its body is JSON (`application/json`, any
/// parameters).
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// Serves the ops app ([`ops_app`]) on `listener` under `limits` until
/// `shutdown` is cancelled.
pub async fn serve_ops(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    crate::http::server::serve(listener, app, limits, "ops", shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_this_machine_are_allowed_and_others_not() {
        let configured = vec!["ops.internal".to_string(), "metrics.lan:9093".to_string()];
        for good in [
            "localhost",
            "LOCALHOST:9093",
            "127.0.0.1",
            "127.0.0.1:9093",
            "10.1.2.3:80",
            "[::1]",
            "[::1]:9093",
            "ops.internal",
            "ops.internal:9093",
            "metrics.lan:9093",
        ] {
            assert!(host_allowed(good, &configured), "{good}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:9093",
            "localhost.evil.example",
            "metrics.lan:80",
            "[::1",
            "[evil]:80",
            ":9093",
        ] {
            assert!(!host_allowed(bad, &configured), "{bad}");
        }
    }
}
