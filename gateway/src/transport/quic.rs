//! QUIC: each shard runs its own quinn endpoint on its own UDP socket
//! (SO_REUSEPORT on a shared port). A client opens one bidirectional stream
//! right after the handshake and both sides write frames on it as on TCP,
//! so the session code is the same as for TCP. The handshake must
//! negotiate ALPN `pingme/1` ([`pingme_protocol::QUIC_ALPN`]).
//!
//! Connection migration (a phone changing networks keeps its session): the
//! server allows it, and makes sure a migrated client's packets still reach
//! the shard that owns its connection. The kernel spreads a reuseport
//! group's datagrams by a hash of the 4-tuple, so a client's new address
//! would land on a random shard, whose endpoint knows nothing of the
//! connection and drops the packets. Instead every shard puts its index in
//! the first two bytes of the connection IDs it issues, and a classic BPF
//! program on the group picks the socket by those bytes of the packet's
//! destination connection ID ([`steer_by_connection_id`]); a client's first
//! Initial packets carry an ID the client made up, whose first bytes are
//! mostly no shard index, and the kernel falls back to the hash for them.
//!
//! Handshakes under load: a client's first Initial packet makes the server
//! run its key exchange and sign with its certificate key, and the packet's
//! source address may be forged. Each shard counts its handshakes in
//! progress; above [`SessionLimits::quic_handshakes_before_retry`] a client
//! that has not proven its address gets a Retry first (a token it must
//! echo from that address, which costs the server no connection state),
//! and above [`SessionLimits::max_quic_handshakes`] new handshakes are
//! refused, so neither forged floods nor reconnect storms can make a shard
//! hold unbounded handshake work and memory. Clients that connected before
//! hold address tokens from the server (NEW_TOKEN, quinn's `bloom`
//! feature) and skip the Retry.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use crate::SessionLimits;
use crate::connection::{CloseReason, Transport};
use crate::shard_context::{ShardCtx, count_disconnect};
use crate::transport::tcp::{auth_deadline, serve_stream};

/// A quinn server configuration over a rustls one. QUIC's own idle timeout
/// sits a little above the session's, so the session decides. The TLS
/// configuration is the TCP+TLS one plus ALPN `pingme/1`: rustls then
/// refuses a QUIC client that offers no ALPN or only others. Public for
/// the `quic_state` example, which measures quinn-proto with it.
pub fn server_config(
    tls: &rustls::ServerConfig,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, String> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![pingme_protocol::QUIC_ALPN.to_vec()];
    // quinn keeps the keys; nothing here takes them out.
    tls.enable_secret_extraction = false;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| e.to_string())?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(idle_timeout + Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    transport.max_idle_timeout(Some(idle));
    // Clients open exactly one bidirectional stream.
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // No path MTU probing: payloads stay at QUIC's 1,200 bytes. Probes
    // grew every connection's send buffer to the larger MTU for good (1.4
    // KB of an idle connection), and quinn repeats them every ten minutes
    // per connection, waking an idle phone's radio for nothing; a chat
    // gateway's packets are small.
    transport.mtu_discovery_config(None);
    config.transport_config(Arc::new(transport));
    // A client whose address changes (new network, NAT rebinding) keeps
    // its connection and session: quinn validates the new path. This is
    // quinn's default; said here because the session promise depends on it.
    config.migration(true);
    Ok(config)
}

/// Length of the connection IDs the server issues: two bytes of shard
/// index and ten random bytes (80 bits, so IDs stay unguessable and an
/// observer links nothing but the shard).
const SERVER_CID_LEN: usize = 12;

/// Connection IDs that name the shard that issued them (see the module
/// docs), so the reuseport steering program delivers every packet of a
/// connection to its shard whatever the client's address.
#[derive(Debug)]
struct ShardConnectionIds {
    shard: u16,
}

