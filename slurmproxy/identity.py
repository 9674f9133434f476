"""Identity mapping: a federated (issuer, subject) becomes a safe local account, or nobody.

The rule that allowed the request lists mapping steps, tried in order; the first that yields an
account wins. Whatever a step yields is then checked: a valid POSIX user name, not root, not the
SlurmUser, not a denied account, and — where the account exists in this host's user database —
a uid at or above ``min_uid``. A refused account is never replaced by a fallback.
"""

from __future__ import annotations

import asyncio
import pwd
import re
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from slurmproxy.errors import IdentityMappingError
from slurmproxy.policy import Policy, Rule
from slurmproxy.settings import IdentitySettings
from slurmproxy.tokens import Principal

POSIX_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_PASSWD_CACHE_SECONDS = 300


@dataclass(frozen=True, slots=True)
class LocalAccount:
    name: str
    source: str
    uid: int | None = None


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
        self._slurm_uid: int | None = None

    async def _uid(self, name: str) -> int | None:
        if name in self._uids:
            return self._uids[name]
        # NSS may be a network service (SSSD, LDAP): never call it on the event loop.
        uid = await asyncio.to_thread(self._lookup, name)
        self._uids[name] = uid
        return uid

    async def check(self, name: str, source: str) -> LocalAccount:
        if not POSIX_NAME.fullmatch(name):
            raise IdentityMappingError(
                f"{source} gave a local account name that is not a valid POSIX user name", reason="invalid_username"
            )
        if name in self._denied:
            what = "root" if name == "root" else "the SlurmUser" if name == self._settings.slurm_user else "denied"
            raise IdentityMappingError(f"local account {name!r} is refused: it is {what}", reason="account_refused")
        uid = await self._uid(name)
        if uid is None:
            if self._settings.require_local_account:
                raise IdentityMappingError(
                    f"local account {name!r} does not exist on this host", reason="account_unknown"
                )
            return LocalAccount(name, source, None)
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
        return LocalAccount(name, source, uid)


class IdentityMapper:
    def __init__(self, guard: AccountGuard) -> None:
        self._guard = guard

    async def map(self, policy: Policy, rule: Rule, principal: Principal) -> LocalAccount:
        tried: list[str] = []
        for step in rule.mapping:
            name = policy.tables.get(step.target, {}).get(principal.key) if step.kind == "table" else step.target
            if name is not None:
                return await self._guard.check(name, str(step))
            tried.append(str(step))
        raise IdentityMappingError(
            f"no local account for this identity (rule {rule.id} tried {', '.join(tried)})", reason="unmapped"
        )
