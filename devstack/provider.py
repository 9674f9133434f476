"""A real OpenID provider (panva/oidc-provider 9 on Node) that behaves like EGI Check-in.

:class:`OidcProvider` runs ``devstack/oidc/provider.mjs`` on loopback, configured from a dict
(:func:`default_config` gives the accounts and clients the tests and the demo use), and drives it
over plain HTTP: client-credentials tokens, the authorization-code flow through the provider's
development login and consent forms (no browser), introspection, revocation, key rotation and
per-endpoint request counters.

Endpoints are at Keycloak's paths (``/protocol/openid-connect/token``, ``.../userinfo``,
``.../token/introspect``, ``.../certs``); read them from discovery, as the proxy should.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx

from ._proc import DevstackError, free_port, spawn, tail, terminate

OIDC_DIR = Path(__file__).resolve().parent / "oidc"

VO = "vo.example.org"
MEMBER_ENTITLEMENT = f"urn:mace:egi.eu:group:{VO}:role=member#aai.egi.eu"
"""alice's and carol's membership of the test VO, in Check-in's entitlement syntax."""
OTHER_VO_ENTITLEMENT = "urn:mace:egi.eu:group:vo.other.org:role=member#aai.egi.eu"

PROXY_AUDIENCE = "slurmproxy"
PROXY_RESOURCE = "https://slurmproxy.example.org"
"""Resource indicator whose JWT access tokens carry ``aud: "slurmproxy"``."""
CHECKIN_RESOURCE = "urn:devstack:checkin"
"""Default resource of the interactive client: JWT access tokens without ``aud``, like Check-in's."""
OPAQUE_RESOURCE = "urn:devstack:opaque"
"""Resource whose access tokens are opaque (introspection only)."""

INTERACTIVE_CLIENT = "checkin-cli"
"""Public client, authorization code + PKCE, Check-in-shaped JWT access tokens."""
OPAQUE_CLIENT = "checkin-cli-opaque"
"""Public client, authorization code + PKCE, opaque access tokens (userinfo and introspection)."""
PROXY_CLIENT = "slurmproxy"
"""The proxy's confidential client: may call introspection for any token."""
REDIRECT_URI = "http://127.0.0.1/callback"
DEFAULT_SCOPE = "openid profile email eduperson_entitlement voperson_id"


def _client_secret() -> str:
    return secrets.token_urlsafe(24)


