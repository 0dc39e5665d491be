//! The HTTP/1.1 server under the API port and the ops port: what a
//! stranger's connection may hold, and for how long.
//!
//! - A connection must deliver each request's headers within
//!   `http.header_read_timeout`, counted from when the server starts
//!   waiting for them, so the same timer closes idle keep-alive
//!   connections and connections that never send a byte (hyper's own
//!   header timer).
//! - A request's whole body must arrive within `http.body_read_timeout`
//!   (`read_body_within`); otherwise the answer is `REQUEST_TIMEOUT`
//!   (408) and the connection is closed. A deadline for the whole body
//!   rather than tower-http's per-chunk timeout, because a body trickled
//!   one byte per almost-timeout would otherwise hold its connection for
//!   days.
//! - Connections are capped in total and per client IP
//!   ([`ConnectionCaps`]); one over a cap gets a `503 OVERLOADED` and is
//!   closed at once. A WebSocket upgraded from such a connection keeps
//!   counting until it closes.
//! - Accept failures back off ([`crate::accept`]).
//! - At shutdown a connection is closed at once unless the app is
//!   answering one of its requests or the socket still holds part of an
//!   answer (`ConnectionActivity`): a half-sent request or an idle
//!   keep-alive connection cannot hold the process. A request whose body
//!   is still arriving is answered `SHUTTING_DOWN` (503, connection
//!   closed) without running its route; routes already running finish
//!   and their answers are written (hyper's graceful shutdown), within
//!   the caller's grace period.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use pingme_protocol::ErrorCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use super::{ApiError, MAX_REQUEST_BYTES};
use crate::accept::AcceptBackoff;

/// HTTP connections refused at a cap (`reason`: `total`, `per_ip`).
pub const HTTP_CONNECTIONS_REFUSED: &str = "pingme_http_connections_refused_total";

/// What an HTTP listener allows one client and all of them together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Longest wait for a request's headers (and for the next request on
    /// an idle keep-alive connection).
    pub header_read_timeout: Duration,
    /// Longest wait for a request's whole body.
    pub body_read_timeout: Duration,
    /// Open connections in all (WebSockets included).
    pub max_connections: usize,
    /// Open connections per client IP (WebSockets included).
    pub max_connections_per_ip: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_connections_per_ip: 256,
        }
    }
}

