//! The server side of TLS over TCP: the handshake on rustls' unbuffered
//! API, then a byte stream ([`AsyncRead`] + [`AsyncWrite`]) over our lean
//! record layer (`tls_record`) that holds no buffer while the connection
//! is idle.
//!
//! rustls' buffered connection (what tokio-rustls wraps) keeps a 4 KiB
//! receive buffer for every connection from its first read to its close,
//! though an idle chat connection has nothing in flight, and rustls'
//! connection object itself keeps several KB more after the handshake.
//! Here the connection owns three buffers, each allocated only while it
//! holds bytes: an unfinished record received, encrypted bytes the socket
//! has not taken yet, and decrypted bytes the reader has not taken yet.
//! What stays per connection is two keys and their sequence numbers.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::transport::tls_record::{Opened, RecordLayer};

/// Bytes asked of the socket per read (a record larger than this takes
/// several reads).
const READ_SIZE: usize = 8 * 1024;

/// Plaintext bytes one write encrypts at most.
const MAX_WRITE: usize = 64 * 1024;

/// Each shard thread's buffers for a write: the plaintext gathered from
/// the caller's slices, and the records sealed from it. Only what the
/// socket does not take at once is copied into the connection.
#[derive(Default)]
struct Scratch {
    gathered: Vec<u8>,
    sealed: BytesMut,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Runs the server side of a TLS handshake on `tcp` (the caller bounds it
/// in time); the config must allow secret extraction (the record layer
/// takes the keys over).
///
/// The stream comes boxed: a future holding it by value (the connection's
/// task, its session driver) can keep more than one slot of its size
/// across awaits, and it is some 800 bytes; a box is one word.
pub(crate) async fn accept(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
) -> io::Result<Box<TlsStream>> {
    let mut handshake = Handshake {
        tcp,
        tls: UnbufferedServerConnection::new(config).map_err(io::Error::other)?,
        incoming: BytesMut::new(),
        outgoing: BytesMut::new(),
        plaintext: BytesMut::new(),
    };
    std::future::poll_fn(|cx| handshake.poll_complete(cx)).await?;
    let Handshake {
        tcp,
        tls,
        incoming,
        outgoing,
        plaintext,
    } = handshake;
    Ok(Box::new(TlsStream {
        tcp,
        records: RecordLayer::take_over(tls)?,
        incoming,
        outgoing,
        plaintext,
        read_closed: false,
        close_notify_sent: false,
    }))
}

/// A connection during its handshake: rustls drives it, and the buffers
/// pass on to the [`TlsStream`].
struct Handshake {
    tcp: TcpStream,
    tls: UnbufferedServerConnection,
    incoming: BytesMut,
    outgoing: BytesMut,
    plaintext: BytesMut,
}

/// A TLS connection after its handshake. See the module docs.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    records: RecordLayer,
    /// Received bytes not yet processed: an unfinished record. Empty and
    /// unallocated otherwise.
    incoming: BytesMut,
    /// Encrypted bytes the socket has not taken yet.
    outgoing: BytesMut,
    /// Decrypted bytes the reader has not taken yet (more arrived than
    /// its buffer had room for).
    plaintext: BytesMut,
    /// The peer's close_notify (or the socket's end) was seen.
    read_closed: bool,
    close_notify_sent: bool,
}

fn tls_error(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

/// Gives back `buf`'s allocation once it holds nothing: an idle
/// connection holds no buffer.
fn release_if_empty(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
}

impl Handshake {
    /// Drives the handshake until rustls would let application data be
    /// sent and every byte of its own is out.
    fn poll_complete(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            // The peer waits for our flight before it sends more.
            ready!(poll_write_all(&mut self.tcp, &mut self.outgoing, cx))?;
            if self.process()? && !self.tls.is_handshaking() {
                // Our last flight and the session tickets: the record
                // layer takes over only once rustls holds nothing unsent.
                ready!(poll_write_all(&mut self.tcp, &mut self.outgoing, cx))?;
                return Poll::Ready(Ok(()));
            }
            if !self.outgoing.is_empty() {
                continue;
            }
            if ready!(poll_fill(&mut self.tcp, &mut self.incoming, cx))? == 0 {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Processes every complete record in `incoming` (consumed bytes are
    /// dropped from it): rustls' output goes to `outgoing`, application
    /// data a client sent right behind its Finished to `plaintext`.
    /// Answers whether the connection may now send application data.
    fn process(&mut self) -> io::Result<bool> {
        let Self {
            tls,
            incoming,
            outgoing,
            plaintext,
            ..
        } = self;
        loop {
            let UnbufferedStatus { mut discard, state } =
                tls.process_tls_records(&mut incoming[..]);
            let traffic = match state.map_err(tls_error)? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        plaintext.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    let start = outgoing.len();
                    let mut room = 512;
                    loop {
                        outgoing.resize(start + room, 0);
                        match data.encode(&mut outgoing[start..]) {
                            Ok(written) => {
                                outgoing.truncate(start + written);
                                break;
                            }
                            Err(EncodeError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) if required_size > room => room = required_size,
                            Err(error) => {
                                outgoing.truncate(start);
                                return Err(io::Error::other(error));
                            }
                        }
                    }
                    None
                }
                // Our output is in `outgoing`, written before anything
                // later.
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(false),
                ConnectionState::WriteTraffic(_) => Some(true),
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                // Early data stays refused (max_early_data_size 0), so this
                // and any later state are a broken peer.
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "unexpected TLS state",
                    ));
                }
            };
            incoming.advance(discard);
            if let Some(traffic) = traffic {
                release_if_empty(incoming);
                return Ok(traffic);
            }
        }
    }
}