def default_config(audience: str = PROXY_AUDIENCE) -> dict[str, Any]:
    """Accounts, clients and resource servers for tests and the demo (fresh client secrets each call).

    Accounts (the key is the ``sub``):

    * ``alice``: member of ``vo.example.org`` (entitlement at userinfo/introspection);
    * ``bob``: member of ``vo.other.org`` only;
    * ``carol``: member of ``vo.example.org``; her tokens come from :meth:`OidcProvider.login`, so
      her entitlements are only at userinfo and introspection, never in the token;
    * ``dave``: no entitlements at all.

    Clients:

    * ``alice-cli``: client credentials for alice; RFC 9068 JWT with alice's entitlement INSIDE
      the token and ``aud`` = ``audience``; ``sub`` is ``alice``;
    * ``dave-cli``: the same for dave, with no entitlements;
    * ``alice-cli-opaque``: client credentials for alice, opaque token (introspection carries the
      entitlement);
    * ``checkin-cli``: public, authorization code + PKCE, Check-in-shaped JWT access tokens
      (header ``typ: JWT``, claims ``typ: Bearer``, ``azp``, no entitlements, no ``aud`` unless a
      resource is requested);
    * ``checkin-cli-opaque``: public, authorization code + PKCE, opaque access tokens;
    * ``slurmproxy``: the proxy's confidential client, for introspection (client_secret_basic or
      client_secret_post).
    """

    def person(name: str, entitlements: list[str]) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "name": name.capitalize() + " Example",
            "given_name": name.capitalize(),
            "family_name": "Example",
            "preferred_username": name,
            "email": f"{name}@example.org",
            "email_verified": True,
            "voperson_id": f"{name}@egi.eu",
        }
        if entitlements:
            claims["eduperson_entitlement"] = entitlements
        return {"claims": claims}

    machine = ["client_credentials"]
    return {
        "access_token_ttl": 3600,
        "accounts": {
            "alice": person("alice", [MEMBER_ENTITLEMENT]),
            "bob": person("bob", [OTHER_VO_ENTITLEMENT]),
            "carol": person("carol", [MEMBER_ENTITLEMENT, f"urn:mace:egi.eu:group:{VO}:admins:role=member#aai.egi.eu"]),
            "dave": person("dave", []),
        },
        "resources": {
            PROXY_RESOURCE: {"audience": audience, "format": "jwt"},
            CHECKIN_RESOURCE: {"format": "jwt", "no_audience": True},
            OPAQUE_RESOURCE: {"audience": audience, "format": "opaque"},
        },
        "clients": [
            {
                "client_id": "alice-cli",
                "client_secret": _client_secret(),
                "grant_types": machine,
                "response_types": [],
                "redirect_uris": [],
                "devstack": {
                    "account": "alice",
                    "resource": PROXY_RESOURCE,
                    "token_claims": {"eduperson_entitlement": [MEMBER_ENTITLEMENT]},
                },
            },
            {
                "client_id": "dave-cli",
                "client_secret": _client_secret(),
                "grant_types": machine,
                "response_types": [],
                "redirect_uris": [],
                "devstack": {"account": "dave", "resource": PROXY_RESOURCE, "token_claims": {}},
            },
            {
                "client_id": "alice-cli-opaque",
                "client_secret": _client_secret(),
                "grant_types": machine,
                "response_types": [],
                "redirect_uris": [],
                "devstack": {
                    "account": "alice",
                    "resource": OPAQUE_RESOURCE,
                    "token_claims": {"eduperson_entitlement": [MEMBER_ENTITLEMENT]},
                },
            },
            {
                "client_id": INTERACTIVE_CLIENT,
                "application_type": "native",
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code"],
                "response_types": ["code"],
                "redirect_uris": [REDIRECT_URI],
                "devstack": {"resource": CHECKIN_RESOURCE, "checkin_style": True},
            },
            {
                "client_id": OPAQUE_CLIENT,
                "application_type": "native",
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code"],
                "response_types": ["code"],
                "redirect_uris": [REDIRECT_URI],
                "devstack": {},
            },
            {
                "client_id": PROXY_CLIENT,
                "client_secret": _client_secret(),
                "grant_types": machine,
                "response_types": [],
                "redirect_uris": [],
                "devstack": {"may_revoke_any": True},
            },
        ],
    }


def machine_client(
    client_id: str, account: str, entitlements: list[str], audience_resource: str = PROXY_RESOURCE
) -> dict[str, Any]:
    """A client-credentials client acting for ``account`` (its tokens' ``sub``), with ``entitlements`` in
    its RFC 9068 JWT access tokens, like ``alice-cli``. Add many to ``default_config()["clients"]``
    for many distinct identities: one token request each, no login flow."""
    return {
        "client_id": client_id,
        "client_secret": _client_secret(),
        "grant_types": ["client_credentials"],
        "response_types": [],
        "redirect_uris": [],
        "devstack": {
            "account": account,
            "resource": audience_resource,
            "token_claims": {"eduperson_entitlement": list(entitlements)} if entitlements else {},
        },
    }


