from __future__ import annotations

import dataclasses

import pytest
from hypothesis import assume, given, strategies as st

from slurmproxy.core.entitlements import Entitlement, EntitlementRequirement, parse, parse_all, requirement_from_string


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(
            "urn:mace:egi.eu:group:vo.example.org:role=member#aai.egi.eu",
            Entitlement("urn:mace:egi.eu", "vo.example.org", (), "member", "aai.egi.eu"),
            id="egi-member",
        ),
        pytest.param(
            "urn:mace:egi.eu:group:vo.example.org:compute:gpu:role=admin#aai.egi.eu",
            Entitlement("urn:mace:egi.eu", "vo.example.org", ("compute", "gpu"), "admin", "aai.egi.eu"),
            id="subgroups",
        ),
        pytest.param(
            "urn:mace:egi.eu:group:vo.example.org",
            Entitlement("urn:mace:egi.eu", "vo.example.org"),
            id="no-role-no-authority",
        ),
        pytest.param(
            "URN:MACE:EGI.EU:group:vo.example.org#AAI.EGI.EU",
            Entitlement("urn:mace:egi.eu", "vo.example.org", (), None, "aai.egi.eu"),
            id="namespace-and-authority-case-folded",
        ),
        pytest.param(
            "urn:geant:h-df.de:group:aai-admin:role=member#unity.helmholtz.de",
            Entitlement("urn:geant:h-df.de", "aai-admin", (), "member", "unity.helmholtz.de"),
            id="helmholtz",
        ),
    ],
)
def test_parse(value: str, expected: Entitlement) -> None:
    assert parse(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "urn:mace:egi.eu:res:ggus.eu",
        "urn:mace:egi.eu:res:rest:slurm#aai.egi.eu",
        "urn:mace:egi.eu:goc.egi.eu:123:EGI:Site Administrator@egi.eu",
        "urn:mace:egi.eu:aai.egi.eu:member@fedcloud.egi.eu",
        "urn:mace:dir:entitlement:common-lib-terms",
        "vo.example.org",
        "",
        "urn:mace:egi.eu:group:",
        "urn:mace:egi.eu:group:vo:role=",
        "urn:mace:egi.eu:group:vo%ff",
        "x" * 5000,
    ],
)
def test_non_group_entitlements_are_ignored(value: str) -> None:
    assert parse(value) is None


def test_parse_all_counts_malformed_and_other_entitlements_apart() -> None:
    parsed = parse_all(
        [
            "urn:mace:egi.eu:group:vo#aai.egi.eu",
            "garbage",
            "urn:mace:egi.eu:group:vo:role=",
            "urn:mace:egi.eu:res:x#aai.egi.eu",
            "urn:mace:egi.eu:goc.egi.eu:123:EGI:Site_Administrator@egi.eu",
            42,
        ]
    )
    assert [str(e) for e in parsed.valid] == ["urn:mace:egi.eu:group:vo#aai.egi.eu"]
    assert parsed.malformed == 3  # garbage, the broken group entitlement, and a non-string
    assert parsed.other == 2  # a capability and a GOCDB role: not errors


MEMBER = requirement_from_string("urn:mace:egi.eu:group:vo.example.org:role=member#aai.egi.eu")


@pytest.mark.parametrize(
    ("held", "matches"),
    [
        ("urn:mace:egi.eu:group:vo.example.org:role=member#aai.egi.eu", True),
        ("urn:mace:egi.eu:group:vo.example.org:role=member#AAI.egi.eu", True),
        ("URN:MACE:egi.eu:group:vo.example.org:role=member#aai.egi.eu", True),
        ("urn:mace:egi.eu:group:vo.example.org.evil:role=member#aai.egi.eu", False),
        ("urn:mace:egi.eu:group:evil.vo.example.org:role=member#aai.egi.eu", False),
        ("urn:mace:egi.eu:group:VO.EXAMPLE.ORG:role=member#aai.egi.eu", False),
        ("urn:mace:egi.eu:group:vo.example.org:role=admin#aai.egi.eu", False),
        ("urn:mace:egi.eu:group:vo.example.org:sub:role=member#aai.egi.eu", False),
        ("urn:mace:egi.eu:group:vo.example.org:role=member#evil.example", False),
        ("urn:mace:egi.eu:group:vo.example.org:role=member", False),
        ("urn:mace:evil.eu:group:vo.example.org:role=member#aai.egi.eu", False),
        ("urn:mace:egi.eu:group:vo.example.org:role=membership#aai.egi.eu", False),
    ],
)
def test_matching_is_exact_on_parts(held: str, matches: bool) -> None:
    ent = parse(held)
    assert ent is not None
    assert MEMBER.matches(ent) is matches


def test_requirement_without_role_or_authority_accepts_any() -> None:
    req = EntitlementRequirement(namespace="urn:mace:egi.eu", group="vo", role=None, authority=None)
    for held in ["urn:mace:egi.eu:group:vo:role=admin#x.org", "urn:mace:egi.eu:group:vo"]:
        ent = parse(held)
        assert ent is not None and req.matches(ent)


def test_any_subgroups() -> None:
    req = EntitlementRequirement(namespace="urn:mace:egi.eu", group="vo", subgroups=None)
    ent = parse("urn:mace:egi.eu:group:vo:a:b:role=member")
    assert ent is not None and req.matches(ent)


def test_requirement_from_string_rejects_non_group() -> None:
    with pytest.raises(ValueError, match="not an AARC-G002 group entitlement"):
        requirement_from_string("urn:mace:egi.eu:res:x")


