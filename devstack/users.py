"""The Unix accounts the devstack creates (see ``setup.sh``), with fixed uids.

Fixed uids let the Slurm 24.11 chroot mirror the host's accounts, so a job that runs as
``alice`` inside the chroot writes files that the host also sees as ``alice``'s.
"""

from __future__ import annotations

import pwd
from dataclasses import dataclass
from typing import Literal

Kind = Literal["daemon", "person", "service", "pool", "lowuid"]


@dataclass(frozen=True)
class User:
    """One local account: its name, uid (== gid of the same-named group) and role in tests."""

    name: str
    uid: int
    kind: Kind

    @property
    def gid(self) -> int:
        return self.uid

    @property
    def home(self) -> str:
        return f"/home/{self.name}"


RESTD = User("restd", 990, "daemon")
"""Runs slurmrestd (which refuses root and SlurmUser). No login shell."""

ALICE = User("alice", 2001, "person")
BOB = User("bob", 2002, "person")
CAROL = User("carol", 2003, "person")
DAVE = User("dave", 2004, "person")
SVC_ALPHA = User("svc-alpha", 2101, "service")
SVC_BETA = User("svc-beta", 2102, "service")
LOWUID = User("lowuid", 500, "lowuid")
"""A real account below the usual 1000 boundary, for the proxy's min-uid refusal tests."""

POOL: tuple[User, ...] = tuple(User(f"pool{i:03d}", 3000 + i, "pool") for i in range(1, 51))
"""``pool001`` (uid 3001) to ``pool050`` (uid 3050)."""

PEOPLE: tuple[User, ...] = (ALICE, BOB, CAROL, DAVE)
SERVICES: tuple[User, ...] = (SVC_ALPHA, SVC_BETA)
ALL_USERS: tuple[User, ...] = (RESTD, *PEOPLE, *SERVICES, *POOL, LOWUID)

SLURM_USER = "slurm"
"""SlurmUser of every devstack cluster (created by the Debian packages, uid 64030)."""

_BY_NAME = {u.name: u for u in ALL_USERS}


def by_name(name: str) -> User:
    """The devstack user called ``name`` (KeyError if it is not one of ours)."""
    return _BY_NAME[name]


def missing_users() -> list[User]:
    """Accounts of the table that do not exist on this machine with the expected uid."""
    missing: list[User] = []
    for user in ALL_USERS:
        try:
            entry = pwd.getpwnam(user.name)
        except KeyError:
            missing.append(user)
            continue
        if entry.pw_uid != user.uid:
            missing.append(user)
    return missing


def table_lines() -> list[str]:
    """``name:uid:kind`` lines, the format ``setup.sh`` reads (``python3 -m devstack.users``)."""
    return [f"{u.name}:{u.uid}:{u.kind}" for u in ALL_USERS]


if __name__ == "__main__":
    print("\n".join(table_lines()))
