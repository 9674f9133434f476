"""AARC-G002 group entitlements: an exact parser and an exact matcher.

Syntax (AARC-G002, as used by EGI Check-in)::

    <NAMESPACE>:group:<GROUP>[:<SUBGROUP>]*[:role=<ROLE>][#<GROUP-AUTHORITY>]

with ``<NAMESPACE>`` a URN such as ``urn:mace:egi.eu``. Values are percent-decoded first (G002).
Case rules: the namespace is a URN namespace and compares case-insensitively (RFC 8141 §3.1);
group, subgroups and role compare case-sensitively; the authority is a DNS-style name and
compares case-insensitively. Matching is exact on the parsed parts, never a substring test:
``vo.example.org`` never matches ``vo.example.org.evil``.

Strings that are not group entitlements parse to ``None``: they are ignored and counted, never a
crash. :func:`parse_all` tells two kinds apart: *other* entitlements (well-formed URNs of another
kind: AARC-G027 capabilities, GOCDB roles) and *malformed* ones (anything else, including strings
that say ``:group:`` but break the syntax).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

_ENTITLEMENT = re.compile(
    r"(?P<namespace>[uU][rR][nN]:[^:#?/\s]+(?::[^:#?/\s]+)+?)"
    r":group:(?P<group>[^:#\s]+)"
    r"(?P<subgroups>(?::(?!role=)[^:#\s]+)*)"
    r"(?::role=(?P<role>[^:#\s]+))?"
    r"(?:#(?P<authority>[^#\s]+))?"
)
_OTHER_URN = re.compile(r"[uU][rR][nN]:[A-Za-z0-9][A-Za-z0-9-]{0,31}:\S+")
MAX_ENTITLEMENT_LENGTH = 1024


@dataclass(frozen=True, slots=True)
class Entitlement:
    namespace: str
    group: str
    subgroups: tuple[str, ...] = ()
    role: str | None = None
    authority: str | None = None

    def __str__(self) -> str:
        text = f"{self.namespace}:group:{self.group}"
        text += "".join(f":{s}" for s in self.subgroups)
        if self.role is not None:
            text += f":role={self.role}"
        if self.authority is not None:
            text += f"#{self.authority}"
        return text


def parse(value: object) -> Entitlement | None:
    """The parsed entitlement, or None for anything that is not an AARC-G002 group entitlement."""
    if not isinstance(value, str) or not value or len(value) > MAX_ENTITLEMENT_LENGTH:
        return None
    return _parse(value)


@functools.lru_cache(maxsize=4096)  # every request parses its token's entitlements; a few hundred distinct are usual
def _parse(value: str) -> Entitlement | None:
    try:
        decoded = unquote(value, errors="strict")
    except UnicodeDecodeError:
        return None
    match = _ENTITLEMENT.fullmatch(decoded)
    if match is None:
        return None
    subgroups = tuple(s for s in match.group("subgroups").split(":") if s)
    authority = match.group("authority")
    return Entitlement(
        namespace=match.group("namespace").lower(),
        group=match.group("group"),
        subgroups=subgroups,
        role=match.group("role"),
        authority=authority.lower() if authority is not None else None,
    )


@dataclass(frozen=True, slots=True)
class EntitlementRequirement:
    """What a policy rule asks for. A part left as None matches any value of that part.

    ``subgroups`` is always exact: a requirement for ``vo`` is not met by ``vo:sub`` and vice versa,
    unless the rule says ``subgroups: any``.
    """

    namespace: str
    group: str
    subgroups: tuple[str, ...] | None = ()
    role: str | None = None
    authority: str | None = None

    def matches(self, ent: Entitlement) -> bool:
        return (
            ent.namespace == self.namespace
            and ent.group == self.group
            and (self.subgroups is None or ent.subgroups == self.subgroups)
            and (self.role is None or ent.role == self.role)
            and (self.authority is None or ent.authority == self.authority)
        )

    def __str__(self) -> str:
        text = f"{self.namespace}:group:{self.group}"
        text += ":*" if self.subgroups is None else "".join(f":{s}" for s in self.subgroups)
        text += f":role={self.role}" if self.role is not None else ":role=*"
        text += f"#{self.authority}" if self.authority is not None else "#*"
        return text


def requirement_from_string(value: str) -> EntitlementRequirement:
    ent = parse(value)
    if ent is None:
        raise ValueError(f"not an AARC-G002 group entitlement: {value!r}")
    return EntitlementRequirement(
        namespace=ent.namespace, group=ent.group, subgroups=ent.subgroups, role=ent.role, authority=ent.authority
    )


@dataclass(frozen=True, slots=True)
class ParsedEntitlements:
    valid: tuple[Entitlement, ...]
    malformed: int
    other: int = 0


def is_other_urn(value: str) -> bool:
    """A well-formed URN that is not a group entitlement (a capability, a GOCDB role): not an error."""
    return (
        len(value) <= MAX_ENTITLEMENT_LENGTH
        and _OTHER_URN.fullmatch(value) is not None
        and ":group:" not in value.lower()
    )


def parse_all(values: Iterable[object]) -> ParsedEntitlements:
    """Parse every value; count the ones that are not group entitlements instead of failing."""
    valid: list[Entitlement] = []
    malformed = other = 0
    for value in values:
        ent = parse(value)
        if ent is not None:
            valid.append(ent)
        elif isinstance(value, str) and is_other_urn(value):
            other += 1
        else:
            malformed += 1
    return ParsedEntitlements(tuple(valid), malformed, other)