@given(st.text(max_size=300))
def test_parse_never_raises(value: str) -> None:
    result = parse(value)
    assert result is None or isinstance(result, Entitlement)


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=60))
def test_a_group_never_matches_a_different_group_name(suffix: str) -> None:
    held = parse(f"urn:mace:egi.eu:group:vo.example.org{suffix}:role=member#aai.egi.eu")
    if held is not None and held.group != "vo.example.org":
        assert not MEMBER.matches(held)


# --- differential test against the reference implementation (PyPI aarc-entitlement) --------------

_LOWER = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=12)
_PART = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789.-_", min_size=1, max_size=12)
_SUBGROUP = _PART.filter(lambda s: not s.startswith("role=") and s != "group")


@st.composite
def entitlement_strings(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    """A valid AARC-G002 group entitlement and its parts (some characters percent-encoded)."""
    nid = draw(_LOWER.filter(lambda s: s != "group"))  # namespaces compare case-insensitively here,
    nss = draw(st.lists(_LOWER.filter(lambda s: s != "group"), min_size=1, max_size=3))  # not in G002
    parts: dict[str, object] = {
        "namespace": f"urn:{nid}:" + ":".join(nss),
        "group": draw(_PART.filter(lambda s: s != "group")),
        "subgroups": tuple(draw(st.lists(_SUBGROUP, max_size=3))),
        "role": draw(st.none() | _PART),
        "authority": draw(st.none() | _PART),
    }
    text = f"{parts['namespace']}:group:{parts['group']}"
    text += "".join(f":{s}" for s in parts["subgroups"])  # type: ignore[attr-defined]
    text += f":role={parts['role']}" if parts["role"] is not None else ""
    text += f"#{parts['authority']}" if parts["authority"] is not None else ""
    if draw(st.booleans()):
        text = text.replace(".", "%2E")  # G002 percent-decodes before parsing
    return text, parts


@given(entitlement_strings())
def test_parse_agrees_with_aarc_entitlement_g002(case: tuple[str, dict[str, object]]) -> None:
    import aarc_entitlement

    text, parts = case
    ours = parse(text)
    theirs = aarc_entitlement.G002(text)
    assert ours is not None
    namespace = f"urn:{theirs.namespace_id}:{theirs.delegated_namespace}" + "".join(
        f":{s}" for s in theirs.subnamespaces
    )
    assert ours.namespace == namespace.lower() == str(parts["namespace"]).lower()
    assert ours.group == theirs.group == parts["group"]
    assert ours.subgroups == tuple(theirs.subgroups) == parts["subgroups"]
    assert ours.role == theirs.role == parts["role"]
    assert ours.authority == (theirs.group_authority.lower() if theirs.group_authority else None)


@given(entitlement_strings(), entitlement_strings(), st.booleans())
def test_matching_agrees_with_aarc_entitlement_where_the_rules_coincide(
    held_case: tuple[str, dict[str, object]], required_case: tuple[str, dict[str, object]], same: bool
) -> None:
    """G002's `satisfies` and ours agree for requirements with a role and no authority.

    (Without a role G002 also accepts deeper subgroups, and it ignores the authority; ours is exact
    on subgroups and checks the authority when a rule names one. G002 also lets a required namespace
    be satisfied by a longer one (``urn:a:b`` by ``urn:a:b:c``); ours compares namespaces exactly.
    Those differences are deliberate.)
    """
    import aarc_entitlement

    held_text = held_case[0]
    required_text = held_text if same else required_case[0]
    required_text = required_text.split("#", 1)[0]
    if ":role=" not in required_text:
        required_text += ":role=member"
    held, required = parse(held_text), requirement_from_string(required_text)
    assert held is not None
    assume(held.namespace == required.namespace or not held.namespace.startswith(required.namespace + ":"))
    theirs = aarc_entitlement.G002(held_text).satisfies(aarc_entitlement.G002(required_text))
    assert required.matches(held) is theirs


# --- properties: parsing never raises, matching is exact -------------------------------------------


@given(st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_parse_never_raises_on_arbitrary_bytes(value: str) -> None:
    assert parse(value) is None or isinstance(parse(value), Entitlement)
    parse_all([value, value.encode().hex(), None, 1])


@given(entitlement_strings(), st.sampled_from(["namespace", "group", "subgroups", "role", "authority"]), _PART)
def test_changing_any_part_breaks_the_match(case: tuple[str, dict[str, object]], part: str, other: str) -> None:
    parsed = parse(case[0])
    assert parsed is not None
    # A requirement that pins every part (a role and an authority included) matches only those parts.
    ent = dataclasses.replace(parsed, role=parsed.role or "member", authority=parsed.authority or "aai.egi.eu")
    exact = EntitlementRequirement(ent.namespace, ent.group, ent.subgroups, ent.role, ent.authority)
    assert exact.matches(ent)
    changed: dict[str, Entitlement] = {
        "namespace": dataclasses.replace(ent, namespace=ent.namespace + ":" + other),
        "group": dataclasses.replace(ent, group=ent.group + other),
        "subgroups": dataclasses.replace(ent, subgroups=(*ent.subgroups, other)),
        "role": dataclasses.replace(ent, role=f"{ent.role}{other}"),
        "authority": dataclasses.replace(ent, authority=f"{ent.authority}{other}"),
    }
    assert not exact.matches(changed[part])


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("urn:mace:egi.eu" + ":a" * 500 + ":group:vo", id="many-namespace-parts"),
        pytest.param("urn:mace:egi.eu:group:vo" + ":x" * 500 + ":role=", id="many-subgroups-bad-role"),
        pytest.param("urn:" + "a:" * 510, id="no-group-marker"),
        pytest.param("urn:mace:egi.eu:group:" + "%41" * 340, id="percent-encoded"),
    ],
)
def test_adversarial_strings_are_handled(value: str) -> None:
    assert parse(value) is None or isinstance(parse(value), Entitlement)
