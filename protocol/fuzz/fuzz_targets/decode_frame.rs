//! Fuzzes the gateway's inbound path: arbitrary bytes go through
//! `split_frame` and `decode_message::<ClientFrame>` in a loop, exactly as a
//! connection's read loop would, with the first input byte choosing how the
//! rest is cut into reads. Any panic, hang or oversized allocation is a bug.
#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use pingme_protocol::{ClientFrame, DEFAULT_MAX_FRAME_SIZE, decode_message, split_frame};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, input)) = data.split_first() else {
        return;
    };
    // Reads of 1..=256 bytes, so frames straddle read boundaries.
    let read_size = usize::from(cut) + 1;
    let mut buf = BytesMut::new();
    for read in input.chunks(read_size) {
        buf.put_slice(read);
        loop {
            match split_frame(&mut buf, DEFAULT_MAX_FRAME_SIZE) {
                Ok(Some(payload)) => {
                    let len = payload.len();
                    assert!(len <= DEFAULT_MAX_FRAME_SIZE);
                    if let Ok(frame) = decode_message::<ClientFrame>(payload) {
                        // Whatever decoded must re-encode within bounds.
                        let _ = pingme_protocol::encode_frame(&frame);
                    }
                }
                Ok(None) => break,
                // A connection is closed on a framing error: stop here too.
                Err(_) => return,
            }
        }
    }
});
