//! The TLS record layer of a TCP+TLS connection once its handshake is
//! over: framing, sealing and opening records, alerts and key updates.
//!
//! rustls runs the handshake (`tls_stream`) and then hands over the
//! traffic keys through `dangerous_into_kernel_connection`, the API meant
//! for kernel TLS. Records are sealed and opened here with rustls' own
//! AEADs (`Tls13AeadAlgorithm` / `Tls12AeadAlgorithm`), so no
//! cryptography is written by hand; what is ours is the framing of RFC
//! 8446 section 5 and the few post-handshake messages a server meets.
//!
//! Why: rustls' connection object keeps its whole record layer and
//! handshake bookkeeping (buffers' headers, the key schedule's HKDF
//! expanders, queues, flags) for the connection's life, several KB that
//! an idle chat connection never uses. What stays here per connection is
//! the two AEAD keys, two sequence numbers and rustls' small
//! [`KernelConnection`], which derives the next keys when either side
//! updates them (TLS 1.3).

use bytes::{Buf, BytesMut};
use rustls::crypto::cipher::{
    InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::{
    ConnectionTrafficSecrets, ContentType, HandshakeKind, ProtocolVersion, SupportedCipherSuite,
};

/// A record's header: type, legacy version, length.
const HEADER_LEN: usize = 5;

/// Plaintext bytes one record carries at most (RFC 8446 5.1).
const MAX_PLAINTEXT: usize = 16_384;

/// The handshake type of a TLS 1.3 KeyUpdate.
const KEY_UPDATE: u8 = 24;

/// KeyUpdates a peer may send in a row without application data between
/// them (each costs a key derivation): as BoringSSL and rustls allow.
const MAX_KEY_UPDATES_IN_A_ROW: u8 = 32;

/// Why the record layer gave up on a connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    /// rustls refused: a record that does not decrypt, a failed key
    /// derivation.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The peer broke the record protocol.
    #[error("TLS: {0}")]
    Protocol(&'static str),
    /// The peer sent a fatal alert (its description code).
    #[error("TLS: the peer sent alert {0}")]
    Alert(u8),
}

impl From<RecordError> for std::io::Error {
    fn from(error: RecordError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, error)
    }
}

/// What opening the received records came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opened {
    /// Every complete record is processed; more bytes are needed.
    NeedMore,
    /// The peer sent close_notify: nothing after it is read.
    PeerClosed,
}

/// One connection's record layer. See the module docs.
pub(crate) struct RecordLayer {
    /// rustls' key schedule, for key updates.
    kernel: KernelConnection<ServerConnectionData>,
    tx: Box<dyn MessageEncrypter>,
    tx_seq: u64,
    rx: Box<dyn MessageDecrypter>,
    rx_seq: u64,
    /// Records sealed under one key before it is replaced (TLS 1.3) or
    /// the connection ends (TLS 1.2): the suite's confidentiality limit.
    tx_limit: u64,
    /// The peer asked for our key update; it goes out before our next
    /// record (RFC 8446 4.6.3; several requests are answered by one).
    key_update_owed: bool,
    /// The peer's KeyUpdates since its last application data.
    key_updates_in_a_row: u8,
    /// How many times each side's key changed (tests and Debug).
    tx_updates: u32,
    rx_updates: u32,
    resumed: bool,
}

impl RecordLayer {
    /// Takes the keys of a connection whose handshake is complete and
    /// whose own output is all handed out (the server config must have
    /// `enable_secret_extraction`).
    pub(crate) fn take_over(tls: UnbufferedServerConnection) -> Result<Self, RecordError> {
        let resumed = tls.handshake_kind() == Some(HandshakeKind::Resumed);
        let (secrets, kernel) = tls.dangerous_into_kernel_connection()?;
        let suite = kernel.negotiated_cipher_suite();
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        Ok(Self {
            tx: encrypter(suite, tx)?,
            tx_seq,
            rx: decrypter(suite, rx)?,
            rx_seq,
            tx_limit: suite_confidentiality_limit(suite),
            key_update_owed: false,
            key_updates_in_a_row: 0,
            tx_updates: 0,
            rx_updates: 0,
            resumed,
            kernel,
        })
    }

    pub(crate) fn cipher_suite(&self) -> SupportedCipherSuite {
        self.kernel.negotiated_cipher_suite()
    }

