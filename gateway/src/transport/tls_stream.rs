//! The server side of TLS over TCP, on rustls' unbuffered API: the
//! handshake and then a byte stream ([`AsyncRead`] + [`AsyncWrite`]) that
//! holds no buffer while the connection is idle.
//!
//! rustls' buffered connection (what tokio-rustls wraps) keeps a 4 KiB
//! receive buffer for every connection from its first read to its close,
//! though an idle chat connection has nothing in flight: that buffer was
//! the largest part of an idle TLS session. Here the connection owns three
//! buffers, each allocated only while it holds bytes: an unfinished record
//! received, encrypted bytes the socket has not taken yet, and decrypted
//! bytes the reader has not taken yet. What stays per connection is
//! rustls' own state (keys, sequence numbers).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

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
/// in time).
pub(crate) async fn accept(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
) -> io::Result<TlsStream> {
    let tls = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
    let mut stream = TlsStream {
        tcp,
        tls,
        incoming: BytesMut::new(),
        outgoing: BytesMut::new(),
        plaintext: BytesMut::new(),
        read_closed: false,
        close_notify_sent: false,
    };
    std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

/// A TLS connection after its handshake. See the module docs.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    tls: UnbufferedServerConnection,
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

/// Where processing the received records stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The handshake needs more bytes from the peer.
    NeedMore,
    /// Application data may be sent (and more bytes read).
    Traffic,
    /// The peer sent close_notify.
    PeerClosed,
}

fn tls_error(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

/// Processes every complete record in `incoming` (consumed bytes are
/// dropped from it): handshake output goes to `outgoing`, decrypted bytes
/// to `on_plaintext`, and `app_data`, if given, is encrypted into
/// `outgoing` once the connection can send it.
fn process(
    tls: &mut UnbufferedServerConnection,
    incoming: &mut BytesMut,
    outgoing: &mut BytesMut,
    mut app_data: Option<&[u8]>,
    on_plaintext: &mut dyn FnMut(&[u8]),
) -> io::Result<Step> {
    loop {
        let UnbufferedStatus { mut discard, state } = tls.process_tls_records(&mut incoming[..]);
        let step = match state.map_err(tls_error)? {
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    on_plaintext(record.payload);
                }
                None
            }
            ConnectionState::EncodeTlsData(mut data) => {
                append_sized(outgoing, 512, |out| match data.encode(out) {
                    Ok(written) => Ok(Ok(written)),
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        Ok(Err(required_size))
                    }
                    Err(error) => Err(io::Error::other(error)),
                })?;
                None
            }
            // Our output is in `outgoing`, which is written before
            // anything encrypted later.
            ConnectionState::TransmitTlsData(data) => {
                data.done();
                None
            }
            ConnectionState::BlockedHandshake => Some(Step::NeedMore),
            ConnectionState::WriteTraffic(mut traffic) => {
                if let Some(data) = app_data.take() {
                    // Each record adds a header, the content type and a tag.
                    let room = data.len() + (data.len() / 16_384 + 1) * 32;
                    append_sized(outgoing, room, |out| {
                        encrypted_size(traffic.encrypt(data, out))
                    })?;
                }
                Some(Step::Traffic)
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => Some(Step::PeerClosed),
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
        if let Some(step) = step {
            if incoming.is_empty() {
                // Release the allocation: an idle connection holds none.
                *incoming = BytesMut::new();
            }
            return Ok(step);
        }
    }
}

/// An encryption's outcome in `append_sized`'s terms: bytes written, or
/// the size it needs.
fn encrypted_size(outcome: Result<usize, EncryptError>) -> io::Result<Result<usize, usize>> {
    match outcome {
        Ok(written) => Ok(Ok(written)),
        Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
            Ok(Err(required_size))
        }
        Err(error) => Err(io::Error::other(error)),
    }
}

/// Appends what `write` puts into a slice (first of `room` bytes) to
/// `buf`; `write` answers `Ok(Err(size))` when it needs `size` bytes.
fn append_sized(
    buf: &mut BytesMut,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> io::Result<Result<usize, usize>>,
) -> io::Result<()> {
    let start = buf.len();
    loop {
        buf.resize(start + room, 0);
        match write(&mut buf[start..]) {
            Ok(Ok(written)) => {
                buf.truncate(start + written);
                return Ok(());
            }
            Ok(Err(required)) if required > room => room = required,
            Ok(Err(_)) => {
                buf.truncate(start);
                return Err(io::Error::other(
                    "TLS output does not fit what it asked for",
                ));
            }
            Err(error) => {
                buf.truncate(start);
                return Err(error);
            }
        }
    }
}

