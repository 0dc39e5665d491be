// The page's connection to the gateway over WebSocket (/v1/ws): the
// Hello/Authenticate handshake, requests matched to answers by request id,
// heartbeats, and reconnecting with jittered backoff (at least the server's
// retry hint) after a drop, a go-away or a dead network. Events the server
// pushes (deliveries, receipts, typing, go-away) go to `onEvent`; every
// successful handshake calls `onOnline`, where the caller syncs.

import { ErrorCode, GoAwayReason } from "./gen/pingme/v1/pingme_pb.js";
import { decodeFrames, encodeFrame } from "./wire.js";

const PROTOCOL_VERSION = 1;
const HELLO_REQUEST = 1;
const AUTH_REQUEST = 2;
/** Most requests waiting for an answer; more are refused locally. */
const MAX_IN_FLIGHT = 256;
const REQUEST_TIMEOUT_MS = 15000;
const HANDSHAKE_TIMEOUT_MS = 10000;
const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 30000;

/** A request the server refused: `code` is an ErrorCode value. */
export class RequestError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

export class Session {
  /**
   * `token({force})`: resolves to an access token. `onStatus(state, detail)`:
   * "connecting" | "online" | "offline" | "stopped".
   */
  constructor({ url, token, onEvent, onOnline, onStatus }) {
    Object.assign(this, { url, token, onEvent, onOnline, onStatus });
    this.socket = null;
    this.online = false;
    this.stopped = false;
    this.nextRequest = AUTH_REQUEST + 1;
    this.pending = new Map();
    this.attempt = 0;
    this.retryAfterMs = 0;
    this.forceRefresh = false;
    this.timers = {};
    this.lastFrameAt = 0;
    this.wake = () => this.reconnectNow();
    window.addEventListener("online", this.wake);
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    window.removeEventListener("online", this.wake);
    this.drop("stopped");
    this.status("stopped");
  }

  status(state, detail = "") {
    this.onStatus?.(state, detail);
  }

  connect() {
    clearTimeout(this.timers.retry);
    if (this.stopped || this.socket) return;
    this.status("connecting");
    let socket;
    try {
      socket = new WebSocket(this.url);
    } catch (error) {
      // A refused address (or a Content-Security-Policy) throws at once.
      this.status("offline", error.message);
      this.scheduleReconnect(this.backoff());
      return;
    }
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    this.timers.handshake = setTimeout(() => this.drop("handshake timed out"), HANDSHAKE_TIMEOUT_MS);
    socket.onopen = () => this.open(socket);
    socket.onmessage = (message) => {
      if (socket !== this.socket) return;
      this.lastFrameAt = Date.now();
      let frames;
      try {
        frames = decodeFrames(message.data);
      } catch (error) {
        this.drop(`undecodable frame: ${error.message}`);
        return;
      }
      for (const frame of frames) this.handle(frame);
    };
    socket.onclose = () => {
      if (socket === this.socket) this.drop("connection closed");
    };
  }

  /**
   * Hello and Authenticate leave together (the protocol allows it), so a
   * (re)connect waits one round trip, not two. The token is asked for
   * once the socket is open, as before: an unreachable server does not
   * make the page refresh tokens.
   */
  async open(socket) {
    let token;
    try {
      token = await this.token({ force: this.forceRefresh });
      this.forceRefresh = false;
    } catch (error) {
      if (socket === this.socket) this.drop(`no token: ${error.message}`, { signedOut: true });
      return;
    }
    // The connection may have been replaced while the token refreshed.
    if (socket !== this.socket) return;
    this.write(HELLO_REQUEST, {
      case: "hello",
      value: { maxVersion: PROTOCOL_VERSION, minVersion: PROTOCOL_VERSION, clientName: "pingme-web/0.1" },
    });
    this.write(AUTH_REQUEST, { case: "authenticate", value: { token } });
  }

  write(requestId, body) {
    if (this.socket?.readyState !== WebSocket.OPEN) return false;
    this.socket.send(encodeFrame(requestId, body));
    return true;
  }