    fn is_tls13(&self) -> bool {
        self.kernel.protocol_version() == ProtocolVersion::TLSv1_3
    }

    /// Seals `data` as application data records appended to `out`.
    pub(crate) fn seal(&mut self, data: &[u8], out: &mut BytesMut) -> Result<(), RecordError> {
        for chunk in data.chunks(MAX_PLAINTEXT) {
            self.seal_record(ContentType::ApplicationData, chunk, out)?;
        }
        Ok(())
    }

    /// Seals a close_notify alert.
    pub(crate) fn seal_close_notify(&mut self, out: &mut BytesMut) -> Result<(), RecordError> {
        // Level warning (1), description close_notify (0).
        self.seal_record(ContentType::Alert, &[1, 0], out)
    }

    fn seal_record(
        &mut self,
        typ: ContentType,
        payload: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), RecordError> {
        let request = self.key_update_owed || self.tx_seq + 1 >= self.tx_limit;
        if request && typ != ContentType::Handshake {
            if !self.is_tls13() {
                // TLS 1.2 has no key update: the connection ends (the
                // client reconnects), as rustls does.
                return Err(RecordError::Protocol("the key's record limit is reached"));
            }
            // Our KeyUpdate goes under the old key, the rest under the
            // new one; it asks nothing of the peer.
            self.seal_record(ContentType::Handshake, &[KEY_UPDATE, 0, 0, 1, 0], out)?;
            let (seq, secrets) = self.kernel.update_tx_secret()?;
            self.tx = encrypter(self.kernel.negotiated_cipher_suite(), secrets)?;
            self.tx_seq = seq;
            self.tx_updates += 1;
            self.key_update_owed = false;
        }
        let message = OutboundPlainMessage {
            typ,
            // The record header's legacy version in TLS 1.2 and 1.3 alike.
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(payload),
        };
        let sealed = self.tx.encrypt(message, self.tx_seq)?;
        self.tx_seq += 1;
        out.extend_from_slice(&sealed.encode());
        Ok(())
    }

    /// Opens every complete record at the front of `incoming` (consumed
    /// bytes are dropped from it), handing application data to `deliver`.
    /// Stops at close_notify. A record longer than the protocol allows is
    /// refused from its header, before its bytes are waited for.
    pub(crate) fn open(
        &mut self,
        incoming: &mut BytesMut,
        deliver: &mut dyn FnMut(&[u8]),
    ) -> Result<Opened, RecordError> {
        let tls13 = self.is_tls13();
        // RFC 8446 5.2 (TLS 1.3) and RFC 5246 6.2.3 (TLS 1.2).
        let max_record = MAX_PLAINTEXT + if tls13 { 256 } else { 2_048 };
        loop {
            let Some(header) = incoming.get(..HEADER_LEN) else {
                return Ok(Opened::NeedMore);
            };
            let typ = ContentType::from(header[0]);
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if len > max_record {
                return Err(RecordError::Protocol("record too long"));
            }
            // A TLS 1.3 record hides its type inside; TLS 1.2 ones after
            // the handshake carry one of three (no ChangeCipherSpec).
            let outer_ok = match typ {
                ContentType::ApplicationData => true,
                ContentType::Alert | ContentType::Handshake => !tls13,
                _ => false,
            };
            if !outer_ok {
                return Err(RecordError::Protocol("unexpected record type"));
            }
            if incoming.len() < HEADER_LEN + len {
                return Ok(Opened::NeedMore);
            }
            let version = ProtocolVersion::from(u16::from_be_bytes([header[1], header[2]]));
            let payload = &mut incoming[HEADER_LEN..HEADER_LEN + len];
            let opened = self.rx.decrypt(
                InboundOpaqueMessage::new(typ, version, payload),
                self.rx_seq,
            )?;
            self.rx_seq += 1;
            if opened.payload.len() > MAX_PLAINTEXT {
                return Err(RecordError::Protocol("record plaintext too long"));
            }
            let mut closed = false;
            match opened.typ {
                ContentType::ApplicationData => {
                    // Empty records do not count as data here.
                    if !opened.payload.is_empty() {
                        self.key_updates_in_a_row = 0;
                    }
                    deliver(opened.payload);
                }
                ContentType::Alert => match *opened.payload {
                    [_, 0] => closed = true,
                    [_, description] => return Err(RecordError::Alert(description)),
                    _ => return Err(RecordError::Protocol("malformed alert")),
                },
                ContentType::Handshake if tls13 => {
                    let requested = key_update(opened.payload)?;
                    if self.key_updates_in_a_row == MAX_KEY_UPDATES_IN_A_ROW {
                        return Err(RecordError::Protocol("too many key updates in a row"));
                    }
                    self.key_updates_in_a_row += 1;
                    let (seq, secrets) = self.kernel.update_rx_secret()?;
                    self.rx = decrypter(self.kernel.negotiated_cipher_suite(), secrets)?;
                    self.rx_seq = seq;
                    self.rx_updates += 1;
                    self.key_update_owed |= requested;
                }
                // TLS 1.2 renegotiation, or a type TLS forbids here.
                _ => {
                    return Err(RecordError::Protocol(
                        "unexpected message after the handshake",
                    ));
                }
            }
            incoming.advance(HEADER_LEN + len);
            if closed {
                return Ok(Opened::PeerClosed);
            }
        }
    }
}

