// What the page knows about the user's conversations, kept in step with the
// server: the list with unread counts (HTTP), loaded history (FetchMessages
// pages, contiguous from the oldest loaded seq), live deliveries with gap
// fetches and delivery acks, read markers and receipts, outgoing messages
// sent one at a time per conversation in the order they were typed (a
// refused one is retried before anything typed after it goes) and resent
// with the same client_msg_id after a reconnect,
// and the sync that catches up after one. The open conversation is kept in
// the address (#conversation-id), so a reload reopens it. No DOM here:
// `onChange` tells the view what to redraw.

import { ContentType } from "./gen/pingme/v1/pingme_pb.js";
import { People } from "./people.js";

/** Messages per history page. */
const PAGE = 30;
/** Bounds on paging loops, so a misbehaving server cannot spin the page. */
const MAX_PAGES = 100;
const PRESENCE_REFRESH_MS = 30000;
/** Errors after which resending the same message cannot succeed. */
const RETRYABLE = new Set([0, 20005, 30001, 40001, 40002, 40003]);
/** Attempts of one message while connected before it shows as failed. */
const MAX_ATTEMPTS = 5;
/** Wait before retrying a message the server refused for now. */
const RETRY_DELAY_MS = 1000;
/**
 * How long a delivery ack (and the read marker of the open conversation)
 * waits to cover what arrives meanwhile: one cumulative ack per burst, not
 * one per message (the SDK's default too).
 */
export const ACK_DELAY_MS = 100;

const decoder = new TextDecoder();
const encoder = new TextEncoder();

function conversationKind(id) {
  return id.startsWith("g:") ? "group" : "dm";
}

function readableBody(message) {
  if (message.contentType === ContentType.TEXT) return decoder.decode(message.body);
  return `[${ContentType[message.contentType]?.toLowerCase() ?? "message"}]`;
}

function fromWire(message) {
  return {
    seq: Number(message.seq),
    sender: Number(message.senderId),
    clientMsgId: message.clientMsgId,
    text: readableBody(message),
    timeMs: Number(message.serverTimeMs),
  };
}

export class Chat {
  constructor({ account, me, onChange }) {
    this.account = account;
    this.me = me;
    this.onChange = onChange;
    this.session = null;
    this.conversations = new Map();
    this.people = new People({ account, me, onChange });
    this.current = null;
    this.presenceTimer = setInterval(() => this.refreshPresence(), PRESENCE_REFRESH_MS);
    document.addEventListener("visibilitychange", () => this.markRead(this.conversation(this.current)));
  }

  conversation(id) {
    return id ? this.conversations.get(id) : undefined;
  }

  upsert(id) {
    let conversation = this.conversations.get(id);
    if (!conversation) {
      conversation = {
        id,
        kind: conversationKind(id),
        name: null,
        lastSeq: 0,
        readSeq: 0,
        // The read position the server has (listed, synced or sent): own
        // messages raise readSeq (they are not unread) but not this.
        markedSeq: 0,
        // The delivered position last acked on this connection, and the
        // pending ack's timer (see `acknowledge`).
        ackedSeq: 0,
        ackTimer: null,
        activity: 0,
        loaded: false,
        first: 1,
        have: 0,
        messages: new Map(),
        // Typed and not yet stored, in the order typed (a Map keeps
        // insertion order).
        outgoing: new Map(),
        // True while `pump` sends this conversation's outgoing messages.
        pumping: false,
        peerRead: new Map(),
        catchingUp: null,
      };
      this.conversations.set(id, conversation);
      if (conversation.kind === "group") this.loadGroupName(conversation);
    }
    return conversation;
  }

  /** The other user of a 1:1 conversation. */
  peer(conversation) {
    const [, low, high] = conversation.id.split(":").map(Number);
    return low === this.me.user_id ? high : low;
  }

  title(conversation) {
    if (conversation.kind === "dm") return this.people.userName(this.peer(conversation));
    return conversation.name ?? `group ${conversation.id.slice(2)}`;
  }

  unread(conversation) {
    return Math.max(0, conversation.lastSeq - conversation.readSeq);
  }

  async loadGroupName(conversation) {
    try {
      const group = await this.account.request("GET", `/v1/groups/${conversation.id.slice(2)}`);
      conversation.name = group.name;
      this.onChange(conversation.id);
    } catch {
      // The title falls back to the group id.
    }
  }

  /** The conversation list with unread counts (GET /v1/conversations). */
  async loadList() {
    let after = "";
    for (let page = 0; page < MAX_PAGES; page++) {
      const query = new URLSearchParams({ limit: "200" });
      if (after) query.set("after", after);
      const answer = await this.account.request("GET", `/v1/conversations?${query}`);
      for (const listed of answer.conversations) {
        const conversation = this.upsert(listed.conversation_id);
        conversation.lastSeq = Math.max(conversation.lastSeq, listed.last_seq);
        conversation.readSeq = Math.max(conversation.readSeq, listed.read_seq);
        conversation.markedSeq = Math.max(conversation.markedSeq, listed.read_seq);
      }
      if (!answer.next_after) break;
      after = answer.next_after;
    }
    this.onChange(null);
  }