/// Open connections of one listener, in total and per client IP.
#[derive(Debug)]
pub struct ConnectionCaps {
    total: AtomicUsize,
    per_ip: DashMap<IpAddr, usize>,
    max_total: usize,
    max_per_ip: usize,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnectionPermit {
    caps: Arc<ConnectionCaps>,
    ip: IpAddr,
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapReached {
    /// `max_connections`.
    Total,
    /// `max_connections_per_ip`.
    PerIp,
}

impl ConnectionCaps {
    /// Caps from `limits`.
    pub fn new(limits: &HttpLimits) -> Arc<ConnectionCaps> {
        Arc::new(ConnectionCaps {
            total: AtomicUsize::new(0),
            per_ip: DashMap::new(),
            max_total: limits.max_connections,
            max_per_ip: limits.max_connections_per_ip,
        })
    }

    /// A place for a connection from `ip`, or the cap that is full.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, CapReached> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(CapReached::Total);
        }
        let mut open = self.per_ip.entry(ip).or_insert(0);
        if *open >= self.max_per_ip {
            drop(open);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(CapReached::PerIp);
        }
        *open += 1;
        Ok(ConnectionPermit {
            caps: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        if let Some(mut open) = self.caps.per_ip.get_mut(&self.ip) {
            *open = open.saturating_sub(1);
        }
        self.caps.per_ip.remove_if(&self.ip, |_, open| *open == 0);
        self.caps.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one HTTP connection is busy with, as its task needs to know at
/// shutdown. Shared by the connection's service (requests) and its socket
/// (writes); both run inside the connection's task.
#[derive(Debug, Default)]
struct ConnectionActivity {
    /// Requests handed to the app whose answer's body is not yet done:
    /// from the end of their headers until hyper has taken the whole
    /// answer.
    requests: AtomicUsize,
    /// Whether the socket's last write was refused for lack of room, so
    /// hyper still holds part of an answer to send.
    write_blocked: AtomicBool,
}

impl ConnectionActivity {
    /// Nothing to finish: the connection waits for a request's headers
    /// (none yet, or some of them) and owes its client nothing.
    fn is_quiet(&self) -> bool {
        self.requests.load(Ordering::Acquire) == 0 && !self.write_blocked.load(Ordering::Acquire)
    }

    /// Records how a write to the socket went.
    fn wrote<T>(&self, result: Poll<T>) -> Poll<T> {
        self.write_blocked
            .store(result.is_pending(), Ordering::Release);
        result
    }
}

/// One request of a connection in the app's hands; dropping it (with the
/// answer's body, or with the request when the connection goes) ends it.
struct RequestInFlight(Arc<ConnectionActivity>);

impl RequestInFlight {
    fn begin(activity: Arc<ConnectionActivity>) -> RequestInFlight {
        activity.requests.fetch_add(1, Ordering::AcqRel);
        RequestInFlight(activity)
    }
}

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body that keeps its request counted until hyper has
/// taken all of it (a body is dropped once its last frame is out).
struct AnswerBody {
    body: Body,
    _request: RequestInFlight,
}

impl hyper::body::Body for AnswerBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A TCP stream holding its connection's place for as long as it lives,
/// through a WebSocket upgrade too, and telling its connection's task
/// whether hyper is waiting to write.
struct Admitted {
    stream: TcpStream,
    activity: Arc<ConnectionActivity>,
    _permit: ConnectionPermit,
}

impl AsyncRead for Admitted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.activity
            .wrote(Pin::new(&mut this.stream).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.activity
            .wrote(Pin::new(&mut this.stream).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.activity
            .wrote(Pin::new(&mut this.stream).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// What a connection over a cap is told before it is closed.
const OVER_CAP: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
content-length: 52\r\n\
connection: close\r\n\
\r\n\
{\"code\":40002,\"message\":\"too many open connections\"}";

/// Serves `app` on `listener` (HTTP/1.1, with WebSocket upgrades and the
/// client's address as [`ConnectInfo`]) under `limits` until `shutdown`
/// is cancelled; then stops accepting, closes the connections that have
/// nothing to finish (idle, or still sending a request's headers),
/// answers requests whose body is still arriving `SHUTTING_DOWN`, and
/// returns once the routes already running have answered. `name` labels
/// log lines.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    name: &'static str,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let app = read_bodies_first(app, limits.body_read_timeout, shutdown.clone());
    let caps = ConnectionCaps::new(&limits);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let connections = TaskTracker::new();
    let mut backoff = AcceptBackoff::new(name);
    while let Some((stream, peer)) = backoff
        .next(|| listener.accept(), shutdown.cancelled())
        .await
    {
        let permit = match caps.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(cap) => {
                refuse(stream, cap);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(ConnectionActivity::default());
        let requests = activity.clone();
        let service = app
            .clone()
            .map_request(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request.map(Body::new)
            })
            // hyper calls the service once a request's headers are in: the
            // request counts from then until its answer is out.
            .map_future(move |answer| {
                let request = RequestInFlight::begin(requests.clone());
                async move {
                    let response: Response = answer.await?;
                    Ok::<_, std::convert::Infallible>(response.map(|body| {
                        Body::new(AnswerBody {
                            body,
                            _request: request,
                        })
                    }))
                }
            });
        let io = TokioIo::new(Admitted {
            stream,
            activity: activity.clone(),
            _permit: permit,
        });
        let connection = http
            .serve_connection(io, TowerToHyperService::new(service))
            .with_upgrades();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = shutdown.cancelled() => {
                    // The connection is not being polled here, so what its
                    // activity says holds until it is dropped. hyper's
                    // graceful shutdown would wait for a request whose
                    // headers are half in (up to the header timeout), so
                    // such connections, and idle ones, just close.
                    if activity.is_quiet() {
                        return;
                    }
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = ended {
                tracing::debug!(%error, %peer, "http connection ended with an error");
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Tells a connection over a cap why (best effort: the answer fits a
/// fresh socket's send buffer) and closes it.
fn refuse(stream: TcpStream, cap: CapReached) {
    let reason = match cap {
        CapReached::Total => "total",
        CapReached::PerIp => "per_ip",
    };
    metrics::counter!(HTTP_CONNECTIONS_REFUSED, "reason" => reason).increment(1);
    let _ = stream.try_write(OVER_CAP);
}

/// What [`read_body_within`] needs: the body deadline and the server's
/// shutdown signal.
#[derive(Debug, Clone)]
struct BodyReading {
    deadline: Duration,
    shutdown: CancellationToken,
}

/// `app` with every request's whole body read before its route runs
/// ([`read_body_within`]), so a route that runs has all its input and
/// may be left to finish at shutdown.
fn read_bodies_first(app: Router, deadline: Duration, shutdown: CancellationToken) -> Router {
    app.layer(middleware::from_fn_with_state(
        BodyReading { deadline, shutdown },
        read_body_within,
    ))
}

/// Reads the request's whole body (at most [`MAX_REQUEST_BYTES`]) within
/// the deadline before the route sees it: `REQUEST_TIMEOUT` (408,
/// connection closed) when it is late, `BODY_TOO_LARGE` (413) when it is
/// too big, and `SHUTTING_DOWN` (503, connection closed) instead of
/// starting the route once the server is stopping, even if the body is
/// still on its way.
async fn read_body_within(
    State(reading): State<BodyReading>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let read = tokio::select! {
        // First: no route starts once the server stops, whatever the body.
        biased;
        _ = reading.shutdown.cancelled() => {
            return closing(ApiError::new(
                ErrorCode::ShuttingDown,
                "the server is shutting down; retry on another node or later",
            ));
        }
        read = tokio::time::timeout(
            reading.deadline,
            axum::body::to_bytes(body, MAX_REQUEST_BYTES),
        ) => read,
    };
    match read {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(error)) if is_over_limit(&error) => ApiError::new(
            ErrorCode::BodyTooLarge,
            format!("the request body exceeds {MAX_REQUEST_BYTES} bytes"),
        )
        .into_response(),
        Ok(Err(error)) => ApiError::new(ErrorCode::Malformed, format!("reading the body: {error}"))
            .into_response(),
        // The rest of the body may still come: the connection cannot
        // carry another request.
        Err(_) => closing(ApiError::new(
            ErrorCode::RequestTimeout,
            format!(
                "the request body did not arrive within {}s",
                reading.deadline.as_secs_f32()
            ),
        )),
    }
}

/// `error` as an answer after which the connection closes.
fn closing(error: ApiError) -> Response {
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Whether a body error is the length limit (not a broken connection).
fn is_over_limit(error: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_ip_and_in_total_and_free_on_drop() {
        let caps = ConnectionCaps::new(&HttpLimits {
            max_connections: 3,
            max_connections_per_ip: 2,
            ..HttpLimits::default()
        });
        let a = IpAddr::from([10, 0, 0, 1]);
        let b = IpAddr::from([10, 0, 0, 2]);
        let c = IpAddr::from([10, 0, 0, 3]);
        let a1 = caps.admit(a).unwrap();
        let _a2 = caps.admit(a).unwrap();
        assert_eq!(caps.admit(a).unwrap_err(), CapReached::PerIp);
        let _b1 = caps.admit(b).unwrap();
        assert_eq!(caps.admit(c).unwrap_err(), CapReached::Total);
        assert_eq!(caps.open(), 3);
        drop(a1);
        assert_eq!(caps.open(), 2);
        let _c1 = caps.admit(c).unwrap();
        assert_eq!(caps.admit(a).unwrap_err(), CapReached::Total);
    }

    /// A route that records whether it ran, behind [`read_bodies_first`].
    fn recording_app(shutdown: &CancellationToken) -> (Router, Arc<AtomicBool>) {
        let ran = Arc::new(AtomicBool::new(false));
        let route = {
            let ran = ran.clone();
            move || async move {
                ran.store(true, Ordering::SeqCst);
                "ran"
            }
        };
        let app = Router::new().route("/x", axum::routing::post(route));
        (
            read_bodies_first(app, Duration::from_secs(600), shutdown.clone()),
            ran,
        )
    }

    async fn assert_shutting_down(response: Response) {
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[header::CONNECTION], "close");
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], ErrorCode::ShuttingDown.code());
    }

    #[tokio::test]
    async fn no_route_starts_once_the_server_stops() {
        let shutdown = CancellationToken::new();
        let (app, ran) = recording_app(&shutdown);
        shutdown.cancel();
        let request = Request::post("/x").body(Body::from("{}")).unwrap();
        assert_shutting_down(app.oneshot(request).await.unwrap()).await;
        assert!(!ran.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_body_still_arriving_when_the_server_stops_is_answered_at_once() {
        let shutdown = CancellationToken::new();
        let (app, ran) = recording_app(&shutdown);
        // Half a body; asked for the rest, it says so and never delivers.
        let (reading_tx, reading) = tokio::sync::oneshot::channel::<()>();
        let first = futures::stream::once(async { Ok::<_, io::Error>(Bytes::from_static(b"{")) });
        let rest = futures::stream::once(async move {
            let _ = reading_tx.send(());
            std::future::pending::<Result<Bytes, io::Error>>().await
        });
        let request = Request::post("/x")
            .body(Body::from_stream(futures::StreamExt::chain(first, rest)))
            .unwrap();
        let answer = tokio::spawn(app.oneshot(request));
        reading.await.unwrap();
        shutdown.cancel();
        assert_shutting_down(answer.await.unwrap().unwrap()).await;
        assert!(!ran.load(Ordering::SeqCst));
    }

    #[test]
    fn a_connection_is_quiet_only_with_no_request_and_nothing_left_to_write() {
        let activity = Arc::new(ConnectionActivity::default());
        assert!(activity.is_quiet());
        let request = RequestInFlight::begin(activity.clone());
        assert!(!activity.is_quiet());
        drop(request);
        assert!(activity.is_quiet());
        let _ = activity.wrote(Poll::<()>::Pending);
        assert!(!activity.is_quiet());
        let _ = activity.wrote(Poll::Ready(()));
        assert!(activity.is_quiet());
    }

    #[test]
    fn the_over_cap_answer_is_a_well_formed_error() {
        let text = std::str::from_utf8(OVER_CAP).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["code"], ErrorCode::Overloaded.code());
    }
}