impl TlsStream {
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            // The peer waits for our flight before it sends more.
            ready!(self.poll_write_outgoing(cx))?;
            let Self {
                tls,
                incoming,
                outgoing,
                plaintext,
                ..
            } = self;
            // A client may send data right behind its Finished.
            let step = process(tls, incoming, outgoing, None, &mut |bytes| {
                plaintext.extend_from_slice(bytes)
            })?;
            match step {
                Step::PeerClosed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Step::Traffic if !self.tls.is_handshaking() => {
                    // Session tickets may still be on their way out;
                    // later reads and writes flush them.
                    let _ = self.poll_write_outgoing(cx)?;
                    return Poll::Ready(Ok(()));
                }
                Step::NeedMore | Step::Traffic => {}
            }
            if !self.outgoing.is_empty() {
                continue;
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Reads what the socket has into `incoming`. Room is reserved only
    /// once the socket has something, and given back if it had nothing:
    /// an idle connection waits without a buffer.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming.is_empty() {
            ready!(self.tcp.poll_read_ready(cx))?;
        }
        self.incoming.reserve(READ_SIZE);
        let read = tokio_util::io::poll_read_buf(Pin::new(&mut self.tcp), cx, &mut self.incoming);
        if self.incoming.is_empty() && !matches!(read, Poll::Ready(Ok(n)) if n > 0) {
            self.incoming = BytesMut::new();
        }
        read
    }

    /// Writes `outgoing` to the socket; Ready once all of it is out (its
    /// allocation is then released).
    fn poll_write_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.outgoing.is_empty() {
            return Poll::Ready(Ok(()));
        }
        while !self.outgoing.is_empty() {
            let written = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.advance(written);
        }
        self.outgoing = BytesMut::new();
        Poll::Ready(Ok(()))
    }

    /// Moves decrypted bytes waiting in `plaintext` into `buf`.
    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) {
        if self.plaintext.is_empty() {
            return;
        }
        let n = self.plaintext.len().min(buf.remaining());
        buf.put_slice(&self.plaintext[..n]);
        self.plaintext.advance(n);
        if self.plaintext.is_empty() {
            self.plaintext = BytesMut::new();
        }
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
            // Owed handshake output (tickets, a key update) goes out as
            // soon as the socket takes it; a full socket wakes us later.
            if let Poll::Ready(Err(error)) = this.poll_write_outgoing(cx) {
                return Poll::Ready(Err(error));
            }
            this.take_plaintext(buf);
            // Bytes handed over (or the end) make this read ready: a
            // Pending now would lose them.
            if buf.filled().len() > before || this.read_closed {
                return Poll::Ready(Ok(()));
            }
            if !this.incoming.is_empty() {
                let Self {
                    tls,
                    incoming,
                    outgoing,
                    plaintext,
                    ..
                } = &mut *this;
                let step = process(tls, incoming, outgoing, None, &mut |bytes| {
                    let direct = bytes.len().min(buf.remaining());
                    buf.put_slice(&bytes[..direct]);
                    plaintext.extend_from_slice(&bytes[direct..]);
                })?;
                if step == Step::PeerClosed {
                    this.read_closed = true;
                }
                if buf.filled().len() > before || this.read_closed {
                    continue;
                }
            }
            if ready!(this.poll_fill(cx))? == 0 {
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
        ready!(this.poll_write_outgoing(cx))?;
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
            let Self {
                tls,
                incoming,
                plaintext,
                ..
            } = &mut *this;
            let step = process(tls, incoming, sealed, Some(&gathered[..]), &mut |bytes| {
                plaintext.extend_from_slice(bytes)
            })?;
            if step != Step::Traffic {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "TLS connection cannot send",
                )));
            }
            if !this.plaintext.is_empty() {
                // Data for the reader turned up: make sure it is polled.
                cx.waker().wake_by_ref();
            }
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
        ready!(this.poll_write_outgoing(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_notify_sent {
            ready!(this.poll_write_outgoing(cx))?;
            this.close_notify_sent = true;
            let Self {
                tls,
                incoming,
                outgoing,
                ..
            } = &mut *this;
            let status = tls.process_tls_records(&mut incoming[..]);
            if let Ok(ConnectionState::WriteTraffic(mut traffic)) = status.state {
                append_sized(outgoing, 64, |out| {
                    encrypted_size(traffic.queue_close_notify(out))
                })?;
            }
        }
        ready!(this.poll_write_outgoing(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
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
        server: TlsStream,
        client: tokio_rustls::client::TlsStream<TcpStream>,
        resumed: bool,
    }

    fn client_config(material: &TlsMaterial) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(material.chain[0].clone()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder()
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
        let resumed = server.tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
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
        let suite = pair.server.tls.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
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