  /** Opens (creates locally) the 1:1 conversation with `username`. */
  async directWith(username) {
    const user = await this.account.request("GET", `/v1/users/${encodeURIComponent(username)}`);
    this.people.known(user.user_id, user.username);
    const [low, high] = [this.me.user_id, user.user_id].sort((a, b) => a - b);
    const id = `dm:${low}:${high}`;
    this.upsert(id);
    return id;
  }

  /** Creates a group with the members named in `usernames`. */
  async createGroup(name, usernames) {
    const members = [];
    for (const username of usernames) {
      const user = await this.account.request("GET", `/v1/users/${encodeURIComponent(username)}`);
      this.people.known(user.user_id, user.username);
      members.push(user.user_id);
    }
    const group = await this.account.request("POST", "/v1/groups", { name, members });
    this.upsert(group.conversation_id).name = group.name;
    return group.conversation_id;
  }

  attach(session) {
    this.session = session;
    this.people.session = session;
  }

  /** After every (re)connect: list, sync, catch up, resend, presence. */
  async onOnline() {
    try {
      await this.loadList();
      await this.sync();
      for (const conversation of this.conversations.values()) {
        // What the last connection acked may not have reached the server.
        conversation.ackedSeq = 0;
        if (conversation.id === this.current && !conversation.loaded) {
          await this.loadLatest(conversation);
        } else if (conversation.loaded && conversation.have < conversation.lastSeq) {
          await this.catchUp(conversation);
        }
        for (const outgoing of conversation.outgoing.values()) {
          if (outgoing.state === "waiting") outgoing.attempts = 0;
        }
        this.pump(conversation);
      }
      await this.refreshPresence();
    } catch (error) {
      console.warn("catching up after connect failed", error);
    }
  }

  /** Which conversations moved while this device was away (SyncRequest pages). */
  async sync() {
    let after = "";
    for (let page = 0; page < MAX_PAGES; page++) {
      const { value } = await this.session.request({
        case: "sync",
        value: { afterConversationId: after, limit: 500 },
      });
      for (const state of value.conversations) {
        const conversation = this.upsert(state.conversationId);
        conversation.lastSeq = Math.max(conversation.lastSeq, Number(state.latestSeq));
        conversation.readSeq = Math.max(conversation.readSeq, Number(state.readSeq));
        conversation.markedSeq = Math.max(conversation.markedSeq, Number(state.readSeq));
        this.onChange(conversation.id);
      }
      if (!value.hasMore) break;
      after = value.nextAfterConversationId;
    }
  }

  async fetchPage(conversation, afterSeq, untilSeq) {
    const { value } = await this.session.request({
      case: "fetch",
      value: {
        conversationId: conversation.id,
        afterSeq: BigInt(afterSeq),
        untilSeq: BigInt(untilSeq),
        limit: 200,
      },
    });
    for (const message of value.messages) this.remember(conversation, fromWire(message));
    return value;
  }

  remember(conversation, message) {
    conversation.messages.set(message.seq, message);
    conversation.lastSeq = Math.max(conversation.lastSeq, message.seq);
    if (message.sender === this.me.user_id) {
      conversation.outgoing.delete(message.clientMsgId);
      conversation.readSeq = Math.max(conversation.readSeq, message.seq);
    }
    while (conversation.messages.has(conversation.have + 1)) conversation.have++;
  }

  /** Fetches everything after the contiguous part (one at a time per conversation). */
  catchUp(conversation) {
    conversation.catchingUp = (conversation.catchingUp ?? Promise.resolve())
      .then(async () => {
        for (let page = 0; page < MAX_PAGES; page++) {
          const before = conversation.have;
          const answer = await this.fetchPage(conversation, conversation.have, 0);
          if (!answer.hasMore || conversation.have === before) break;
        }
        this.acknowledge(conversation);
      })
      .catch((error) => console.warn("catch-up failed", error));
    return conversation.catchingUp;
  }

  /** Shows what arrived now; acks it (and marks it read) within ACK_DELAY_MS. */
  acknowledge(conversation) {
    this.onChange(conversation.id);
    if (conversation.ackTimer) return;
    conversation.ackTimer = setTimeout(() => {
      conversation.ackTimer = null;
      if (conversation.have > conversation.ackedSeq) {
        const sent = this.session?.notify({
          case: "deliveryAck",
          value: { conversationId: conversation.id, seq: BigInt(conversation.have) },
        });
        if (sent) conversation.ackedSeq = conversation.have;
      }
      this.markRead(conversation);
    }, ACK_DELAY_MS);
  }

  /** Opens a conversation: its newest page first, then it follows live. */
  async open(id) {
    this.current = id;
    history.replaceState(null, "", `#${id}`);
    const conversation = this.upsert(id);
    this.onChange(id);
    if (!conversation.loaded) await this.loadLatest(conversation);
    else this.markRead(conversation);
    this.refreshPresence();
  }

