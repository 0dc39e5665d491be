// The chat page's delivery acks, without a browser or a server: a burst of
// deliveries to the open conversation is acknowledged with one cumulative
// delivery ack and one read marker within ACK_DELAY_MS, not one of each per
// message. Node's mock timers make the wait exact, so nothing here depends
// on how fast the machine is.

import assert from "node:assert/strict";
import { beforeEach, mock, test } from "node:test";

// What chat.js touches of the browser.
globalThis.document = { addEventListener() {}, visibilityState: "visible" };
globalThis.history = { replaceState() {} };

const { ACK_DELAY_MS, Chat } = await import("../src/chat.js");

const ME = { user_id: 2, username: "bob" };
const CONVERSATION = "dm:1:2";

/** A session that records what the page sends. */
function recordingSession() {
  return {
    online: true,
    sent: [],
    notify(body) {
      this.sent.push(body);
      return true;
    },
  };
}

function deliver(chat, seq) {
  chat.onEvent("deliver", {
    message: {
      conversationId: CONVERSATION,
      seq: BigInt(seq),
      senderId: 1n,
      clientMsgId: `c-${seq}`,
      contentType: 1,
      body: new TextEncoder().encode(`message ${seq}`),
      serverTimeMs: 0n,
    },
  });
}

function openChat() {
  const chat = new Chat({ account: null, me: ME, onChange() {} });
  const session = recordingSession();
  chat.attach(session);
  // The conversation is open and its history loaded up to seq 0.
  chat.current = CONVERSATION;
  const conversation = chat.upsert(CONVERSATION);
  conversation.loaded = true;
  return { chat, session, conversation };
}

beforeEach(() => {
  mock.timers.reset();
  mock.timers.enable({ apis: ["setTimeout", "setInterval"] });
});

test("a burst of deliveries is acknowledged once, cumulatively", () => {
  const { session, chat, conversation } = openChat();
  for (let seq = 1; seq <= 20; seq++) deliver(chat, seq);
  assert.equal(conversation.have, 20, "every message is shown at once");
  assert.deepEqual(session.sent, [], "nothing acked before the delay");

  mock.timers.tick(ACK_DELAY_MS);
  assert.deepEqual(
    session.sent.map((body) => [body.case, body.value.conversationId, Number(body.value.seq)]),
    [
      ["deliveryAck", CONVERSATION, 20],
      ["readMarker", CONVERSATION, 20],
    ],
  );
});

test("what arrives after an ack is acked again; nothing is acked twice", () => {
  const { session, chat } = openChat();
  deliver(chat, 1);
  mock.timers.tick(ACK_DELAY_MS);
  deliver(chat, 2);
  deliver(chat, 3);
  mock.timers.tick(ACK_DELAY_MS);
  mock.timers.tick(10 * ACK_DELAY_MS);
  const acks = session.sent
    .filter((body) => body.case === "deliveryAck")
    .map((body) => Number(body.value.seq));
  assert.deepEqual(acks, [1, 3]);
});

test("an ack the session could not send goes with the next one", () => {
  const { session, chat } = openChat();
  session.online = false;
  session.notify = function (body) {
    if (!this.online) return false;
    this.sent.push(body);
    return true;
  };
  deliver(chat, 1);
  mock.timers.tick(ACK_DELAY_MS);
  assert.deepEqual(session.sent, []);
  session.online = true;
  deliver(chat, 2);
  mock.timers.tick(ACK_DELAY_MS);
  const acks = session.sent
    .filter((body) => body.case === "deliveryAck")
    .map((body) => Number(body.value.seq));
  assert.deepEqual(acks, [2]);
});

test("the read marker goes out even when one's own message was stored first", () => {
  const { session, chat, conversation } = openChat();
  deliver(chat, 1);
  // Before the delay runs out the user's own message is stored as seq 2:
  // it is not unread, but the server has not been told anything is read.
  chat.remember(conversation, { seq: 2, sender: ME.user_id, clientMsgId: "mine", text: "hi", timeMs: 0 });
  mock.timers.tick(ACK_DELAY_MS);
  const markers = session.sent
    .filter((body) => body.case === "readMarker")
    .map((body) => Number(body.value.seq));
  assert.deepEqual(markers, [2]);
});
