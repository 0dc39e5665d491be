//! Measures the heap quinn-proto itself keeps per idle server connection:
//! the floor under what a QUIC session costs the gateway, whatever drives
//! quinn-proto (quinn's runtime, or a driver of our own).
//!
//! `quic_state [connections]` runs a server and a client quinn-proto
//! endpoint in this process, passing datagrams in memory (no sockets, no
//! quinn runtime), with the gateway's own QUIC server configuration and
//! development certificate (one bidirectional stream, no unidirectional
//! ones, no path MTU probes); the client uses the same transport settings. Each
//! connection does its handshake and one exchange on a stream (40 bytes
//! each way, as Hello/Authenticate and their answers), then time moves on
//! so acknowledgements are processed. A counting allocator counts only
//! what is allocated and freed inside the server side's calls, and the
//! program prints the live bytes per connection and the largest kinds of
//! allocation by size:
//!
//! `cargo run --release -p pingme-gateway --example quic_state -- 2000`

// A counting global allocator is the point of this program.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig, Event,
};

/// Counts the bytes allocated inside [`server_side`] calls, and remembers
/// each such allocation's size so the live ones can be grouped at the end.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
thread_local!(static SERVER_SIDE: Cell<bool> = const { Cell::new(false) });
/// Live server-side allocations: address -> size. Touched only with
/// counting off (the map's own allocations are not counted).
static SIZES: Mutex<Option<HashMap<usize, usize>>> = Mutex::new(None);

fn counting() -> bool {
    SERVER_SIDE.with(Cell::get)
}

