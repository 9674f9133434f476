"""The safety check on every mapping backend's answer: is this local account usable at all?

A valid POSIX user name, not root (or any uid-0 alias), not the SlurmUser (by name or uid), not a
denied account, and, where the account exists in this host's user database, a uid at or above
``min_uid``. A refused account is never replaced by a fallback (see ``mapper``).
"""

from __future__ import annotations

import asyncio
import pwd
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache

from slurmproxy.config.settings import IdentitySettings
from slurmproxy.core.names import is_user_name
from slurmproxy.errors import IdentityMappingError

_PASSWD_CACHE_SECONDS = 300


@dataclass(frozen=True, slots=True)
class LocalAccount:
    """The account a request runs as; ``source`` is the mapping step (``pool:vo``), ``detail`` what the
    backend adds for the audit record (a pool lease, an ALISE answer served from the last-known cache)."""

    name: str
    source: str
    uid: int | None = None
    detail: dict[str, Any] | None = None


def _lookup_uid(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


class AccountGuard:
    """Decides whether a local account may be used at all. User-database lookups are cached."""

    def __init__(self, settings: IdentitySettings, lookup: Callable[[str], int | None] = _lookup_uid) -> None:
        self._settings = settings
        self._lookup = lookup
        self._denied = {"root", settings.slurm_user, *settings.denied_users}
        self._uids: TTLCache[str, int | None] = TTLCache(maxsize=4096, ttl=_PASSWD_CACHE_SECONDS)
        self._unknown_ok = re.compile(settings.unknown_accounts) if settings.unknown_accounts is not None else None
        self._slurm_uid: int | None = None

    async def _uid(self, name: str) -> int | None:
        if name in self._uids:
            return self._uids[name]
        # NSS may be a network service (SSSD, LDAP): never call it on the event loop.
        uid = await asyncio.to_thread(self._lookup, name)
        self._uids[name] = uid
        return uid

    async def check(self, name: str, source: str, detail: dict[str, Any] | None = None) -> LocalAccount:
        if not is_user_name(name):
            raise IdentityMappingError(
                f"{source} gave a local account name that is not a valid POSIX user name", reason="invalid_username"
            )
        if name in self._denied:
            what = "root" if name == "root" else "the SlurmUser" if name == self._settings.slurm_user else "denied"
            raise IdentityMappingError(f"local account {name!r} is refused: it is {what}", reason="account_refused")
        uid = await self._uid(name)
        if uid is None:
            named = self._unknown_ok is not None and self._unknown_ok.fullmatch(name) is not None
            if self._settings.require_local_account and not named:
                raise IdentityMappingError(
                    f"local account {name!r} does not exist on this host, so its uid cannot be checked (list the "
                    "accounts this host cannot look up in identity.unknown_accounts)",
                    reason="account_unknown",
                )
            return LocalAccount(name, source, None, detail)
        if uid == 0:
            raise IdentityMappingError(f"local account {name!r} is refused: it has uid 0", reason="account_refused")
        if self._slurm_uid is None:
            self._slurm_uid = await self._uid(self._settings.slurm_user)
        if uid == self._slurm_uid:
            raise IdentityMappingError(
                f"local account {name!r} is refused: it has the SlurmUser's uid", reason="account_refused"
            )
        if uid < self._settings.min_uid:
            raise IdentityMappingError(
                f"local account {name!r} is refused: uid {uid} is below the minimum {self._settings.min_uid}",
                reason="account_refused",
            )
        return LocalAccount(name, source, uid, detail)