impl quinn::ConnectionIdGenerator for ShardConnectionIds {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut bytes = [0u8; SERVER_CID_LEN];
        bytes[..2].copy_from_slice(&self.shard.to_be_bytes());
        rand::rng().fill(&mut bytes[2..]);
        quinn::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        SERVER_CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The shard's endpoint on its own socket (must run inside the shard's
/// runtime). `shard` is the socket's index in its reuseport group.
pub(crate) fn endpoint(
    socket: std::net::UdpSocket,
    config: quinn::ServerConfig,
    shard: u16,
) -> std::io::Result<quinn::Endpoint> {
    let mut endpoint_config = quinn::EndpointConfig::default();
    endpoint_config.cid_generator(move || Box::new(ShardConnectionIds { shard }));
    quinn::Endpoint::new(
        endpoint_config,
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Makes the kernel deliver each datagram of the reuseport `group` to the
/// socket whose index is the first two bytes of the packet's destination
/// connection ID ([`ShardConnectionIds`]); an index past the group's end
/// (a client-chosen ID) falls back to the 4-tuple hash. The group's sockets
/// must have been bound in shard order (index = bind order). Nothing to do
/// for a group of one.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn steer_by_connection_id(group: &[std::net::UdpSocket]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let Some(first) = group.first().filter(|_| group.len() > 1) else {
        return Ok(());
    };
    // Offsets are from the start of the UDP payload. A short-header packet
    // (top bit of byte 0 clear) has its destination ID at byte 1; a long
    // header has the ID's length at byte 5 and the ID from byte 6.
    let program = [
        bpf(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 0),
        bpf(libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K, 2, 0, 0x80),
        bpf(libc::BPF_LD | libc::BPF_H | libc::BPF_ABS, 0, 0, 1),
        bpf(libc::BPF_RET | libc::BPF_A, 0, 0, 0),
        bpf(libc::BPF_LD | libc::BPF_H | libc::BPF_ABS, 0, 0, 6),
        bpf(libc::BPF_RET | libc::BPF_A, 0, 0, 0),
    ];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: a valid socket descriptor, and a pointer to a sock_fprog of
    // its exact size whose filter points to `program`, alive for the call
    // (the kernel copies the program).
    let result = unsafe {
        libc::setsockopt(
            first.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(target_os = "linux")]
fn bpf(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// Elsewhere the kernel's hash decides; a migrated client may then reach
/// another shard and lose its connection (it reconnects and resyncs).
#[cfg(not(target_os = "linux"))]
pub(crate) fn steer_by_connection_id(_group: &[std::net::UdpSocket]) -> std::io::Result<()> {
    Ok(())
}

/// New QUIC connection attempts by what the shard did with them
/// (`outcome`: `accepted`, `retry`, `refused`).
pub(crate) const QUIC_INCOMING: &str = "pingme_gateway_quic_incoming_total";

/// What a shard does with a client's first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// Start the handshake.
    Accept,
    /// Send a Retry: the client must prove its address first.
    Retry,
    /// Refuse the connection (CONNECTION_REFUSED).
    Refuse,
}

impl Admission {
    /// `in_progress`: the shard's handshakes not finished yet; `validated`:
    /// the client echoed a token the server gave its address.
    fn decide(in_progress: usize, validated: bool, limits: &SessionLimits) -> Admission {
        if in_progress >= limits.max_quic_handshakes {
            Admission::Refuse
        } else if !validated && in_progress >= limits.quic_handshakes_before_retry {
            Admission::Retry
        } else {
            Admission::Accept
        }
    }

    fn label(self) -> &'static str {
        match self {
            Admission::Accept => "accepted",
            Admission::Retry => "retry",
            Admission::Refuse => "refused",
        }
    }
}

/// The shard's QUIC handshakes in progress (gauge `shard`-labelled).
pub(crate) const QUIC_HANDSHAKES: &str = "pingme_gateway_quic_handshakes_in_progress";

/// A shard's count of its QUIC handshakes in progress, also exported so
/// operators see how close a shard runs to its Retry threshold.
struct Handshakes {
    in_progress: Cell<usize>,
    gauge: metrics::Gauge,
}

impl Handshakes {
    fn new(gauge: metrics::Gauge) -> Rc<Handshakes> {
        Rc::new(Handshakes {
            in_progress: Cell::new(0),
            gauge,
        })
    }

    fn in_progress(&self) -> usize {
        self.in_progress.get()
    }

    fn set(&self, in_progress: usize) {
        self.in_progress.set(in_progress);
        self.gauge.set(in_progress as f64);
    }
}

/// One handshake in progress on the shard, counted until dropped.
struct HandshakeInProgress(Rc<Handshakes>);

impl HandshakeInProgress {
    fn start(handshakes: &Rc<Handshakes>) -> Self {
        handshakes.set(handshakes.in_progress() + 1);
        HandshakeInProgress(handshakes.clone())
    }
}

impl Drop for HandshakeInProgress {
    fn drop(&mut self) {
        self.0.set(self.0.in_progress() - 1);
    }
}

/// Accepts QUIC connections until shutdown.
pub(crate) async fn accept_quic(endpoint: quinn::Endpoint, ctx: Rc<ShardCtx>) {
    let handshakes =
        Handshakes::new(metrics::gauge!(QUIC_HANDSHAKES, "shard" => ctx.shard_label.clone()));
    loop {
        let incoming = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else {
            return;
        };
        let admission = Admission::decide(
            handshakes.in_progress(),
            incoming.remote_address_validated(),
            &ctx.limits,
        );
        metrics::counter!(QUIC_INCOMING, "outcome" => admission.label()).increment(1);
        match admission {
            Admission::Accept => {
                let handshake = HandshakeInProgress::start(&handshakes);
                tokio::task::spawn_local(serve_quic(incoming, ctx.clone(), handshake));
            }
            Admission::Retry => {
                // Only a client that already answered a Retry may not get
                // another; under this load it is refused instead.
                if let Err(refused) = incoming.retry() {
                    refused.into_incoming().refuse();
                }
            }
            Admission::Refuse => incoming.refuse(),
        }
    }
}

async fn serve_quic(incoming: quinn::Incoming, ctx: Rc<ShardCtx>, handshake: HandshakeInProgress) {
    // One deadline from the first packet: QUIC handshake, stream, Hello
    // and Authenticate.
    let deadline = auth_deadline(&ctx);
    let connection = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(_)) => return count_disconnect(Transport::Quic, CloseReason::IoError),
        Err(_) => return count_disconnect(Transport::Quic, CloseReason::AuthTimeout),
    };
    let (send, recv) = match tokio::time::timeout_at(deadline, connection.accept_bi()).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(_)) => return count_disconnect(Transport::Quic, CloseReason::PeerClosed),
        Err(_) => {
            connection.close(0u32.into(), b"auth timeout");
            return count_disconnect(Transport::Quic, CloseReason::AuthTimeout);
        }
    };
    // The cryptographic handshake is done; Hello and Authenticate are
    // bounded by the deadline like on every transport.
    drop(handshake);
    let io = serve_stream(
        tokio::io::join(recv, send),
        ctx.clone(),
        Transport::Quic,
        deadline,
    )
    .await;
    let (_recv, send) = io.into_inner();
    // The stream is finished; dropping the connection now could lose its
    // last frames, so wait (bounded) until the client has them.
    let _ = tokio::time::timeout(ctx.limits.close_linger, send.stopped()).await;
    connection.close(0u32.into(), b"closed");
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::time::Duration;

    use quinn::ConnectionIdGenerator;

    use super::*;
    use crate::transport::tcp::bind_udp_group;

    /// Below the Retry threshold every client gets a handshake; above it
    /// only clients that proved their address; at the maximum nobody.
    #[test]
    fn handshakes_under_load_go_to_clients_that_proved_their_address() {
        let limits = SessionLimits {
            quic_handshakes_before_retry: 2,
            max_quic_handshakes: 4,
            ..SessionLimits::default()
        };
        let decide = |in_progress, validated| Admission::decide(in_progress, validated, &limits);
        for validated in [false, true] {
            assert_eq!(decide(0, validated), Admission::Accept);
            assert_eq!(decide(1, validated), Admission::Accept);
        }
        for in_progress in [2, 3] {
            assert_eq!(decide(in_progress, false), Admission::Retry);
            assert_eq!(decide(in_progress, true), Admission::Accept);
        }
        for in_progress in [4, 5] {
            assert_eq!(decide(in_progress, false), Admission::Refuse);
            assert_eq!(decide(in_progress, true), Admission::Refuse);
        }
    }

    #[test]
    fn a_handshake_counts_until_it_ends() {
        let handshakes = Handshakes::new(metrics::Gauge::noop());
        let first = HandshakeInProgress::start(&handshakes);
        let second = HandshakeInProgress::start(&handshakes);
        assert_eq!(handshakes.in_progress(), 2);
        drop(first);
        assert_eq!(handshakes.in_progress(), 1);
        drop(second);
        assert_eq!(handshakes.in_progress(), 0);
    }

    #[test]
    fn shard_connection_ids_start_with_the_shard_index() {
        let mut ids = ShardConnectionIds { shard: 0x0102 };
        let (a, b) = (ids.generate_cid(), ids.generate_cid());
        assert_eq!((a.len(), ids.cid_len()), (SERVER_CID_LEN, SERVER_CID_LEN));
        assert_eq!(&a[..2], &[1, 2]);
        assert_eq!(&b[..2], &[1, 2]);
        assert_ne!(a, b, "the rest is random");
    }

    /// No path MTU probes: they grew every idle connection's send buffer
    /// and would wake idle phones every ten minutes.
    #[test]
    fn the_server_does_not_probe_path_mtu() {
        let material =
            crate::transport::tls::TlsMaterial::load_or_generate(None, None, true).unwrap();
        let tls = material.server_config().unwrap();
        let config = server_config(&tls, Duration::from_secs(60)).unwrap();
        let transport = format!("{:?}", config.transport);
        assert!(
            transport.contains("mtu_discovery_config: None"),
            "{transport}"
        );
    }

    /// Each socket of a QUIC group asks for a large kernel buffer, so a
    /// burst of Initial packets queues instead of being dropped; checked
    /// against the kernel's default for new sockets and its ceiling.
    #[cfg(target_os = "linux")]
    #[test]
    fn quic_sockets_get_buffers_larger_than_the_kernel_default() {
        use crate::transport::tcp::UDP_SOCKET_BUFFER;
        let sysctl = |name: &str| -> usize {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let (default, max) = (sysctl("rmem_default"), sysctl("rmem_max"));
        // Linux reports twice the size it granted (bookkeeping overhead).
        let expected = 2 * UDP_SOCKET_BUFFER.min(max);
        for socket in bind_udp_group("127.0.0.1:0".parse().unwrap(), 2).unwrap() {
            let granted = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
            assert_eq!(granted, expected);
            if max > default {
                assert!(granted > 2 * default, "{granted} vs default {default}");
            }
        }
    }

    /// The steering program against the kernel: datagrams shaped as QUIC
    /// short- and long-header packets reach the group's socket that their
    /// destination connection ID names, whatever their source port.
    #[cfg(target_os = "linux")]
    #[test]
    fn datagrams_reach_the_socket_their_connection_id_names() {
        let group = bind_udp_group("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        steer_by_connection_id(&group).unwrap();
        let server = group[0].local_addr().unwrap();
        for socket in &group {
            socket.set_nonblocking(false).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
        }
        let short = |shard: u8, tag: u8| vec![0x40, 0, shard, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, tag];
        let long = |shard: u8, tag: u8| {
            let mut packet = vec![0xc0, 0, 0, 0, 1, SERVER_CID_LEN as u8, 0, shard];
            packet.extend([7; SERVER_CID_LEN - 2]);
            packet.push(tag);
            packet
        };
        let mut tag = 0u8;
        // Several client sockets (new source ports, as after a migration).
        for _ in 0..4 {
            let client = UdpSocket::bind("127.0.0.1:0").unwrap();
            for shard in [2u8, 0, 1] {
                for packet in [short(shard, tag), long(shard, tag + 1)] {
                    client.send_to(&packet, server).unwrap();
                    let mut buf = [0u8; 64];
                    let (len, _) = group[usize::from(shard)]
                        .recv_from(&mut buf)
                        .expect("the named shard's socket gets the datagram");
                    assert_eq!(&buf[..len], &packet[..]);
                }
                tag += 2;
            }
        }
    }
}