fn note(added: Option<(*mut u8, usize)>, removed: Option<*mut u8>) {
    SERVER_SIDE.with(|flag| flag.set(false));
    let mut sizes = SIZES.lock().unwrap();
    let sizes = sizes.get_or_insert_with(HashMap::new);
    if let Some(pointer) = removed
        && let Some(size) = sizes.remove(&(pointer as usize))
    {
        LIVE.fetch_sub(size as isize, Ordering::Relaxed);
    }
    if let Some((pointer, size)) = added {
        sizes.insert(pointer as usize, size);
        LIVE.fetch_add(size as isize, Ordering::Relaxed);
    }
    SERVER_SIDE.with(|flag| flag.set(true));
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc(layout) };
        if counting() {
            note(Some((pointer, layout.size())), None);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        if counting() {
            note(None, Some(pointer));
        }
        unsafe { System.dealloc(pointer, layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        let moved = unsafe { System.realloc(pointer, layout, size) };
        if counting() {
            note(Some((moved, size)), Some(pointer));
        }
        moved
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn server_side<T>(work: impl FnOnce() -> T) -> T {
    SERVER_SIDE.with(|flag| flag.set(true));
    let result = work();
    SERVER_SIDE.with(|flag| flag.set(false));
    result
}

struct Side {
    endpoint: Endpoint,
    connections: HashMap<ConnectionHandle, Box<Connection>>,
    address: SocketAddr,
}

impl Side {
    /// Feeds one datagram from `from`.
    fn receive(&mut self, now: Instant, from: SocketAddr, datagram: &[u8], server: bool) {
        let mut response = Vec::new();
        match self.endpoint.handle(
            now,
            from,
            None,
            None,
            BytesMut::from(datagram),
            &mut response,
        ) {
            Some(DatagramEvent::NewConnection(incoming)) if server => {
                let (handle, connection) = self
                    .endpoint
                    .accept(incoming, now, &mut response, None)
                    .expect("accepted");
                self.connections.insert(handle, Box::new(connection));
            }
            Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                if let Some(connection) = self.connections.get_mut(&handle) {
                    connection.handle_event(event);
                }
            }
            _ => {}
        }
    }

    /// Runs every connection's timers, endpoint events, application events
    /// (`on_event`) and transmissions; returns the datagrams to send.
    fn poll(
        &mut self,
        now: Instant,
        mut on_event: impl FnMut(&mut Connection, Event),
    ) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for (handle, connection) in &mut self.connections {
            if connection.poll_timeout().is_some_and(|at| at <= now) {
                connection.handle_timeout(now);
            }
            while let Some(event) = connection.poll_endpoint_events() {
                if let Some(back) = self.endpoint.handle_event(*handle, event) {
                    connection.handle_event(back);
                }
            }
            while let Some(event) = connection.poll() {
                on_event(connection, event);
            }
            let mut buffer = Vec::new();
            while let Some(transmit) = connection.poll_transmit(now, 1, &mut buffer) {
                out.push(buffer[..transmit.size].to_vec());
                buffer.clear();
            }
        }
        out
    }
}

/// The server reads the client's 40 bytes and answers with 40.
fn serve(connection: &mut Connection, event: Event) {
    if let Event::Stream(quinn_proto::StreamEvent::Opened { dir: Dir::Bi }) = event {
        while let Some(id) = connection.streams().accept(Dir::Bi) {
            let mut stream = connection.recv_stream(id);
            if let Ok(mut chunks) = stream.read(true) {
                while let Ok(Some(_)) = chunks.next(usize::MAX) {}
                let _ = chunks.finalize();
            }
            connection.send_stream(id).write(&[9; 40]).expect("answer");
        }
    }
}

/// The client opens its stream and sends 40 bytes once connected.
fn client(connection: &mut Connection, event: Event) {
    if let Event::Connected = event {
        let id = connection.streams().open(Dir::Bi).expect("a stream");
        connection.send_stream(id).write(&[7; 40]).expect("hello");
    }
}

fn main() -> anyhow::Result<()> {
    let count: usize = std::env::args().nth(1).map_or(Ok(2000), |n| n.parse())?;
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    // The gateway's development certificate and QUIC configuration; an idle
    // timeout far beyond the run.
    let material = pingme_gateway::transport::tls::TlsMaterial::load_or_generate(None, None, true)?;
    let server_config = pingme_gateway::transport::quic::server_config(
        &*material.server_config()?,
        Duration::from_secs(600),
    )
    .map_err(anyhow::Error::msg)?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(material.chain[0].clone())?;
    let mut client_tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![pingme_protocol::QUIC_ALPN.to_vec()];
    let client_crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(client_tls)?;
    let mut client_config = ClientConfig::new(Arc::new(client_crypto));
    client_config.transport_config(server_config.transport.clone());

    let mut server = server_side(|| Side {
        endpoint: Endpoint::new(
            Arc::new(EndpointConfig::default()),
            Some(Arc::new(server_config)),
            false,
            None,
        ),
        connections: HashMap::with_capacity(count),
        address: SocketAddr::from(([127, 0, 0, 1], 4433)),
    });
    let mut clients = Side {
        endpoint: Endpoint::new(Arc::new(EndpointConfig::default()), None, false, None),
        connections: HashMap::new(),
        address: SocketAddr::from(([127, 0, 0, 2], 5555)),
    };
    let base = LIVE.load(Ordering::Relaxed);
    let mut now = Instant::now();
    let exchange = |server: &mut Side, clients: &mut Side, now: Instant| loop {
        let to_server = clients.poll(now, client);
        for datagram in &to_server {
            server_side(|| server.receive(now, clients.address, datagram, true));
        }
        let to_clients = server_side(|| server.poll(now, serve));
        for datagram in &to_clients {
            clients.receive(now, server.address, datagram, false);
        }
        if to_server.is_empty() && to_clients.is_empty() {
            break;
        }
    };
    for _ in 0..count {
        let (handle, connection) =
            clients
                .endpoint
                .connect(now, client_config.clone(), server.address, "localhost")?;
        clients.connections.insert(handle, Box::new(connection));
        exchange(&mut server, &mut clients, now);
    }
    // Delayed acknowledgements go out and are processed.
    for _ in 0..3 {
        now += Duration::from_millis(200);
        exchange(&mut server, &mut clients, now);
    }
    let established = server
        .connections
        .values()
        .filter(|c| !c.is_handshaking() && !c.is_closed())
        .count();
    assert_eq!(established, count, "every connection established");
    let live = LIVE.load(Ordering::Relaxed) - base;
    println!(
        "{count} idle server connections: {} bytes of quinn-proto heap each \
         (the Connection struct: {} bytes)",
        live / count as isize,
        std::mem::size_of::<Connection>()
    );
    let mut by_size: BTreeMap<usize, usize> = BTreeMap::new();
    for size in SIZES
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .map(|(_, size)| *size)
    {
        *by_size.entry(size).or_default() += 1;
    }
    let mut rows: Vec<(usize, usize, usize)> = by_size
        .into_iter()
        .map(|(size, n)| (size * n / count, size, n))
        .collect();
    rows.sort_unstable_by(|a, b| b.cmp(a));
    for (per_connection, size, n) in rows.into_iter().take(12) {
        println!("  {n:>7} allocations of {size:>6} bytes = {per_connection:>5} per connection");
    }
    Ok(())
}
