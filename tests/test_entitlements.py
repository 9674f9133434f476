from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from slurmproxy.entitlements import Entitlement, EntitlementRequirement, parse, parse_all, requirement_from_string


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
