// The page's framing of the wire protocol (protocol/proto/pingme/v1): a
// 4-byte big-endian length, then one protobuf ClientFrame or ServerFrame,
// one frame per binary WebSocket message. Encoding and decoding go through
// the generated schemas (src/gen, protoc-gen-es); nothing here knows the
// protobuf wire format.

import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { ClientFrameSchema, ServerFrameSchema } from "./gen/pingme/v1/pingme_pb.js";

const LENGTH_PREFIX = 4;
/** Largest server frame the page accepts (the server's downstream bound). */
export const MAX_SERVER_FRAME = 4 * 1024 * 1024;

/** One ClientFrame, length prefix included. `body` is `{ case, value }`. */
export function encodeFrame(requestId, body) {
  const frame = create(ClientFrameSchema, { requestId: BigInt(requestId), body });
  const payload = toBinary(ClientFrameSchema, frame);
  const bytes = new Uint8Array(LENGTH_PREFIX + payload.length);
  new DataView(bytes.buffer).setUint32(0, payload.length);
  bytes.set(payload, LENGTH_PREFIX);
  return bytes;
}

/**
 * The ServerFrames in one WebSocket message. The server sends one per
 * message; a message holding several back to back decodes as well. Throws
 * on a length that overruns the message or exceeds MAX_SERVER_FRAME.
 */
export function decodeFrames(buffer) {
  const view = new DataView(buffer);
  const frames = [];
  let at = 0;
  while (at < buffer.byteLength) {
    if (buffer.byteLength - at < LENGTH_PREFIX) throw new Error("truncated length prefix");
    const len = view.getUint32(at);
    if (len > MAX_SERVER_FRAME) throw new Error(`frame of ${len} bytes is too large`);
    at += LENGTH_PREFIX;
    if (buffer.byteLength - at < len) throw new Error("truncated frame");
    frames.push(fromBinary(ServerFrameSchema, new Uint8Array(buffer, at, len)));
    at += len;
  }
  return frames;
}
