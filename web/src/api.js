// The HTTP API as the page uses it (docs/api.md) and the signed-in
// device's credentials: access and refresh tokens kept in localStorage so a
// reload stays signed in, refreshed shortly before the access token expires
// or when the server says it has.

const SESSION_KEY = "pingme.session";
const DEVICE_KEY = "pingme.device";
/** Refresh this long before the access token's expiry (seconds). */
const REFRESH_MARGIN_S = 60;
const TOKEN_EXPIRED = 10003;

/** A refused HTTP call: the stable `code` of docs/error-codes.md. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** This browser's device id: one per installation, like an app's. */
export function deviceId() {
  let id = localStorage.getItem(DEVICE_KEY);
  if (!id) {
    id = `web-${crypto.randomUUID().slice(0, 8)}`;
    localStorage.setItem(DEVICE_KEY, id);
  }
  return id;
}

async function call(method, path, { body, token } = {}) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (token) headers.authorization = `Bearer ${token}`;
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let json = {};
  try {
    json = text ? JSON.parse(text) : {};
  } catch {
    json = { message: text };
  }
  if (!response.ok) {
    throw new ApiError(response.status, json.code ?? 0, json.message ?? response.statusText);
  }
  return json;
}

/** Registration, login, token refresh and authenticated calls. */
export class Account {
  constructor() {
    this.saved = JSON.parse(localStorage.getItem(SESSION_KEY) ?? "null");
    this.refreshing = null;
  }

  get signedIn() {
    return this.saved !== null;
  }

  async register(username, password) {
    return call("POST", "/v1/auth/register", { body: { username, password } });
  }

  async login(username, password) {
    const pair = await call("POST", "/v1/auth/login", {
      body: { username, password, device_id: deviceId() },
    });
    this.keep(pair);
  }

  keep(pair) {
    this.saved = pair;
    localStorage.setItem(SESSION_KEY, JSON.stringify(pair));
  }

  signOut() {
    this.saved = null;
    localStorage.removeItem(SESSION_KEY);
  }

  /** A valid access token, refreshed first when it is about to expire. */
  async token({ force = false } = {}) {
    if (!this.saved) throw new ApiError(401, 10001, "signed out");
    const now = Date.now() / 1000;
    if (force || this.saved.expires_at - REFRESH_MARGIN_S < now) {
      // One refresh at a time, however many callers need a token.
      this.refreshing ??= call("POST", "/v1/auth/refresh", {
        body: { refresh_token: this.saved.refresh_token },
      })
        .then((pair) => this.keep(pair))
        .catch((error) => {
          if (error instanceof ApiError && error.status === 401) this.signOut();
          throw error;
        })
        .finally(() => {
          this.refreshing = null;
        });
      await this.refreshing;
    }
    return this.saved.token;
  }

  /** An authenticated call, retried once with a fresh token if it expired. */
  async request(method, path, body) {
    try {
      return await call(method, path, { body, token: await this.token() });
    } catch (error) {
      if (!(error instanceof ApiError) || error.code !== TOKEN_EXPIRED) throw error;
      return call(method, path, { body, token: await this.token({ force: true }) });
    }
  }

  async logout() {
    try {
      await this.request("POST", "/v1/auth/logout");
    } finally {
      this.signOut();
    }
  }
}