  handle(frame) {
    const { case: kind, value } = frame.body;
    const requestId = Number(frame.requestId);
    if (!this.online) {
      if (kind === "helloAck") {
        // Its heartbeat interval is used once the session is open; a
        // version the page does not speak comes as a fatal error instead.
        this.helloAck = value;
        return;
      }
      if (kind === "authOk") {
        clearTimeout(this.timers.handshake);
        this.online = true;
        this.attempt = 0;
        this.me = value;
        this.startHeartbeat();
        this.status("online");
        this.onOnline?.(value);
        return;
      }
    }
    if (kind === "error" && value.fatal) {
      this.closedBecause(value);
      return;
    }
    if (kind === "goAway") {
      this.goneAway(value);
      return;
    }
    const waiting = requestId !== 0 ? this.pending.get(requestId) : undefined;
    if (waiting) {
      this.pending.delete(requestId);
      clearTimeout(waiting.timer);
      if (kind === "error") waiting.reject(new RequestError(value.code, value.message));
      else waiting.resolve(frame.body);
      return;
    }
    if (kind !== "pong") this.onEvent?.(kind, value);
  }

  closedBecause(error) {
    switch (error.code) {
      case ErrorCode.TOKEN_EXPIRED:
        this.forceRefresh = true;
        this.drop("token expired", { now: true });
        break;
      case ErrorCode.TOKEN_INVALID:
      case ErrorCode.TOKEN_REVOKED:
        this.drop(error.message, { signedOut: true });
        break;
      default:
        this.drop(`${error.message} (${error.code})`);
    }
  }

  goneAway(goAway) {
    switch (goAway.reason) {
      case GoAwayReason.REPLACED:
        this.drop("this account was opened in another tab", { final: true });
        break;
      case GoAwayReason.LOGGED_OUT:
        this.drop("logged out", { signedOut: true });
        break;
      default:
        this.retryAfterMs = goAway.retryAfterMs;
        this.drop(goAway.message || "server asked to reconnect");
    }
  }

  /**
   * Ends the current connection: waiting requests fail, and unless told
   * otherwise a reconnect is scheduled.
   */
  drop(reason, { now = false, final = false, signedOut = false } = {}) {
    const socket = this.socket;
    this.socket = null;
    this.online = false;
    clearTimeout(this.timers.handshake);
    clearInterval(this.timers.heartbeat);
    if (socket) {
      socket.onopen = socket.onmessage = socket.onclose = null;
      socket.close();
    }
    for (const waiting of this.pending.values()) {
      clearTimeout(waiting.timer);
      waiting.reject(new RequestError(0, `disconnected: ${reason}`));
    }
    this.pending.clear();
    if (this.stopped) return;
    if (final || signedOut) {
      this.stopped = true;
      this.status("stopped", signedOut ? "signed-out" : reason);
      return;
    }
    this.status("offline", reason);
    this.scheduleReconnect(now ? 0 : this.backoff());
  }

  /** Full jitter over an exponential window, never below the server's hint. */
  backoff() {
    const window = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 16);
    const delay = Math.max(this.retryAfterMs, Math.random() * window);
    this.retryAfterMs = 0;
    return delay;
  }

  scheduleReconnect(delayMs) {
    clearTimeout(this.timers.retry);
    this.timers.retry = setTimeout(() => this.connect(), delayMs);
  }

  /** The network came back (or the user asked): skip the remaining wait. */
  reconnectNow() {
    if (!this.stopped && !this.socket) this.connect();
  }

  /**
   * Pings at the server's interval. A ping with nothing at all heard back by
   * the next tick means a dead link. (Judged per ping, not by wall time, so
   * a background tab whose timers the browser slows is not taken for dead.)
   */
  startHeartbeat() {
    const interval = this.helloAck?.heartbeatIntervalMs || 30000;
    let pingSentAt = 0;
    clearInterval(this.timers.heartbeat);
    this.timers.heartbeat = setInterval(() => {
      if (pingSentAt && this.lastFrameAt < pingSentAt) {
        this.drop("no answer from the server");
        return;
      }
      pingSentAt = Date.now();
      this.write(0, { case: "ping", value: { clientTimeMs: BigInt(pingSentAt) } });
    }, interval);
  }

  /** A request answered by one frame; rejects with RequestError. */
  request(body) {
    if (!this.online) return Promise.reject(new RequestError(0, "not connected"));
    if (this.pending.size >= MAX_IN_FLIGHT) {
      return Promise.reject(new RequestError(0, "too many requests in flight"));
    }
    const requestId = this.nextRequest++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(requestId);
        reject(new RequestError(0, "request timed out"));
      }, REQUEST_TIMEOUT_MS);
      this.pending.set(requestId, { resolve, reject, timer });
      this.write(requestId, body);
    });
  }

  /** A frame the server answers only on failure (acks, markers, typing). */
  notify(body) {
    return this.online && this.write(0, body);
  }
}