class _FormParser(HTMLParser):
    """The first form of the development login/consent pages: action and hidden inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and self.action is None:
            self.action = a.get("action", "")
            self._in_form = True
        elif tag == "input" and self._in_form and a.get("name"):
            self.fields[a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


class OidcProvider:
    """One oidc-provider process on ``127.0.0.1:<port>`` plus its admin server on another port.

    ``workdir`` holds the rendered config (0600), the signing keys (``state/keys.json``, kept
    across :meth:`restart`) and the logs. ``config`` defaults to :func:`default_config`.
    """

    def __init__(
        self,
        workdir: Path | str,
        config: Mapping[str, Any] | None = None,
        *,
        port: int | None = None,
        admin_port: int | None = None,
        start_timeout: float = 15.0,
        node: str | None = None,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.config: dict[str, Any] = copy.deepcopy(dict(config)) if config is not None else default_config()
        self._fixed_ports = port is not None or admin_port is not None
        self.port = port or free_port()
        self.admin_port = admin_port or free_port()
        self._start_timeout = start_timeout
        self._node = node or shutil.which("node") or "node"
        self._proc: subprocess.Popen[bytes] | None = None
        self._http_client: httpx.Client | None = None
        self._discovery: dict[str, Any] | None = None
        self._token_clients: dict[str, str] = {}
        self.startup_seconds = 0.0

    # ------------------------------------------------------------------ properties
    @property
    def issuer(self) -> str:
        """``http://127.0.0.1:<port>``, exactly the ``iss`` of every token."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def discovery_url(self) -> str:
        return self.issuer + "/.well-known/openid-configuration"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def log_path(self) -> Path:
        return self.workdir / "provider.log"

    def client_secret(self, client_id: str) -> str:
        secret = self._client(client_id).get("client_secret")
        if not isinstance(secret, str):
            raise KeyError(f"client {client_id} is public (no secret)")
        return secret

    def _client(self, client_id: str) -> dict[str, Any]:
        for client in self.config["clients"]:
            if client["client_id"] == client_id:
                return cast(dict[str, Any], client)
        raise KeyError(f"no client {client_id!r} in the provider config")

    @property
    def _http(self) -> httpx.Client:
        if self._http_client is None:
            self._http_client = httpx.Client(timeout=30, follow_redirects=False)
        return self._http_client

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> OidcProvider:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> OidcProvider:
        """Start the provider; return when it answers discovery. Raises DevstackError with its log.

        If a port was taken meanwhile (EADDRINUSE) and the ports were not given explicitly, it
        retries twice on new ports.
        """
        for attempt in range(3):
            try:
                return self._start_once()
            except DevstackError as exc:
                if self._fixed_ports or "EADDRINUSE" not in str(exc) or attempt == 2:
                    raise
                self.port = free_port()
                self.admin_port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self) -> OidcProvider:
        if self._proc is not None and self._proc.poll() is None:
            return self
        t0 = time.monotonic()
        script = OIDC_DIR / "provider.mjs"
        if not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
            raise DevstackError(f"{OIDC_DIR}/node_modules is missing: run devstack/setup.sh")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(mode=0o700, exist_ok=True)
        cfg = dict(self.config)
        cfg.update(
            issuer=self.issuer,
            port=self.port,
            admin_port=self.admin_port,
            state_dir=str(self.state_dir),
            owner_pid=os.getpid(),
        )
        cfg_path = self.workdir / "provider-config.json"
        fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(cfg, fh, indent=1)
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "NODE_ENV": "development",
            "NODE_NO_WARNINGS": "1",
            "HOME": str(self.workdir),
        }
        start_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._proc = spawn([self._node, "--no-warnings", str(script), str(cfg_path)], self.log_path, env, cwd=OIDC_DIR)
        deadline = time.monotonic() + self._start_timeout
        while True:
            text = self.log_path.read_bytes()[start_offset:].decode("utf-8", "replace")
            if re.search(r"^READY \d+ \d+$", text, re.M):
                break
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise DevstackError(f"oidc provider exited with status {code} while starting\n{tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise DevstackError(f"oidc provider did not start in {self._start_timeout} s\n{tail(self.log_path)}")
            time.sleep(0.02)
        self._discovery = None
        self.discovery()
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop the provider process (safe to call twice). Keys stay in the state directory."""
        if self._http_client is not None:
            self._http_client.close()
            self._http_client = None
        if self._proc is not None:
            self.resume()  # a paused process cannot act on SIGTERM
            if self._proc.poll() is None:
                terminate(self._proc.pid, grace=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            self._proc = None

    def restart(self) -> None:
        """Stop and start on the same ports with the same keys. Issued tokens are forgotten."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the provider (SIGSTOP): connections are accepted by the kernel but never answered,
        as with a hung provider. :meth:`resume` continues it; :meth:`stop` also works while paused."""
        if self._proc is None or self._proc.poll() is not None:
            raise DevstackError("the provider is not running")
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a provider frozen by :meth:`pause`."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGCONT)

    # ------------------------------------------------------------------ endpoints
    def discovery(self) -> dict[str, Any]:
        if self._discovery is None:
            resp = self._http.get(self.discovery_url)
            resp.raise_for_status()
            self._discovery = cast(dict[str, Any], resp.json())
        return self._discovery

    def endpoint(self, name: str) -> str:
        """A discovery URL by its key without ``_endpoint``: ``token``, ``userinfo``, ``introspection``..."""
        key = name if name.endswith("_uri") else f"{name}_endpoint"
        value = self.discovery()[key]
        assert isinstance(value, str)
        return value

    @property
    def jwks_uri(self) -> str:
        return self.endpoint("jwks_uri")

    def jwks(self) -> dict[str, Any]:
        resp = self._http.get(self.jwks_uri)
        resp.raise_for_status()
        return cast(dict[str, Any], resp.json())

    def client_credentials_token(self, client_id: str, scope: str | None = None, resource: str | None = None) -> str:
        """An access token from the client-credentials grant (client_secret_basic)."""
        return str(self.client_credentials_response(client_id, scope, resource)["access_token"])

    def client_credentials_response(
        self, client_id: str, scope: str | None = None, resource: str | None = None
    ) -> dict[str, Any]:
        data = {"grant_type": "client_credentials"}
        if scope:
            data["scope"] = scope
        if resource:
            data["resource"] = resource
        resp = self._http.post(self.endpoint("token"), data=data, auth=(client_id, self.client_secret(client_id)))
        if resp.status_code != 200:
            raise DevstackError(f"client_credentials for {client_id}: HTTP {resp.status_code} {resp.text[:500]}")
        body = cast(dict[str, Any], resp.json())
        self._token_clients[str(body["access_token"])] = client_id
        return body

    def login(
        self,
        sub: str,
        scope: str = DEFAULT_SCOPE,
        resource: str | None = None,
        client_id: str = INTERACTIVE_CLIENT,
    ) -> str:
        """Log ``sub`` in through the authorization-code flow; return the access token.

        With the default client the token is a Check-in-shaped RS256 JWT without entitlements
        (they are at userinfo and introspection) and without ``aud``; pass
        ``resource=PROXY_RESOURCE`` for one with ``aud``.
        """
        return str(self.login_tokens(sub, scope, resource, client_id)["access_token"])

    def opaque_token(self, sub: str, scope: str = DEFAULT_SCOPE) -> str:
        """An opaque access token for ``sub`` (authorization code flow of ``checkin-cli-opaque``)."""
        return self.login(sub, scope, client_id=OPAQUE_CLIENT)

    def login_tokens(
        self,
        sub: str,
        scope: str = DEFAULT_SCOPE,
        resource: str | None = None,
        client_id: str = INTERACTIVE_CLIENT,
    ) -> dict[str, Any]:
        """Like :meth:`login`, returning the whole token response (access, id and refresh tokens)."""
        client = self._client(client_id)
        redirect_uri = client["redirect_uris"][0]
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        state = secrets.token_urlsafe(12)
        params = {
            "client_id": client_id,
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "scope": scope,
            "state": state,
            "nonce": secrets.token_urlsafe(12),
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "prompt": "login consent",
        }
        if resource:
            params["resource"] = resource
        with httpx.Client(timeout=30, follow_redirects=False) as browser:
            resp = browser.get(self.endpoint("authorization"), params=params)
            code = self._drive_interactions(browser, resp, sub, redirect_uri, state)
            data = {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "client_id": client_id,
                "code_verifier": verifier,
            }
            if resource:
                data["resource"] = resource
            auth = (client_id, client["client_secret"]) if client.get("client_secret") else None
            token = (
                browser.post(self.endpoint("token"), data=data, auth=auth)
                if auth
                else browser.post(self.endpoint("token"), data=data)
            )
        if token.status_code != 200:
            raise DevstackError(f"token exchange for {sub}: HTTP {token.status_code} {token.text[:500]}")
        body = cast(dict[str, Any], token.json())
        self._token_clients[str(body["access_token"])] = client_id
        return body

    def _drive_interactions(
        self, browser: httpx.Client, resp: httpx.Response, sub: str, redirect_uri: str, state: str
    ) -> str:
        for _ in range(12):
            if resp.is_redirect:
                location = urljoin(str(resp.url), resp.headers["location"])
                if location.startswith(redirect_uri):
                    query = parse_qs(urlsplit(location).query)
                    if "error" in query:
                        raise DevstackError(f"login of {sub} refused: {query}")
                    if query.get("state") != [state]:
                        raise DevstackError("login: state mismatch")
                    return query["code"][0]
                resp = browser.get(location)
                continue
            if resp.status_code != 200:
                raise DevstackError(f"login of {sub}: HTTP {resp.status_code} at {resp.url}: {resp.text[:500]}")
            form = _FormParser()
            form.feed(resp.text)
            if form.action is None:
                raise DevstackError(f"login of {sub}: no form at {resp.url}: {resp.text[:500]}")
            fields = dict(form.fields)
            if fields.get("prompt") == "login":
                fields.update(login=sub, password="devstack")
            resp = browser.post(urljoin(str(resp.url), form.action), data=fields)
        raise DevstackError(f"login of {sub}: too many interaction steps")

    def userinfo(self, token: str) -> httpx.Response:
        return self._http.get(self.endpoint("userinfo"), headers={"Authorization": f"Bearer {token}"})

    def introspect(self, token: str, client_id: str = PROXY_CLIENT) -> dict[str, Any]:
        """RFC 7662 introspection as ``client_id`` (client_secret_basic)."""
        resp = self._http.post(
            self.endpoint("introspection"),
            data={"token": token},
            auth=(client_id, self.client_secret(client_id)),
        )
        if resp.status_code != 200:
            raise DevstackError(f"introspection: HTTP {resp.status_code} {resp.text[:500]}")
        return cast(dict[str, Any], resp.json())

    def revoke(self, token: str, client_id: str | None = None) -> None:
        """Revoke ``token`` (RFC 7009) as the client it was issued to (or ``client_id``)."""
        cid = client_id or self._token_clients.get(token) or PROXY_CLIENT
        client = self._client(cid)
        data = {"token": token}
        if client.get("client_secret"):
            resp = self._http.post(self.endpoint("revocation"), data=data, auth=(cid, client["client_secret"]))
        else:
            resp = self._http.post(self.endpoint("revocation"), data={**data, "client_id": cid})
        if resp.status_code != 200:
            raise DevstackError(f"revocation: HTTP {resp.status_code} {resp.text[:500]}")

    # ------------------------------------------------------------------ admin
    def _admin(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        resp = self._http.request(method, self.admin_url + path, json=body)
        if resp.status_code != 200:
            raise DevstackError(f"provider admin {method} {path}: HTTP {resp.status_code} {resp.text[:300]}")
        return cast(dict[str, Any], resp.json())

    def rotate_keys(self) -> str:
        """Sign with a new RS256 key from now on, keep publishing the old ones; return the new kid."""
        return str(self._admin("POST", "/admin/rotate")["current"])

    def drop_old_keys(self) -> None:
        """Publish (and accept) only the current signing key."""
        self._admin("POST", "/admin/drop-old-keys")

    @property
    def current_kid(self) -> str:
        return str(self._admin("GET", "/admin/keys")["current"])

    def stats(self) -> dict[str, int]:
        """Requests per endpoint since start or the last reset: discovery, jwks, token, userinfo,
        introspection, revocation, authorization, interaction, other."""
        return {k: int(v) for k, v in self._admin("GET", "/admin/stats").items()}

    def reset_stats(self) -> None:
        self._admin("POST", "/admin/stats/reset")

    def set_account(self, sub: str, claims: Mapping[str, Any]) -> None:
        """Create or replace an account at runtime (e.g. drop an entitlement mid-test)."""
        self.config["accounts"][sub] = {"claims": dict(claims)}
        self._admin("PUT", f"/admin/accounts/{sub}", {"claims": dict(claims)})

    def remove_account(self, sub: str) -> None:
        self.config["accounts"].pop(sub, None)
        self._admin("DELETE", f"/admin/accounts/{sub}")


__all__ = [
    "CHECKIN_RESOURCE",
    "DEFAULT_SCOPE",
    "INTERACTIVE_CLIENT",
    "MEMBER_ENTITLEMENT",
    "OPAQUE_CLIENT",
    "OPAQUE_RESOURCE",
    "OTHER_VO_ENTITLEMENT",
    "PROXY_AUDIENCE",
    "PROXY_CLIENT",
    "PROXY_RESOURCE",
    "VO",
    "OidcProvider",
    "default_config",
]
