//! `tokio-util` codec over the framing in [`crate::frame`], for transports
//! that are byte streams (TCP, TLS, a QUIC stream).

use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{
    DEFAULT_MAX_FRAME_SIZE, FrameError, decode_message, encode_frame_into, split_frame,
};
use crate::{ClientFrame, MAX_DOWNSTREAM_FRAME_SIZE, ServerFrame};

/// A frame that is already encoded (prefix included), typically one deliver
/// frame shared by many connections. Encoding it only copies it into the
/// write buffer; transports that can write `Bytes` directly skip even that.
#[derive(Debug, Clone)]
pub struct EncodedFrame(pub Bytes);

/// Decodes frames of type `In` and encodes any protobuf message as a frame.
#[derive(Debug)]
pub struct FrameCodec<In> {
    max_frame_size: usize,
    _in: PhantomData<fn() -> In>,
}

/// What a server uses: decodes client frames (limit 64 KiB by default).
pub type ServerCodec = FrameCodec<ClientFrame>;
/// What a client uses: decodes server frames (up to
/// [`MAX_DOWNSTREAM_FRAME_SIZE`]).
pub type ClientCodec = FrameCodec<ServerFrame>;

impl<In> FrameCodec<In> {
    /// A codec refusing incoming frames larger than `max_frame_size`.
    pub fn new(max_frame_size: usize) -> Self {
        Self {
            max_frame_size,
            _in: PhantomData,
        }
    }

    /// The incoming frame limit.
    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }
}

impl Default for ServerCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_SIZE)
    }
}

impl Default for ClientCodec {
    fn default() -> Self {
        Self::new(MAX_DOWNSTREAM_FRAME_SIZE)
    }
}

impl<In: Message + Default> Decoder for FrameCodec<In> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match split_frame(src, self.max_frame_size)? {
            Some(payload) => decode_message(payload).map(Some),
            None => Ok(None),
        }
    }
}

impl<In, Out: Message> Encoder<Out> for FrameCodec<In> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_frame_into(&item, dst);
        Ok(())
    }
}

impl<In> Encoder<EncodedFrame> for FrameCodec<In> {
    type Error = FrameError;

    fn encode(&mut self, item: EncodedFrame, dst: &mut BytesMut) -> Result<(), FrameError> {
        dst.extend_from_slice(&item.0);
        Ok(())
    }
}

/// Splits incoming frames but leaves each payload encoded, for readers that
/// look into frames without decoding all of them (the load generator reads
/// a delivery's few checked fields in place). Encodes like [`FrameCodec`].
///
/// It also sizes the reads (`tokio_util`'s `FramedRead` reads into whatever
/// room the buffer has): an idle connection keeps a small buffer, and one
/// taking a burst (a sync, a busy group) gets larger reads instead of a
/// system call per few frames. The room asked for doubles while reads fill
/// the buffer to its end and halves when one does not, between
/// [`RawFrameCodec::READ_ROOM_MIN`] and [`RawFrameCodec::READ_ROOM_MAX`];
/// an emptied buffer much larger than that is let go.
#[derive(Debug)]
pub struct RawFrameCodec {
    max_frame_size: usize,
    /// Room to have before the next read.
    read_room: usize,
    /// The last read took all the room the buffer had.
    read_filled: bool,
}

impl RawFrameCodec {
    /// The smallest read room: what an idle connection's buffer holds.
    pub const READ_ROOM_MIN: usize = 512;
    /// The largest read room, reached after a few full reads in a row.
    pub const READ_ROOM_MAX: usize = 64 * 1024;

    /// A codec refusing incoming frames larger than `max_frame_size`.
    pub fn new(max_frame_size: usize) -> Self {
        Self {
            max_frame_size,
            read_room: Self::READ_ROOM_MIN,
            read_filled: false,
        }
    }

    /// Called when `src` holds no whole frame, i.e. before the next read.
    fn make_room(&mut self, src: &mut BytesMut) {
        self.read_room = if std::mem::take(&mut self.read_filled) {
            (self.read_room * 2).min(Self::READ_ROOM_MAX)
        } else {
            (self.read_room / 2).max(Self::READ_ROOM_MIN)
        };
        if src.is_empty() && src.capacity() > 2 * self.read_room {
            *src = BytesMut::new();
        }
        src.reserve(self.read_room);
    }
}

impl Decoder for RawFrameCodec {
    type Item = Bytes;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        // Data up to the end of the buffer: the last read took all the
        // room it had, and the socket probably holds more. (Splitting off
        // frames keeps this true until the buffer is empty or a partial
        // frame makes room for itself, so the first decode after a read
        // sees it.)
        self.read_filled |= !src.is_empty() && src.len() == src.capacity();
        let frame = split_frame(src, self.max_frame_size)?;
        if frame.is_none() {
            self.make_room(src);
        }
        Ok(frame)
    }
}

