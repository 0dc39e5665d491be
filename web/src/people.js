// The other users as the page shows them: names (looked up by id once and
// cached), presence (asked for with PresenceQuery), who is typing where
// (TypingEvents, shown for a while unless renewed), and this user's own
// typing signals (sent now and then while the composer changes, stopped
// when idle or on send). No DOM here: `onChange` tells the view to redraw.

const TYPING_SHOWN_MS = 6000;
const TYPING_RESEND_MS = 3000;
const TYPING_IDLE_MS = 4000;
/** Most users in one PresenceQuery (the server's bound). */
const PRESENCE_QUERY_MAX = 500;

export class People {
  constructor({ account, me, onChange }) {
    this.account = account;
    this.onChange = onChange;
    this.session = null;
    this.names = new Map([[me.user_id, me.username]]);
    this.lookingUp = new Set();
    this.presence = new Map();
    this.typingIn = new Map();
    this.typingSent = { id: null, at: 0, idle: null };
  }

  known(userId, username) {
    this.names.set(userId, username);
  }

  /** A user's name; unknown ones are looked up once and redrawn when known. */
  userName(userId) {
    const name = this.names.get(userId);
    if (name) return name;
    if (!this.lookingUp.has(userId)) {
      this.lookingUp.add(userId);
      this.account
        .request("GET", `/v1/users/by-id/${userId}`)
        .then((user) => {
          this.known(userId, user.username);
          this.onChange(null);
        })
        .catch((error) => console.warn(`no name for user ${userId}`, error));
    }
    return `user ${userId}`;
  }

  presenceOf(userId) {
    return this.presence.get(userId);
  }

  async refreshPresence(userIds) {
    if (!this.session?.online || userIds.length === 0) return;
    try {
      const { value } = await this.session.request({
        case: "presenceQuery",
        value: { userIds: userIds.slice(0, PRESENCE_QUERY_MAX).map(BigInt) },
      });
      for (const user of value.users) {
        this.presence.set(Number(user.userId), { online: user.online, lastSeenMs: Number(user.lastSeenMs) });
      }
      this.onChange(null);
    } catch (error) {
      console.warn("presence query failed", error);
    }
  }

  /** A TypingEvent from the server. */
  typingEvent(event) {
    const conversationId = event.conversationId;
    const user = Number(event.userId);
    this.stoppedTyping(conversationId, user);
    if (event.active) {
      const typers = this.typingIn.get(conversationId) ?? new Map();
      this.typingIn.set(conversationId, typers);
      typers.set(user, setTimeout(() => {
        this.stoppedTyping(conversationId, user);
        this.onChange(conversationId);
      }, TYPING_SHOWN_MS));
    }
    this.onChange(conversationId);
  }

  /** `user` no longer types in the conversation (stopped, or their message arrived). */
  stoppedTyping(conversationId, user) {
    const typers = this.typingIn.get(conversationId);
    if (!typers?.has(user)) return;
    clearTimeout(typers.get(user));
    typers.delete(user);
  }

  /** The names of those typing in a conversation. */
  typers(conversationId) {
    return [...(this.typingIn.get(conversationId)?.keys() ?? [])].map((user) => this.userName(user));
  }

  /** This user typed in the composer: tell the others now and then. */
  typing(conversationId) {
    const now = Date.now();
    if (this.typingSent.id !== conversationId || now - this.typingSent.at > TYPING_RESEND_MS) {
      this.typingSent.id = conversationId;
      this.typingSent.at = now;
      this.session?.notify({ case: "typing", value: { conversationId, active: true } });
    }
    clearTimeout(this.typingSent.idle);
    this.typingSent.idle = setTimeout(() => this.stopTyping(), TYPING_IDLE_MS);
  }

  stopTyping() {
    clearTimeout(this.typingSent.idle);
    const conversationId = this.typingSent.id;
    if (!conversationId) return;
    this.typingSent.id = null;
    this.session?.notify({ case: "typing", value: { conversationId, active: false } });
  }
}
