// The chat screen's DOM: the conversation list (titles, presence, unread
// counts), the open conversation (history with receipts, typing line,
// presence) and the connection status. Text from the network is only ever
// set through textContent.

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function clock(timeMs) {
  return timeMs ? new Date(timeMs).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "";
}

function lastSeen(presence) {
  if (!presence) return "";
  if (presence.online) return "online";
  if (!presence.lastSeenMs) return "offline";
  return `last seen ${new Date(presence.lastSeenMs).toLocaleString()}`;
}

export class ChatView {
  constructor(chat) {
    this.chat = chat;
    this.pendingRedraw = new Set();
    this.scheduled = false;
  }

  /** Redraws once for any number of changes in the same turn. (Not
   * requestAnimationFrame: a tab in the background would never redraw.) */
  changed(id) {
    this.pendingRedraw.add(id);
    if (this.scheduled) return;
    this.scheduled = true;
    setTimeout(() => {
      this.scheduled = false;
      this.pendingRedraw.clear();
      this.drawList();
      this.drawConversation();
    }, 0);
  }

  status(state, detail) {
    const node = $("status");
    node.dataset.state = state;
    node.textContent = detail && state !== "online" ? `${state}: ${detail}` : state;
  }

  drawList() {
    const list = $("conversations");
    const conversations = [...this.chat.conversations.values()].sort(
      (a, b) => b.activity - a.activity || a.id.localeCompare(b.id),
    );
    list.replaceChildren(
      ...conversations.map((conversation) => {
        const button = element("button", "conversation");
        button.type = "button";
        button.dataset.id = conversation.id;
        if (conversation.id === this.chat.current) button.setAttribute("aria-current", "true");
        if (conversation.kind === "dm") {
          const presence = this.chat.people.presenceOf(this.chat.peer(conversation));
          button.append(element("span", `presence${presence?.online ? " online" : ""}`));
        } else {
          button.append(element("span", "presence group", "#"));
        }
        button.append(element("span", "title", this.chat.title(conversation)));
        const unread = this.chat.unread(conversation);
        if (unread > 0 && conversation.id !== this.chat.current) {
          button.append(element("span", "unread", String(unread)));
        }
        const item = element("li");
        item.append(button);
        return item;
      }),
    );
  }

  drawConversation() {
    const conversation = this.chat.conversation(this.chat.current);
    $("chat").hidden = !conversation;
    if (!conversation) return;
    const people = this.chat.people;
    $("chat-title").textContent = this.chat.title(conversation);
    $("chat-presence").textContent =
      conversation.kind === "dm" ? lastSeen(people.presenceOf(this.chat.peer(conversation))) : "group";
    $("older").hidden = !conversation.loaded || conversation.first <= 1;
    const typers = people.typers(conversation.id);
    const verb = typers.length > 1 ? "are" : "is";
    $("typing").textContent = typers.length ? `${typers.join(", ")} ${verb} typing…` : "";

    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const oldHeight = box.scrollHeight;
    const firstSeqBefore = Number(box.firstElementChild?.dataset.seq ?? 0);
    const stored = [...conversation.messages.values()].sort((a, b) => a.seq - b.seq);
    const rows = stored.map((message) => this.messageRow(conversation, message));
    for (const outgoing of conversation.outgoing.values()) rows.push(this.outgoingRow(outgoing));
    box.replaceChildren(...rows);
    if (firstSeqBefore && stored.length && stored[0].seq < firstSeqBefore) {
      box.scrollTop += box.scrollHeight - oldHeight; // older page above: keep the view still
    } else if (atBottom || this.lastDrawn !== conversation.id) {
      box.scrollTop = box.scrollHeight;
    }
    this.lastDrawn = conversation.id;
  }

  messageRow(conversation, message) {
    const mine = message.sender === this.chat.me.user_id;
    const row = element("li", `message${mine ? " mine" : ""}`);
    row.dataset.seq = String(message.seq);
    if (conversation.kind === "group" || !mine) {
      row.append(element("span", "sender", mine ? "you" : this.chat.people.userName(message.sender)));
    }
    row.append(element("span", "body", message.text));
    const meta = element("span", "meta");
    meta.append(element("time", "", clock(message.timeMs)));
    if (mine) {
      const readers = this.chat.readers(conversation, message.seq);
      let receipt = "✓ sent";
      if (readers.length && conversation.kind === "dm") receipt = "✓✓ read";
      else if (readers.length) {
        receipt = `✓✓ read by ${readers.map((user) => this.chat.people.userName(user)).join(", ")}`;
      }
      const node = element("span", "receipt", receipt);
      node.dataset.read = readers.length ? "true" : "false";
      meta.append(node);
    }
    row.append(meta);
    return row;
  }

  outgoingRow(outgoing) {
    const row = element("li", "message mine pending");
    row.dataset.clientMsgId = outgoing.clientMsgId;
    row.append(element("span", "body", outgoing.text));
    const label = outgoing.state === "failed" ? `not sent: ${outgoing.error}` : "sending…";
    const meta = element("span", "meta");
    meta.append(element("span", `receipt ${outgoing.state}`, label));
    row.append(meta);
    return row;
  }
}
