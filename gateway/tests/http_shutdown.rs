//! Shutdown of the HTTP server (`http::server::serve`) with stragglers
//! (issue 15): connections that sent half a request's headers, half a body,
//! nothing at all, or went idle after a request do not hold the server
//! once it is told to stop, while a route already running still finishes
//! and its answer reaches the client. Real sockets against an in-process
//! server, whose read timeouts are far longer than the test may take, so
//! only the shutdown can close the stragglers.

use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use pingme_gateway::http::server::{HttpLimits, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Longest a test waits for something that must happen; only a server
/// without the behaviour under test reaches it.
const GENEROUS: Duration = Duration::from_secs(60);

/// `SHUTTING_DOWN`.
const SHUTTING_DOWN: u64 = 40003;

/// Reads until the server closes the connection; what it sent first.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let closed = tokio::time::timeout(GENEROUS, stream.read_to_end(&mut received)).await;
    assert!(closed.is_ok(), "the server never closed the connection");
    String::from_utf8_lossy(&received).into_owned()
}

/// Reads until `marker` has arrived; everything read.
async fn read_until(stream: &mut TcpStream, marker: &str) -> String {
    let mut received = Vec::new();
    let mut chunk = [0u8; 1024];
    tokio::time::timeout(GENEROUS, async {
        while !String::from_utf8_lossy(&received).contains(marker) {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before {marker:?}: {received:?}");
            received.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{marker:?} never arrived"));
    String::from_utf8_lossy(&received).into_owned()
}

async fn connect_and_send(addr: std::net::SocketAddr, bytes: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes.as_bytes()).await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stragglers_are_closed_at_shutdown_while_a_running_route_finishes() {
    // `/held` tells the test it runs, then answers only when released.
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let release = CancellationToken::new();
    let held_route = {
        let release = release.clone();
        move || {
            let (started, release) = (started_tx.clone(), release.clone());
            async move {
                let _ = started.send(());
                release.cancelled().await;
                "done"
            }
        }
    };
    let app = Router::new()
        .route("/held", post(held_route))
        .route("/quick", get(|| async { "quick" }))
        .route("/echo", post(|body: String| async move { body }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let limits = HttpLimits {
        header_read_timeout: Duration::from_secs(600),
        body_read_timeout: Duration::from_secs(600),
        ..HttpLimits::default()
    };
    let server = tokio::spawn(serve(listener, app, limits, "test", shutdown.clone()));

    // Headers cut off in the middle.
    let mut half_headers =
        connect_and_send(addr, "POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-").await;
    // A connection that never sends a byte.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Headers in, body half sent: the 100 Continue says the server is
    // reading the body when the second half of it is still missing.
    let mut half_body = connect_and_send(
        addr,
        "POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\
         Expect: 100-continue\r\n\r\n",
    )
    .await;
    read_until(&mut half_body, "100 Continue\r\n\r\n").await;
    half_body.write_all(b"hello").await.unwrap();
    // A keep-alive connection idle after one answer.
    let mut idle = connect_and_send(addr, "GET /quick HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    read_until(&mut idle, "quick").await;
    // A whole request whose route is running.
    let mut held = connect_and_send(
        addr,
        "POST /held HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await;
    tokio::time::timeout(GENEROUS, started.recv())
        .await
        .expect("the held route never started");

    shutdown.cancel();

    // The stragglers are closed while the held route still runs (their
    // read timeouts are ten minutes away).
    let answer = read_until_closed(&mut half_headers).await;
    assert!(answer.is_empty(), "{answer}");
    read_until_closed(&mut silent).await;
    read_until_closed(&mut idle).await;
    // The half-sent body is told why, and its route never ran.
    let answer = read_until_closed(&mut half_body).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains(&format!("\"code\":{SHUTTING_DOWN}")),
        "{answer}"
    );
    assert!(!answer.contains("hello"), "{answer}");

    // The held route has not answered yet (it cannot until released), so
    // the server is still waiting for it.
    let mut byte = [0u8; 1];
    assert_eq!(
        held.try_read(&mut byte).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "the running request's connection was answered or closed early"
    );
    assert!(!server.is_finished(), "the server stopped before the route");

    // Released, the route's answer arrives whole, the connection closes and
    // the server returns.
    release.cancel();
    let answer = read_until_closed(&mut held).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("done"), "{answer}");
    tokio::time::timeout(GENEROUS, server)
        .await
        .expect("the server never returned")
        .unwrap()
        .unwrap();
}