  /** The newest page of a conversation; while offline, the next connect loads it. */
  async loadLatest(conversation) {
    if (!this.session?.online) return;
    const after = Math.max(0, conversation.lastSeq - PAGE);
    conversation.loaded = true;
    conversation.first = after + 1;
    conversation.have = after;
    await this.catchUp(conversation);
  }

  async loadOlder(id) {
    const conversation = this.upsert(id);
    if (conversation.first <= 1) return;
    const until = conversation.first - 1;
    const after = Math.max(0, until - PAGE);
    await this.fetchPage(conversation, after, until);
    conversation.first = after + 1;
    this.onChange(id);
  }

  /** Sends the current user's read position, if the conversation is in view. */
  markRead(conversation) {
    if (!conversation || conversation.id !== this.current || document.visibilityState !== "visible") {
      return;
    }
    if (conversation.have > conversation.readSeq) {
      conversation.readSeq = conversation.have;
      this.onChange(conversation.id);
    }
    // Against what the server has, not readSeq: a message of one's own
    // stored meanwhile raised readSeq without telling the server anything.
    if (conversation.have > conversation.markedSeq) {
      const sent = this.session?.notify({
        case: "readMarker",
        value: { conversationId: conversation.id, seq: BigInt(conversation.have) },
      });
      if (sent) conversation.markedSeq = conversation.have;
    }
  }

  send(id, text) {
    const conversation = this.upsert(id);
    const outgoing = { clientMsgId: crypto.randomUUID(), text, state: "waiting", error: "" };
    conversation.outgoing.set(outgoing.clientMsgId, outgoing);
    conversation.activity = Date.now();
    this.people.stopTyping();
    this.onChange(id);
    this.pump(conversation);
  }

  /**
   * Sends a conversation's waiting messages one at a time, in the order
   * they were typed, so each takes its seq in that order: one the server
   * refuses for now (rate limit, overload) is retried after a pause before
   * anything typed after it goes; one that fails for good is shown as
   * failed and skipped. A disconnect leaves the rest waiting; the next
   * connect pumps again.
   */
  async pump(conversation) {
    if (conversation.pumping) return;
    conversation.pumping = true;
    try {
      while (this.session?.online) {
        const next = [...conversation.outgoing.values()].find((outgoing) => outgoing.state === "waiting");
        if (!next) break;
        await this.transmit(conversation, next);
        if (next.state === "waiting" && this.session.online) {
          await new Promise((done) => setTimeout(done, RETRY_DELAY_MS));
        }
      }
    } finally {
      conversation.pumping = false;
    }
  }

  /** One attempt of one message (`pump` decides which and when). */
  async transmit(conversation, outgoing) {
    outgoing.state = "sending";
    outgoing.attempts = (outgoing.attempts ?? 0) + 1;
    try {
      const { value: ack } = await this.session.request({
        case: "send",
        value: {
          clientMsgId: outgoing.clientMsgId,
          conversationId: conversation.id,
          contentType: ContentType.TEXT,
          body: encoder.encode(outgoing.text),
        },
      });
      this.remember(conversation, {
        seq: Number(ack.seq),
        sender: this.me.user_id,
        clientMsgId: outgoing.clientMsgId,
        text: outgoing.text,
        timeMs: Number(ack.serverTimeMs),
      });
      if (conversation.have < Number(ack.seq)) await this.catchUp(conversation);
      else this.acknowledge(conversation);
    } catch (error) {
      const retry = RETRYABLE.has(error.code ?? 0) && outgoing.attempts < MAX_ATTEMPTS;
      outgoing.state = retry ? "waiting" : "failed";
      outgoing.error = error.message;
    }
    this.onChange(conversation.id);
  }

  /** Who read my message `seq` (other members' receipts). */
  readers(conversation, seq) {
    return [...conversation.peerRead].filter(([, read]) => read >= seq).map(([user]) => user);
  }

  /** Presence of the other users of 1:1 conversations. */
  refreshPresence() {
    const peers = [...this.conversations.values()]
      .filter((conversation) => conversation.kind === "dm")
      .map((conversation) => this.peer(conversation));
    return this.people.refreshPresence(peers);
  }

  /** Frames the server pushes on its own. */
  onEvent(kind, value) {
    switch (kind) {
      case "deliver": {
        const message = fromWire(value.message);
        const conversation = this.upsert(value.message.conversationId);
        conversation.activity = Date.now();
        this.people.stoppedTyping(conversation.id, message.sender);
        if (conversation.loaded) {
          this.remember(conversation, message);
          if (conversation.have < message.seq) this.catchUp(conversation);
          else this.acknowledge(conversation);
        } else {
          conversation.lastSeq = Math.max(conversation.lastSeq, message.seq);
          this.onChange(conversation.id);
        }
        break;
      }
      case "readReceipt": {
        const conversation = this.upsert(value.conversationId);
        const user = Number(value.userId);
        conversation.peerRead.set(user, Math.max(conversation.peerRead.get(user) ?? 0, Number(value.seq)));
        this.onChange(conversation.id);
        break;
      }
      case "typing":
        this.people.typingEvent(value);
        break;
      case "error":
        console.warn(`server error ${value.code}: ${value.message}`);
        break;
      default:
        break;
    }
  }
}