/// The one handshake message a TLS 1.3 client may send after the
/// handshake is a KeyUpdate, alone in its record (it changes the key the
/// next record is under); answers whether it asks for ours.
fn key_update(record: &[u8]) -> Result<bool, RecordError> {
    match *record {
        [KEY_UPDATE, 0, 0, 1, 0] => Ok(false),
        [KEY_UPDATE, 0, 0, 1, 1] => Ok(true),
        _ => Err(RecordError::Protocol(
            "only a KeyUpdate, alone in its record, may follow the handshake",
        )),
    }
}

fn suite_confidentiality_limit(suite: SupportedCipherSuite) -> u64 {
    match suite {
        SupportedCipherSuite::Tls13(suite) => suite.common.confidentiality_limit,
        SupportedCipherSuite::Tls12(suite) => suite.common.confidentiality_limit,
    }
}

/// The key and IV of one direction.
fn key_and_iv(
    secrets: ConnectionTrafficSecrets,
) -> Result<(rustls::crypto::cipher::AeadKey, rustls::crypto::cipher::Iv), RecordError> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
        _ => Err(RecordError::Protocol("unsupported cipher")),
    }
}

fn encrypter(
    suite: SupportedCipherSuite,
    secrets: ConnectionTrafficSecrets,
) -> Result<Box<dyn MessageEncrypter>, RecordError> {
    let (key, iv) = key_and_iv(secrets)?;
    Ok(match suite {
        SupportedCipherSuite::Tls13(suite) => suite.aead_alg.encrypter(key, iv),
        SupportedCipherSuite::Tls12(suite) => {
            // The IV rustls extracts is the fixed part followed by the
            // explicit nonce's start (GCM), or all fixed (ChaCha20).
            let fixed = suite.aead_alg.key_block_shape().fixed_iv_len;
            let (fixed_iv, explicit) = iv.as_ref().split_at(fixed);
            suite.aead_alg.encrypter(key, fixed_iv, explicit)
        }
    })
}

fn decrypter(
    suite: SupportedCipherSuite,
    secrets: ConnectionTrafficSecrets,
) -> Result<Box<dyn MessageDecrypter>, RecordError> {
    let (key, iv) = key_and_iv(secrets)?;
    Ok(match suite {
        SupportedCipherSuite::Tls13(suite) => suite.aead_alg.decrypter(key, iv),
        SupportedCipherSuite::Tls12(suite) => {
            let fixed = suite.aead_alg.key_block_shape().fixed_iv_len;
            suite.aead_alg.decrypter(key, &iv.as_ref()[..fixed])
        }
    })
}

impl std::fmt::Debug for RecordLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordLayer")
            .field("suite", &self.cipher_suite().suite())
            .field("tx_seq", &self.tx_seq)
            .field("rx_seq", &self.rx_seq)
            .field("tx_updates", &self.tx_updates)
            .field("rx_updates", &self.rx_updates)
            .field("resumed", &self.resumed)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
impl RecordLayer {
    /// Lowers the records one key seals before it is replaced.
    pub(crate) fn set_tx_limit(&mut self, limit: u64) {
        self.tx_limit = limit;
    }

    pub(crate) fn resumed(&self) -> bool {
        self.resumed
    }

    /// How many times (ours, the peer's) the keys changed.
    pub(crate) fn key_updates(&self) -> (u32, u32) {
        (self.tx_updates, self.rx_updates)
    }
}
