// A local OpenID provider (panva/oidc-provider 9) that behaves like EGI Check-in where told to.
//
//   node provider.mjs <config.json>
//
// The config (written by devstack/provider.py) names the issuer, ports, state directory, accounts,
// clients and resource servers. See devstack/README.md for what is faithful to Check-in and what
// is not. Prints "READY <port> <admin_port>" on stdout when both servers listen.
//
// Beyond stock oidc-provider:
// * JWT access tokens for users ("Check-in style") work at userinfo and introspection, as
//   Keycloak's do. oidc-provider does not store JWT access tokens and refuses them at both
//   endpoints (shared/reject_structured_tokens.js; actions/userinfo.js refuses any token with an
//   audience). We keep a *mirror* record of every JWT access token we issue (from the
//   access_token.issued event) in the same storage, and a small front middleware swaps a JWT that
//   this provider signed for an internal handle of that record before the request reaches
//   userinfo, introspection or revocation. Everything else (client auth, scopes, claims release,
//   expiry, revocation) is oidc-provider's own code.
// * Key rotation in-process: the Provider is re-created with the new JWKS but the same storage,
//   so issued tokens, grants and sessions survive. Keys persist in <state_dir>/keys.json.
// * An admin server on a separate loopback port: stats, key rotation, account edits.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import * as querystring from 'node:querystring';

// Silence Node's and oidc-provider's development-mode noise (the devstack is development by design).
process.removeAllListeners('warning');
process.on('warning', () => {});
const NOISE = [/devInteractions/, /development-only/, /quick start/, /Unsupported runtime/, /already parsed request body/,
  /features\.(introspection|revocation)\.allowedPolicy/, /should be changed/i];
const origWarn = console.warn.bind(console);
console.warn = (...args) => {
  const text = args.map(String).join(' ');
  if (NOISE.some((re) => re.test(text))) return;
  origWarn(...args);
};
const origInfo = console.info.bind(console);
console.info = (...args) => {
  const text = args.map(String).join(' ');
  if (text.startsWith('oidc-provider NOTICE')) return;
  origInfo(...args);
};

const { default: Provider, errors: oidcErrors } = await import('oidc-provider');

const configPath = process.argv[2];
if (!configPath) {
  console.error('usage: node provider.mjs <config.json>');
  process.exit(2);
}
const config = JSON.parse(fs.readFileSync(configPath, 'utf8'));
const stateDir = config.state_dir;
fs.mkdirSync(stateDir, { recursive: true, mode: 0o700 });

// ------------------------------------------------------------------ keys
const keysFile = path.join(stateDir, 'keys.json');

function newKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  jwk.kid = `devstack-${new Date().toISOString().replace(/[-:.TZ]/g, '').slice(0, 14)}-${crypto.randomBytes(3).toString('hex')}`;
  jwk.alg = 'RS256';
  jwk.use = 'sig';
  return jwk;
}

function loadState() {
  if (fs.existsSync(keysFile)) {
    return JSON.parse(fs.readFileSync(keysFile, 'utf8'));
  }
  const state = { keys: [newKey()], cookie_keys: [crypto.randomBytes(32).toString('hex')] };
  saveState(state);
  return state;
}

