// The page's entry point: sign-in (register, log in, or the saved session
// of a previous visit), then wires the account, the WebSocket session, the
// conversation model and the view together, and the forms and buttons to
// them.

import { Account, ApiError } from "./api.js";
import { Chat } from "./chat.js";
import { Session } from "./session.js";
import { ChatView } from "./view.js";

const $ = (id) => document.getElementById(id);

const CONVERSATION_ID = /^(dm:\d+:\d+|g:\d+)$/;

const SIGNIN_MESSAGES = {
  10006: "Wrong username or password.",
  10007: "Too many failed logins; wait a minute.",
  10008: "That username is taken.",
};

function explain(error) {
  if (error instanceof ApiError) return SIGNIN_MESSAGES[error.code] ?? `${error.message} (${error.code})`;
  return error.message;
}

const account = new Account();

function showSignin(message = "") {
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message;
}

async function signIn(register) {
  const form = $("signin-form");
  if (!form.reportValidity()) return;
  const username = $("username").value.trim();
  const password = $("password").value;
  $("signin-error").textContent = "";
  try {
    if (register) await account.register(username, password);
    await account.login(username, password);
    await start();
  } catch (error) {
    $("signin-error").textContent = explain(error);
  }
}

async function start() {
  let me;
  try {
    me = await account.request("GET", "/v1/me");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) account.signOut();
    showSignin(account.signedIn ? explain(error) : "");
    return;
  }
  $("signin").hidden = true;
  $("app").hidden = false;
  $("me").textContent = me.username;

  let view;
  const chat = new Chat({ account, me, onChange: (id) => view.changed(id) });
  view = new ChatView(chat);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const session = new Session({
    url: `${scheme}://${location.host}/v1/ws`,
    token: (options) => account.token(options),
    onEvent: (kind, value) => chat.onEvent(kind, value),
    onOnline: () => chat.onOnline(),
    onStatus: (state, detail) => {
      view.status(state, detail);
      if (detail === "signed-out") showSignin("Your session ended; please log in again.");
    },
  });
  chat.attach(session);
  bind(chat, session);
  const reopen = decodeURIComponent(location.hash.slice(1));
  if (CONVERSATION_ID.test(reopen)) chat.open(reopen);
  session.start();
}

function bind(chat, session) {
  const sidebarError = (error) => {
    $("sidebar-error").textContent = error ? explain(error) : "";
  };
  $("conversations").addEventListener("click", (event) => {
    const button = event.target.closest("button.conversation");
    if (button) chat.open(button.dataset.id);
  });
  $("new-chat").addEventListener("submit", async (event) => {
    event.preventDefault();
    sidebarError(null);
    try {
      const id = await chat.directWith($("new-chat-user").value.trim());
      $("new-chat-user").value = "";
      await chat.open(id);
    } catch (error) {
      sidebarError(error);
    }
  });
  $("new-group").addEventListener("submit", async (event) => {
    event.preventDefault();
    sidebarError(null);
    const members = $("new-group-members").value.split(",").map((name) => name.trim()).filter(Boolean);
    try {
      const id = await chat.createGroup($("new-group-name").value.trim(), members);
      $("new-group-name").value = $("new-group-members").value = "";
      await chat.open(id);
    } catch (error) {
      sidebarError(error);
    }
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("message-input").value;
    if (!text.trim() || !chat.current) return;
    $("message-input").value = "";
    chat.send(chat.current, text);
  });
  $("message-input").addEventListener("input", () => {
    if (chat.current && $("message-input").value) chat.people.typing(chat.current);
  });
  $("older").addEventListener("click", () => chat.loadOlder(chat.current));
  $("logout").addEventListener("click", async () => {
    session.stop();
    try {
      await account.logout();
    } finally {
      location.reload();
    }
  });
}

$("signin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  signIn(false);
});
$("register").addEventListener("click", () => signIn(true));

if (account.signedIn) start();
else showSignin();