impl<Out: Message> Encoder<Out> for RawFrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_frame_into(&item, dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode_frame;
    use crate::v1::{Ping, client_frame};

    #[test]
    fn the_raw_codec_splits_frames_and_leaves_payloads_encoded() {
        let frame = ClientFrame {
            request_id: 9,
            body: Some(client_frame::Body::Ping(Ping { client_time_ms: 5 })),
        };
        let mut wire = BytesMut::new();
        let mut codec = RawFrameCodec::new(1024);
        codec.encode(frame.clone(), &mut wire).unwrap();
        codec.encode(frame.clone(), &mut wire).unwrap();
        wire.extend_from_slice(&encode_frame(&frame)[..3]);
        for _ in 0..2 {
            let payload = codec.decode(&mut wire).unwrap().expect("a whole frame");
            assert_eq!(decode_message::<ClientFrame>(payload).unwrap(), frame);
        }
        assert_eq!(
            codec.decode(&mut wire).unwrap(),
            None,
            "a partial frame waits"
        );
        let mut small = RawFrameCodec::new(2);
        let mut big = BytesMut::new();
        small.encode(frame, &mut big).unwrap();
        assert!(small.decode(&mut big).is_err(), "over the limit");
    }

    /// Reads as `FramedRead` does them: into the buffer's room, then
    /// decode until no whole frame is left.
    fn read_into(codec: &mut RawFrameCodec, buf: &mut BytesMut, wire: &mut BytesMut) -> usize {
        let room = buf.capacity() - buf.len();
        let n = room.min(wire.len());
        buf.extend_from_slice(&wire.split_to(n));
        std::iter::from_fn(|| codec.decode(buf).unwrap()).count()
    }

    #[test]
    fn the_raw_codec_reads_more_in_a_burst_and_lets_the_room_go_after() {
        let frame = ClientFrame {
            request_id: 9,
            body: Some(client_frame::Body::Ping(Ping { client_time_ms: 5 })),
        };
        let one = encode_frame(&frame);
        let mut codec = RawFrameCodec::new(1024);
        let mut buf = BytesMut::with_capacity(RawFrameCodec::READ_ROOM_MIN);
        // A burst of 256 KiB: each read fills the room, which doubles.
        let mut wire = BytesMut::new();
        while wire.len() < 256 * 1024 {
            wire.extend_from_slice(&one);
        }
        let total = wire.len() / one.len();
        let (mut frames, mut reads, mut largest) = (0, 0, 0);
        while !wire.is_empty() {
            largest = largest.max(buf.capacity() - buf.len());
            frames += read_into(&mut codec, &mut buf, &mut wire);
            reads += 1;
        }
        assert_eq!(frames, total, "every frame, whole");
        assert!(largest >= RawFrameCodec::READ_ROOM_MAX, "{largest}");
        assert!(reads <= 12, "{reads} reads for 256 KiB (512 B reads: 512)");
        // Then single frames: the room halves back down and the large
        // buffer is let go.
        for _ in 0..12 {
            let mut wire = BytesMut::from(&one[..]);
            assert_eq!(read_into(&mut codec, &mut buf, &mut wire), 1);
        }
        assert!(
            buf.capacity() < 4 * RawFrameCodec::READ_ROOM_MIN,
            "{}",
            buf.capacity()
        );
    }

    #[test]
    fn codec_round_trips_a_stream_of_frames() {
        let mut codec = ServerCodec::default();
        let mut wire = BytesMut::new();
        for id in 1..=3u64 {
            let frame = ClientFrame {
                request_id: id,
                body: Some(client_frame::Body::Ping(Ping { client_time_ms: 5 })),
            };
            codec.encode(frame, &mut wire).unwrap();
        }
        codec
            .encode(
                EncodedFrame(encode_frame(&ClientFrame {
                    request_id: 4,
                    body: None,
                })),
                &mut wire,
            )
            .unwrap();
        let ids: Vec<u64> = std::iter::from_fn(|| codec.decode(&mut wire).unwrap())
            .map(|f| f.request_id)
            .collect();
        assert_eq!(ids, vec![1, 2, 3, 4]);
    }

    #[test]
    fn codec_enforces_its_limit() {
        let mut codec = ServerCodec::new(8);
        let mut wire = BytesMut::new();
        codec
            .encode(
                ClientFrame {
                    request_id: u64::MAX,
                    body: Some(client_frame::Body::Ping(Ping {
                        client_time_ms: i64::MAX,
                    })),
                },
                &mut wire,
            )
            .unwrap();
        assert!(matches!(
            codec.decode(&mut wire),
            Err(FrameError::TooLarge { max: 8, .. })
        ));
    }
}