function saveState(state) {
  const tmp = `${keysFile}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify(state), { mode: 0o600 });
  fs.renameSync(tmp, keysFile);
}

let state = loadState();

// ------------------------------------------------------------------ storage (memory adapter, shared by every Provider instance)
const storage = new Map(); // key -> { payload, expiresAt }
const grantIndex = new Map(); // grantId -> Set of keys
const MIRROR_PREFIX = `jwtat.${crypto.randomBytes(12).toString('hex')}.`;

function storageKey(model, id) {
  return `${model}:${id}`;
}

function getLive(key) {
  const entry = storage.get(key);
  if (!entry) return undefined;
  if (entry.expiresAt && entry.expiresAt < Date.now()) {
    storage.delete(key);
    return undefined;
  }
  return entry.payload;
}

class MemoryAdapter {
  constructor(model) {
    this.model = model;
  }

  async upsert(id, payload, expiresIn) {
    const key = storageKey(this.model, id);
    storage.set(key, { payload, expiresAt: expiresIn ? Date.now() + expiresIn * 1000 : undefined });
    if (payload.grantId) {
      if (!grantIndex.has(payload.grantId)) grantIndex.set(payload.grantId, new Set());
      grantIndex.get(payload.grantId).add(key);
    }
    if (this.model === 'Session' && payload.uid) {
      storage.set(storageKey('SessionUid', payload.uid), { payload: id, expiresAt: storage.get(key).expiresAt });
    }
    if (payload.userCode) {
      storage.set(storageKey('UserCode', payload.userCode), { payload: id, expiresAt: storage.get(key).expiresAt });
    }
  }

  async find(id) {
    if (typeof id === 'string' && id.startsWith(MIRROR_PREFIX)) {
      const mirror = findMirror(id.slice(MIRROR_PREFIX.length));
      return mirror && mirror.kind === this.model ? mirror : undefined;
    }
    return getLive(storageKey(this.model, id));
  }

  async findByUid(uid) {
    const id = getLive(storageKey('SessionUid', uid));
    return id ? this.find(id) : undefined;
  }

  async findByUserCode(userCode) {
    const id = getLive(storageKey('UserCode', userCode));
    return id ? this.find(id) : undefined;
  }

  async consume(id) {
    const payload = getLive(storageKey(this.model, id));
    if (payload) payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    storage.delete(storageKey(this.model, id));
    if (this.model === 'AccessToken' || this.model === 'ClientCredentials') storage.delete(storageKey('JwtMirror', id));
  }

  async revokeByGrantId(grantId) {
    const keys = grantIndex.get(grantId);
    if (!keys) return;
    for (const key of keys) storage.delete(key);
    grantIndex.delete(grantId);
  }
}

// Mirror records: "<use>.<jti>", use "ui" (userinfo: no audience, which oidc-provider refuses at
// userinfo) or "in" (introspection/revocation: the full record).
function findMirror(rest) {
  const dot = rest.indexOf('.');
  const use = rest.slice(0, dot);
  const jti = rest.slice(dot + 1);
  const payload = getLive(storageKey('JwtMirror', jti));
  if (!payload) return undefined;
  const copy = { ...payload };
  if (use === 'ui') delete copy.aud;
  return copy;
}

const MIRROR_FIELDS = ['iat', 'exp', 'jti', 'kind', 'gty', 'grantId', 'sessionUid', 'expiresWithSession', 'accountId',
  'aud', 'claims', 'extra', 'scope', 'sid', 'clientId', 'x5t#S256', 'jkt'];

function recordJwtAccessToken(token) {
  if (token.format !== 'jwt' || !token.jti) return;
  const payload = {};
  for (const field of MIRROR_FIELDS) {
    if (token[field] !== undefined) payload[field] = token[field];
  }
  payload.kind = token.kind;
  const indicator = token.resourceServer?.identifier();
  if (indicator && resources[indicator]?.no_audience) delete payload.aud;
  const now = Math.floor(Date.now() / 1000);
  payload.iat ||= now;
  payload.exp ||= now + (token.expiration || config.access_token_ttl || 3600);
  // Check-in releases entitlements at introspection but never in the access token itself.
  payload.extra = { ...(payload.extra || {}), ...releasedClaims(token.accountId, token.scope) };
  const ttl = payload.exp * 1000 - Date.now();
  const key = storageKey('JwtMirror', token.jti);
  storage.set(key, { payload, expiresAt: Date.now() + ttl });
  if (token.grantId) {
    if (!grantIndex.has(token.grantId)) grantIndex.set(token.grantId, new Set());
    grantIndex.get(token.grantId).add(key);
  }
}

// ------------------------------------------------------------------ accounts and claims
const SCOPE_CLAIMS = {
  openid: ['sub'],
  profile: ['name', 'given_name', 'family_name', 'preferred_username'],
  email: ['email', 'email_verified', 'voperson_verified_email'],
  eduperson_entitlement: ['eduperson_entitlement'],
  entitlements: ['entitlements'],
  voperson_id: ['voperson_id'],
  eduperson_assurance: ['eduperson_assurance'],
  eduperson_scoped_affiliation: ['eduperson_scoped_affiliation'],
  aarc: ['name', 'given_name', 'family_name', 'preferred_username', 'email', 'email_verified',
    'voperson_verified_email', 'voperson_id', 'eduperson_entitlement', 'eduperson_assurance',
    'eduperson_scoped_affiliation'],
};

function accountClaims(sub) {
  const account = config.accounts[sub];
  if (!account) return undefined;
  const claims = { ...(account.claims || {}), sub };
  if (claims.entitlements === undefined && claims.eduperson_entitlement !== undefined) {
    claims.entitlements = claims.eduperson_entitlement;
  }
  return claims;
}

function releasedClaims(sub, scope) {
  const claims = sub ? accountClaims(sub) : undefined;
  if (!claims) return {};
  const out = {};
  for (const s of (scope || '').split(' ')) {
    for (const name of SCOPE_CLAIMS[s] || []) {
      if (name !== 'sub' && claims[name] !== undefined) out[name] = claims[name];
    }
  }
  return out;
}

// ------------------------------------------------------------------ clients and resource servers
const clientsById = Object.fromEntries(config.clients.map((c) => [c.client_id, c]));
const devstackOf = (clientId) => clientsById[clientId]?.devstack || {};

function oidcClients() {
  return config.clients.map((c) => {
    const { devstack, ...metadata } = c;
    return metadata;
  });
}

const resources = config.resources || {};

function resourceServerInfo(indicator) {
  const r = resources[indicator];
  if (!r) throw new oidcErrors.InvalidTarget(`unknown resource ${indicator}`);
  const info = {
    scope: r.scope || Object.keys(SCOPE_CLAIMS).join(' '),
    accessTokenFormat: r.format || 'jwt',
    accessTokenTTL: r.ttl || config.access_token_ttl || 3600,
  };
  if (r.audience) info.audience = r.audience;
  if (info.accessTokenFormat === 'jwt') info.jwt = { sign: { alg: 'RS256' } };
  return info;
}

// ------------------------------------------------------------------ provider construction
const routes = {
  authorization: '/protocol/openid-connect/auth',
  token: '/protocol/openid-connect/token',
  userinfo: '/protocol/openid-connect/userinfo',
  jwks: '/protocol/openid-connect/certs',
  introspection: '/protocol/openid-connect/token/introspect',
  revocation: '/protocol/openid-connect/revoke',
  end_session: '/protocol/openid-connect/logout',
};

function buildProvider() {
  const provider = new Provider(config.issuer, {
    adapter: MemoryAdapter,
    clients: oidcClients(),
    jwks: { keys: state.keys },
    cookies: { keys: state.cookie_keys },
    routes,
    scopes: Object.keys(SCOPE_CLAIMS),
    claims: SCOPE_CLAIMS,
    async findAccount(_ctx, sub) {
      if (!config.accounts[sub]) return undefined;
      return {
        accountId: sub,
        async claims() {
          return accountClaims(sub) || { sub };
        },
      };
    },
    pkce: { required: () => false },
    ttl: {
      AccessToken: config.access_token_ttl || 3600,
      ClientCredentials: config.access_token_ttl || 3600,
      IdToken: 3600,
      Grant: 14 * 24 * 3600,
      Session: 14 * 24 * 3600,
      Interaction: 3600,
      AuthorizationCode: 600,
      RefreshToken: 30 * 24 * 3600,
    },
    features: {
      devInteractions: { enabled: true },
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        // Check-in: only confidential clients get introspection answers.
        allowedPolicy: async (_ctx, client, token) => client.clientAuthMethod !== 'none' || token.clientId === client.clientId,
      },
      revocation: {
        enabled: true,
        allowedPolicy: async (_ctx, client, token) => token.clientId === client.clientId
          || Boolean(devstackOf(client.clientId).may_revoke_any),
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: async (_ctx, client) => devstackOf(client.clientId).resource || undefined,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, indicator) => resourceServerInfo(indicator),
      },
      userinfo: { enabled: true },
      rpInitiatedLogout: { enabled: false },
    },
    async extraTokenClaims(_ctx, token) {
      if (token.kind === 'ClientCredentials') {
        return { ...(devstackOf(token.clientId).token_claims || {}) };
      }
      if (token.format === 'jwt') {
        // Check-in style user access tokens carry no entitlements (they are mirrored for
        // introspection instead), unless the client asks for extra token claims.
        return { ...(devstackOf(token.clientId).token_claims || {}) };
      }
      // Opaque user tokens: what Check-in releases at introspection.
      return { ...releasedClaims(token.accountId, token.scope), ...(devstackOf(token.clientId).token_claims || {}) };
    },
    formats: {
      customizers: {
        async jwt(_ctx, token, jwt) {
          const ds = devstackOf(token.clientId);
          if (token.kind === 'ClientCredentials' && ds.account) {
            jwt.payload.sub = ds.account; // a machine client acting for one account
          }
          const resource = token.resourceServer && resources[token.resourceServer.identifier()];
          if (resource && resource.no_audience) {
            // oidc-provider insists on "aud" in JWT access tokens; Check-in's have none.
            // Keep the value for that check but leave it out of the signed JSON.
            Object.defineProperty(jwt.payload, 'aud', { value: jwt.payload.aud, enumerable: false, writable: true });
          }
          if (ds.checkin_style) {
            jwt.header = { typ: 'JWT' };
            jwt.payload.typ = 'Bearer';
            jwt.payload.azp = token.clientId;
            if (token.sid) jwt.payload.sid = token.sid;
          }
        },
      },
    },
    clientBasedCORS: () => true,
    renderError: async (ctx, out) => {
      ctx.type = 'json';
      ctx.body = out;
    },
  });
  provider.proxy = false;
  provider.on('access_token.issued', recordJwtAccessToken);
  provider.on('client_credentials.issued', recordJwtAccessToken);
  provider.on('server_error', (_ctx, err) => console.error('server_error', err));
  return provider;
}

let provider = buildProvider();
let providerCallback = provider.callback();

// Surface invalid client metadata now rather than at the first request.
for (const { client_id: clientId } of config.clients) {
  try {
    await provider.Client.find(clientId);
  } catch (err) {
    console.error(`invalid client ${clientId}: ${err.error_description || err.message}`);
    process.exit(1);
  }
}

// ------------------------------------------------------------------ front: counters + JWT handle swap
const STAT_NAMES = ['discovery', 'jwks', 'authorization', 'token', 'userinfo', 'introspection', 'revocation', 'interaction', 'other'];
let stats = Object.fromEntries(STAT_NAMES.map((n) => [n, 0]));

function statName(pathname) {
  if (pathname === '/.well-known/openid-configuration' || pathname === '/.well-known/oauth-authorization-server') return 'discovery';
  if (pathname === routes.jwks) return 'jwks';
  if (pathname === routes.authorization || pathname.startsWith(`${routes.authorization}/`)) return 'authorization';
  if (pathname === routes.token) return 'token';
  if (pathname === routes.userinfo) return 'userinfo';
  if (pathname === routes.introspection) return 'introspection';
  if (pathname === routes.revocation) return 'revocation';
  if (pathname.startsWith('/interaction/')) return 'interaction';
  return 'other';
}

// jti of a JWT signed by one of our keys (current or old), or undefined.
function ourJwtId(value) {
  if (typeof value !== 'string' || value.split('.').length !== 3) return undefined;
  try {
    const [h, p, s] = value.split('.');
    const header = JSON.parse(Buffer.from(h, 'base64url').toString());
    const jwk = state.keys.find((k) => k.kid === header.kid);
    if (!jwk || header.alg !== 'RS256') return undefined;
    const key = crypto.createPublicKey({ key: { kty: jwk.kty, n: jwk.n, e: jwk.e }, format: 'jwk' });
    const ok = crypto.verify('sha256', Buffer.from(`${h}.${p}`), key, Buffer.from(s, 'base64url'));
    if (!ok) return undefined;
    const payload = JSON.parse(Buffer.from(p, 'base64url').toString());
    return typeof payload.jti === 'string' ? payload.jti : undefined;
  } catch {
    return undefined;
  }
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 56 * 1024) throw new Error('request entity too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

async function front(req, res) {
  const url = new URL(req.url, config.issuer);
  const name = statName(url.pathname);
  stats[name] += 1;
  if (name === 'userinfo') {
    const auth = req.headers.authorization;
    if (auth && /^bearer /i.test(auth)) {
      const jti = ourJwtId(auth.slice(7).trim());
      if (jti) req.headers.authorization = `Bearer ${MIRROR_PREFIX}ui.${jti}`;
    }
  } else if ((name === 'introspection' || name === 'revocation') && req.method === 'POST'
             && (req.headers['content-type'] || '').startsWith('application/x-www-form-urlencoded')) {
    const raw = await readBody(req);
    const form = querystring.parse(raw.toString('utf8'));
    const jti = ourJwtId(form.token);
    if (jti) form.token = `${MIRROR_PREFIX}in.${jti}`;
    // Hand oidc-provider the parsed body (it accepts an upstream-parsed body).
    req.body = form;
  }
  return providerCallback(req, res);
}

// ------------------------------------------------------------------ admin server
function rebuild() {
  provider = buildProvider();
  providerCallback = provider.callback();
}

function publicJwks() {
  return state.keys.map(({ kty, n, e, kid, alg, use }) => ({ kty, n, e, kid, alg, use }));
}

async function admin(req, res) {
  const url = new URL(req.url, 'http://admin');
  const send = (status, body) => {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  try {
    if (req.method === 'GET' && url.pathname === '/admin/health') return send(200, { ok: true });
    if (req.method === 'GET' && url.pathname === '/admin/stats') return send(200, stats);
    if (req.method === 'POST' && url.pathname === '/admin/stats/reset') {
      stats = Object.fromEntries(STAT_NAMES.map((n) => [n, 0]));
      return send(200, stats);
    }
    if (req.method === 'GET' && url.pathname === '/admin/keys') {
      return send(200, { current: state.keys[0].kid, keys: publicJwks() });
    }
    if (req.method === 'POST' && url.pathname === '/admin/rotate') {
      state = { ...state, keys: [newKey(), ...state.keys] };
      saveState(state);
      rebuild();
      return send(200, { current: state.keys[0].kid, keys: publicJwks().map((k) => k.kid) });
    }
    if (req.method === 'POST' && url.pathname === '/admin/drop-old-keys') {
      state = { ...state, keys: [state.keys[0]] };
      saveState(state);
      rebuild();
      return send(200, { current: state.keys[0].kid, keys: publicJwks().map((k) => k.kid) });
    }
    const m = url.pathname.match(/^\/admin\/accounts\/([^/]+)$/);
    if (m && req.method === 'PUT') {
      const body = JSON.parse((await readBody(req)).toString('utf8') || '{}');
      config.accounts[decodeURIComponent(m[1])] = body;
      return send(200, { ok: true });
    }
    if (m && req.method === 'DELETE') {
      delete config.accounts[decodeURIComponent(m[1])];
      return send(200, { ok: true });
    }
    if (req.method === 'POST' && url.pathname === '/admin/revoke-all') {
      for (const key of [...storage.keys()]) {
        if (key.startsWith('AccessToken:') || key.startsWith('JwtMirror:') || key.startsWith('ClientCredentials:')) storage.delete(key);
      }
      return send(200, { ok: true });
    }
    return send(404, { error: 'not found' });
  } catch (err) {
    return send(500, { error: String(err) });
  }
}

// ------------------------------------------------------------------ listen
function listen(server, port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve(server.address().port));
  });
}

const mainServer = http.createServer((req, res) => {
  front(req, res).catch((err) => {
    console.error('front error', err);
    if (!res.headersSent) {
      res.writeHead(500, { 'content-type': 'application/json' });
    }
    res.end(JSON.stringify({ error: 'server_error' }));
  });
});
const adminServer = http.createServer((req, res) => {
  admin(req, res);
});

const port = await listen(mainServer, config.port);
const adminPort = await listen(adminServer, config.admin_port);
process.stdout.write(`READY ${port} ${adminPort}\n`);

// Exit when the Python process that started us is gone (a killed test run leaves nothing behind).
if (config.owner_pid) {
  setInterval(() => {
    try {
      process.kill(config.owner_pid, 0);
    } catch (err) {
      if (err.code === 'ESRCH') process.exit(0);
    }
  }, 1000).unref();
}

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    mainServer.close();
    adminServer.close();
    process.exit(0);
  });
}