/// Reads what the socket has into `incoming`. Room is reserved only once
/// the socket has something, and given back if it had nothing: an idle
/// connection waits without a buffer.
fn poll_fill(
    tcp: &mut TcpStream,
    incoming: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if incoming.is_empty() {
        ready!(tcp.poll_read_ready(cx))?;
    }
    incoming.reserve(READ_SIZE);
    let read = tokio_util::io::poll_read_buf(Pin::new(tcp), cx, incoming);
    if !matches!(read, Poll::Ready(Ok(n)) if n > 0) {
        release_if_empty(incoming);
    }
    read
}

/// Writes `outgoing` to the socket; Ready once all of it is out (its
/// allocation is then released).
fn poll_write_all(
    tcp: &mut TcpStream,
    outgoing: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while !outgoing.is_empty() {
        let written = ready!(Pin::new(&mut *tcp).poll_write(cx, outgoing))?;
        if written == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        outgoing.advance(written);
    }
    release_if_empty(outgoing);
    Poll::Ready(Ok(()))
}

impl TlsStream {
    /// Moves decrypted bytes waiting in `plaintext` into `buf`.
    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) {
        if self.plaintext.is_empty() {
            return;
        }
        let n = self.plaintext.len().min(buf.remaining());
        buf.put_slice(&self.plaintext[..n]);
        self.plaintext.advance(n);
        release_if_empty(&mut self.plaintext);
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        loop {
            this.take_plaintext(buf);
            // Bytes handed over (or the end) make this read ready: a
            // Pending now would lose them.
            if buf.filled().len() > before || this.read_closed {
                return Poll::Ready(Ok(()));
            }
            if !this.incoming.is_empty() {
                let Self {
                    records,
                    incoming,
                    plaintext,
                    ..
                } = &mut *this;
                let opened = records.open(incoming, &mut |bytes| {
                    let direct = bytes.len().min(buf.remaining());
                    buf.put_slice(&bytes[..direct]);
                    plaintext.extend_from_slice(&bytes[direct..]);
                })?;
                release_if_empty(incoming);
                if opened == Opened::PeerClosed {
                    this.read_closed = true;
                }
                if buf.filled().len() > before || this.read_closed {
                    continue;
                }
            }
            if ready!(poll_fill(&mut this.tcp, &mut this.incoming, cx))? == 0 {
                // The socket ended without close_notify: the end all the
                // same (frames are length-prefixed, so a cut frame shows).
                this.read_closed = true;
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    /// Encrypts as much of `bufs` as one write takes (the connection's
    /// whole queue of small frames, usually) into as few records as
    /// possible, and hands them to the socket at once.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Earlier output first: this is where a slow reader pushes back.
        ready!(poll_write_all(&mut this.tcp, &mut this.outgoing, cx))?;
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let Scratch { gathered, sealed } = &mut *scratch;
            gathered.clear();
            sealed.clear();
            for buf in bufs {
                let room = MAX_WRITE - gathered.len();
                gathered.extend_from_slice(&buf[..buf.len().min(room)]);
                if gathered.len() == MAX_WRITE {
                    break;
                }
            }
            if gathered.is_empty() {
                return Poll::Ready(Ok(0));
            }
            this.records.seal(gathered, sealed)?;
            // Straight from the thread's buffer to the socket; only what
            // the socket does not take now is kept, in `outgoing`.
            let mut written = 0;
            while written < sealed.len() {
                match Pin::new(&mut this.tcp).poll_write(cx, &sealed[written..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(n)) => written += n,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => break,
                }
            }
            this.outgoing.extend_from_slice(&sealed[written..]);
            Poll::Ready(Ok(gathered.len()))
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(poll_write_all(&mut this.tcp, &mut this.outgoing, cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_notify_sent {
            ready!(poll_write_all(&mut this.tcp, &mut this.outgoing, cx))?;
            this.close_notify_sent = true;
            this.records.seal_close_notify(&mut this.outgoing)?;
        }
        ready!(poll_write_all(&mut this.tcp, &mut this.outgoing, cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("records", &self.records)
            .field("incoming", &self.incoming.len())
            .field("outgoing", &self.outgoing.len())
            .field("plaintext", &self.plaintext.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::transport::tls::TlsMaterial;

    struct Pair {
        server: Box<TlsStream>,
        client: tokio_rustls::client::TlsStream<TcpStream>,
        resumed: bool,
    }

    fn client_config(material: &TlsMaterial) -> Arc<rustls::ClientConfig> {
        client_config_for(material, rustls::DEFAULT_VERSIONS)
    }

    /// A client trusting `material`'s certificate that speaks `versions`.
    fn client_config_for(
        material: &TlsMaterial,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(material.chain[0].clone()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_protocol_versions(versions)
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// A handshake over loopback TCP between [`accept`] and a
    /// tokio-rustls client.
    async fn connect(
        server_config: &Arc<rustls::ServerConfig>,
        client_config: &Arc<rustls::ClientConfig>,
    ) -> Pair {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_config = server_config.clone();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(tcp, server_config).await.unwrap()
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let client = tokio_rustls::TlsConnector::from(client_config.clone())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let server = server.await.unwrap();
        let resumed = server.records.resumed();
        Pair {
            server,
            client,
            resumed,
        }
    }

    fn holds_no_buffer(stream: &TlsStream) -> bool {
        stream.incoming.capacity() == 0
            && stream.outgoing.capacity() == 0
            && stream.plaintext.capacity() == 0
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_an_idle_connection_holds_no_buffer() {
        let material = TlsMaterial::load_or_generate(None, None, true).unwrap();
        let server_config = material.server_config().unwrap();
        let client_config = client_config(&material);
        let Pair {
            mut server,
            mut client,
            ..
        } = connect(&server_config, &client_config).await;

        // Small and multi-record messages (records hold at most 16 KiB).
        for size in [1usize, 100, 20_000, 70_000] {
            let sent: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            client.write_all(&sent).await.unwrap();
            client.flush().await.unwrap();
            let mut got = vec![0u8; size];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, sent);
            assert!(holds_no_buffer(&server), "{server:?} after reading {size}");

            server.write_all(&sent).await.unwrap();
            server.flush().await.unwrap();
            assert!(holds_no_buffer(&server), "{server:?} after writing {size}");
            let mut got = vec![0u8; size];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, sent);
        }

        // A read with a small buffer keeps the rest for the next read.
        client.write_all(b"hello, world").await.unwrap();
        client.flush().await.unwrap();
        let mut first = [0u8; 5];
        server.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"hello");
        let mut rest = [0u8; 7];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b", world");
        assert!(holds_no_buffer(&server));

        // The client's close_notify is the end of the stream, and ours
        // reaches the client.
        client.shutdown().await.unwrap();
        let mut end = Vec::new();
        server.read_to_end(&mut end).await.unwrap();
        assert!(end.is_empty());
        server.shutdown().await.unwrap();
        let mut end = Vec::new();
        client.read_to_end(&mut end).await.unwrap();
        assert!(end.is_empty());
    }

    /// The tickets the server sends after the handshake reach the client,
    /// and its next connection resumes.
    #[tokio::test]
    async fn a_second_connection_resumes() {
        let material = TlsMaterial::load_or_generate(None, None, true).unwrap();
        let server_config = material.server_config().unwrap();
        let client_config = client_config(&material);
        let mut first = connect(&server_config, &client_config).await;
        assert!(!first.resumed);
        // The client takes its tickets in with its first read.
        first.server.write_all(b"x").await.unwrap();
        first.server.flush().await.unwrap();
        let mut byte = [0u8; 1];
        first.client.read_exact(&mut byte).await.unwrap();
        let second = connect(&server_config, &client_config).await;
        assert!(second.resumed);
    }

    /// rustls clients list AES-256-GCM-SHA384 first; the server picks
    /// AES-128-GCM-SHA256, whose SHA-256 this CPU runs in hardware.
    #[tokio::test]
    async fn the_server_picks_a_sha256_suite_over_the_clients_first_choice() {
        let material = TlsMaterial::load_or_generate(None, None, true).unwrap();
        let client_config = client_config(&material);
        let first_choice = rustls::crypto::ring::default_provider().cipher_suites[0].suite();
        assert_eq!(first_choice, rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
        let pair = connect(&material.server_config().unwrap(), &client_config).await;
        let suite = pair.server.records.cipher_suite().suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }

    /// Writes `message` on one side and reads it whole on the other.
    async fn server_to_client(pair: &mut Pair, message: &[u8]) {
        pair.server.write_all(message).await.unwrap();
        pair.server.flush().await.unwrap();
        let mut got = vec![0u8; message.len()];
        pair.client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, message);
    }

    async fn client_to_server(pair: &mut Pair, message: &[u8]) {
        pair.client.write_all(message).await.unwrap();
        pair.client.flush().await.unwrap();
        let mut got = vec![0u8; message.len()];
        pair.server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, message);
    }

    /// Near the suite's record limit the server replaces its key (a
    /// KeyUpdate under the old key, the rest under the new), and the
    /// client reads on through every change.
    #[tokio::test]
    async fn the_server_changes_its_key_before_the_record_limit() {
        let material = TlsMaterial::load_or_generate(None, None, true).unwrap();
        let mut pair = connect(
            &material.server_config().unwrap(),
            &client_config(&material),
        )
        .await;
        // Each key seals at most 4 records, the KeyUpdate among them.
        pair.server.records.set_tx_limit(4);
        for i in 0..10u8 {
            server_to_client(&mut pair, &[i; 100]).await;
        }
        // A 40,000-byte write is 3 records: the limit falls inside it.
        server_to_client(&mut pair, &[7; 40_000]).await;
        let (ours, theirs) = pair.server.records.key_updates();
        assert!(ours >= 4, "{:?}", pair.server);
        assert_eq!(theirs, 0);
        client_to_server(&mut pair, b"still both ways").await;
    }

    /// A client's KeyUpdate changes the key the server reads with; when it
    /// asks for the server's, one is sent before the server's next data.
    #[tokio::test]
    async fn a_clients_key_update_is_followed_and_answered() {
        let material = TlsMaterial::load_or_generate(None, None, true).unwrap();
        let mut pair = connect(
            &material.server_config().unwrap(),
            &client_config(&material),
        )
        .await;
        client_to_server(&mut pair, b"before").await;
        for round in 1..=3u32 {
            // rustls' refresh asks for the peer's update too.
            pair.client.get_mut().1.refresh_traffic_keys().unwrap();
            client_to_server(&mut pair, b"under the client's new key").await;
            assert_eq!(pair.server.records.key_updates(), (round - 1, round));
            server_to_client(&mut pair, b"under the server's new key").await;
            assert_eq!(pair.server.records.key_updates(), (round, round));
        }
    }

    /// A peer that keeps changing keys without sending data is cut off
    /// (each change costs the server a key derivation); one that sends
    /// data between changes may change them as often as it likes.
    #[tokio::test]
    async fn a_flood_of_key_updates_without_data_fails_the_read() {
        let material = TlsMaterial::load_or_generate(None, None, true).unwrap();
        let server_config = material.server_config().unwrap();
        let client_config = client_config(&material);

        let mut pair = connect(&server_config, &client_config).await;
        for _ in 0..3 {
            for _ in 0..32 {
                pair.client.get_mut().1.refresh_traffic_keys().unwrap();
            }
            client_to_server(&mut pair, b"data between").await;
        }
        assert_eq!(pair.server.records.key_updates().1, 96);

        let mut pair = connect(&server_config, &client_config).await;
        for _ in 0..33 {
            pair.client.get_mut().1.refresh_traffic_keys().unwrap();
        }
        pair.client.write_all(b"too late").await.unwrap();
        pair.client.flush().await.unwrap();
        let mut buf = [0u8; 8];
        let error = pair.server.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(
            error.to_string().contains("too many key updates"),
            "{error}"
        );
    }

    /// TLS 1.2 clients are still served, on the same record layer.
    #[tokio::test]
    async fn a_tls12_client_is_served() {
        let material = TlsMaterial::load_or_generate(None, None, true).unwrap();
        let tls12 = client_config_for(&material, &[&rustls::version::TLS12]);
        let mut pair = connect(&material.server_config().unwrap(), &tls12).await;
        assert_eq!(
            pair.server.records.cipher_suite().version(),
            &rustls::version::TLS12
        );
        for size in [1usize, 100, 20_000] {
            let message: Vec<u8> = (0..size).map(|i| (i % 249) as u8).collect();
            client_to_server(&mut pair, &message).await;
            server_to_client(&mut pair, &message).await;
        }
        pair.client.shutdown().await.unwrap();
        let mut end = Vec::new();
        pair.server.read_to_end(&mut end).await.unwrap();
        assert!(end.is_empty());
    }

    /// Records the record layer must refuse, written raw under the
    /// client's TLS session: each fails the server's read, and none is
    /// waited for beyond its header.
    #[tokio::test]
    async fn a_forged_oversize_or_out_of_place_record_fails_the_read() {
        let material = TlsMaterial::load_or_generate(None, None, true).unwrap();
        let server_config = material.server_config().unwrap();
        let client_config = client_config(&material);
        let forged: [&[u8]; 3] = [
            // Application data that does not decrypt.
            &[
                23, 3, 3, 0, 20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
                20,
            ],
            // Longer than TLS 1.3 allows: refused from the header alone.
            &[23, 3, 3, 0x41, 0x01],
            // A cleartext ChangeCipherSpec after the handshake.
            &[20, 3, 3, 0, 1, 1],
        ];
        for record in forged {
            let mut pair = connect(&server_config, &client_config).await;
            client_to_server(&mut pair, b"fine so far").await;
            pair.client.get_mut().0.write_all(record).await.unwrap();
            let mut byte = [0u8; 1];
            let error = pair.server.read(&mut byte).await.unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{record:?}");
        }
    }

    #[tokio::test]
    async fn a_client_that_is_not_tls_fails_the_handshake() {
        let material = TlsMaterial::load_or_generate(None, None, true).unwrap();
        let server_config = material.server_config().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accept(accepted, server_config).await.is_err());
    }
}
