//! A bare session opening over a [`Connection`]: `Hello` and
//! `Authenticate` in one write, then `HelloAck` and `AuthOk`, awaited in
//! place. For the load generator, which drives many bare sessions without
//! the client's machinery; [`crate::Client`] runs the same handshake
//! inside its core ([`crate::core`]) on every (re)connect.

use std::time::Duration;

use futures::SinkExt;
use pingme_protocol::v1::{AuthOk, Authenticate, Hello, HelloAck, client_frame, server_frame};
use pingme_protocol::{ClientFrame, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, ServerFrame};

use crate::error::{ClientError, Result};
use crate::transport::{ConnectOptions, Connection, Endpoint, connect};

/// Request ids of the handshake frames; the client's own ids start above.
const HELLO_REQUEST: u64 = 1;
const AUTH_REQUEST: u64 = 2;

/// An authenticated connection.
#[derive(Debug)]
pub struct Session {
    /// The transport, ready for requests.
    pub connection: Connection,
    /// What the server announced (heartbeat, limits, version).
    pub hello_ack: HelloAck,
    /// Who the server says we are.
    pub auth_ok: AuthOk,
}

/// Connects to `endpoint` and runs the handshake with `token`, all within
/// `timeout`.
pub async fn open_session(
    endpoint: &Endpoint,
    options: &ConnectOptions,
    token: &str,
    client_name: &str,
    timeout: Duration,
) -> Result<Session> {
    let opening = async {
        let connection = connect(endpoint, options).await?;
        handshake(connection, token, client_name).await
    };
    tokio::time::timeout(timeout, opening)
        .await
        .map_err(|_| ClientError::Timeout)?
}

/// Runs the handshake on an open connection: `Hello` and `Authenticate`
/// in one write (the server answers pipelined frames in order), then
/// their answers, so an opening costs one round trip, not two.
pub async fn handshake(
    mut connection: Connection,
    token: &str,
    client_name: &str,
) -> Result<Session> {
    connection
        .sink
        .feed(ClientFrame {
            request_id: HELLO_REQUEST,
            body: Some(client_frame::Body::Hello(Hello {
                max_version: PROTOCOL_VERSION,
                min_version: MIN_PROTOCOL_VERSION,
                client_name: client_name.to_string(),
            })),
        })
        .await?;
    connection
        .sink
        .send(ClientFrame {
            request_id: AUTH_REQUEST,
            body: Some(client_frame::Body::Authenticate(Authenticate {
                token: token.to_string(),
            })),
        })
        .await?;
    let hello_ack = match next_reply(&mut connection).await? {
        server_frame::Body::HelloAck(ack) => ack,
        other => return Err(unexpected("HelloAck", &other)),
    };
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello_ack.version) {
        return Err(ClientError::UnsupportedVersion);
    }
    let auth_ok = match next_reply(&mut connection).await? {
        server_frame::Body::AuthOk(ok) => ok,
        other => return Err(unexpected("AuthOk", &other)),
    };
    Ok(Session {
        connection,
        hello_ack,
        auth_ok,
    })
}

/// The next frame with a body; an `Error` frame becomes a typed error and a
/// `GoAway` becomes [`ClientError::GoAway`].
async fn next_reply(connection: &mut Connection) -> Result<server_frame::Body> {
    loop {
        let frame: ServerFrame = connection
            .next_frame()
            .await
            .ok_or(ClientError::ConnectionClosed)??;
        match frame.body {
            Some(server_frame::Body::Error(error)) => {
                return Err(ClientError::Server {
                    code: error.code,
                    message: error.message,
                    client_msg_id: error.client_msg_id,
                });
            }
            Some(server_frame::Body::GoAway(go_away)) => {
                return Err(ClientError::GoAway {
                    reason: go_away.reason(),
                    message: go_away.message,
                });
            }
            Some(body) => return Ok(body),
            // An empty frame carries nothing; a newer server may send bodies
            // this build does not know, which decode as `None` too.
            None => continue,
        }
    }
}

fn unexpected(wanted: &str, got: &server_frame::Body) -> ClientError {
    ClientError::Protocol(format!("expected {wanted}, got {got:?}"))
}
