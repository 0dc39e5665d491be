//! Micro benchmarks of what a TLS 1.3 handshake costs the server, with the
//! gateway's own rustls configuration (ring, AES-128-GCM-SHA256 first,
//! stateless tickets) and its self-signed ECDSA P-256 certificate: the
//! server's side of a full and of a resumed handshake run in memory (no
//! sockets; only the time spent in the server's calls is counted), and the
//! public-key operations every full handshake must do: a key share with
//! its agreement (X25519, and P-256 for comparison), and the P-256 signature of CertificateVerify.
//! They set the floor under connect+authenticate per server CPU-second
//! (docs/benchmarks.md, "QUIC and TLS connection setup"): QUIC runs the
//! same TLS handshake.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use pingme_gateway::transport::tls::TlsMaterial;
use rustls::crypto::ring::default_provider;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, ServerConfig, ServerConnection};

/// The gateway's server configuration (development certificate) and a
/// client that trusts it, with or without a session cache.
fn configs(resume: bool) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let material = TlsMaterial::load_or_generate(None, None, true).expect("certificate");
    let server = material.server_config().expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(material.chain[0].clone()).expect("root");
    let mut client = ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        client.resumption = rustls::client::Resumption::disabled();
    }
    (server, Arc::new(client))
}

/// Feeds everything in `bytes` to `conn` and processes it.
fn deliver<Data>(conn: &mut rustls::ConnectionCommon<Data>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        conn.read_tls(&mut bytes).expect("read_tls");
        conn.process_new_packets().expect("handshake");
    }
}

/// One handshake in memory, through the tickets the server sends after
/// it; returns the time spent in the server's calls and how the
/// handshake went.
fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> (Duration, HandshakeKind) {
    let name = ServerName::try_from("localhost").expect("name");
    let mut client = ClientConnection::new(client.clone(), name).expect("client");
    let started = Instant::now();
    let mut server = ServerConnection::new(server.clone()).expect("server");
    let mut in_server = started.elapsed();
    let mut wire = Vec::with_capacity(4096);
    loop {
        wire.clear();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("client write");
        }
        let started = Instant::now();
        deliver(&mut server, &wire);
        wire.clear();
        while server.wants_write() {
            server.write_tls(&mut wire).expect("server write");
        }
        in_server += started.elapsed();
        deliver(&mut client, &wire);
        let quiet = !client.wants_write() && !server.wants_write();
        if quiet && !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
    }
    (in_server, server.handshake_kind().expect("handshake done"))
}

/// Sums the server's time over `iters` handshakes, each of the `expected` kind.
fn server_time(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    expected: HandshakeKind,
    iters: u64,
) -> Duration {
    (0..iters)
        .map(|_| {
            let (spent, kind) = handshake(server, client);
            assert_eq!(kind, expected, "the benchmark measures what it says");
            spent
        })
        .sum()
}

fn tls13_handshakes(c: &mut Criterion) {
    let (server, client) = configs(false);
    c.bench_function("TLS 1.3 full handshake, server side", |b| {
        b.iter_custom(|iters| server_time(&server, &client, HandshakeKind::Full, iters))
    });

    let (server, client) = configs(true);
    // The first handshake fills the client's cache; each resumed one
    // takes a ticket and brings new ones.
    assert_eq!(handshake(&server, &client).1, HandshakeKind::Full);
    c.bench_function("TLS 1.3 resumed handshake, server side", |b| {
        b.iter_custom(|iters| server_time(&server, &client, HandshakeKind::Resumed, iters))
    });
}

fn public_key_operations(c: &mut Criterion) {
    let provider = default_provider();
    // A handshake does one of these, for the group the client sent a key
    // share for (rustls clients: X25519).
    for (group, label) in [
        (rustls::NamedGroup::X25519, "X25519"),
        (rustls::NamedGroup::secp256r1, "P-256"),
    ] {
        let group = provider
            .kx_groups
            .iter()
            .find(|candidate| candidate.name() == group)
            .expect("group");
        let peer_share = group.start().expect("peer share").pub_key().to_vec();
        c.bench_function(&format!("{label} key share and agreement"), |b| {
            b.iter(|| {
                let ours = group.start().expect("key share");
                black_box(ours.pub_key());
                black_box(ours.complete(&peer_share).expect("agreement"));
            })
        });
    }

    // rcgen's default key, as the development certificate's: ECDSA P-256.
    let key = rcgen::KeyPair::generate().expect("key");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let key = provider
        .key_provider
        .load_private_key(key)
        .expect("signing key");
    let signer = key
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .expect("P-256 scheme");
    let transcript = [7u8; 130];
    c.bench_function(
        "ECDSA P-256 CertificateVerify signature (full handshakes)",
        |b| b.iter(|| black_box(signer.sign(&transcript).expect("signature"))),
    );
}

criterion_group!(benches, tls13_handshakes, public_key_operations);
criterion_main!(benches);
