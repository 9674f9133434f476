from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from pydantic import ValidationError
from pytest_httpx import HTTPXMock

from slurmproxy.cli import main
from slurmproxy.core.principal import Principal
from slurmproxy.errors import RateLimitedError
from slurmproxy.policy import Rule, load_policy
from slurmproxy.policy.model import BucketSpec, RateLimitSpec, RuleSpec
from slurmproxy.policy.ratelimit import RateLimiter, vo_of
from tests.asgi import app_client
from tests.fakeupstream import ThreadedFakeSlurmrestd as Upstream
from tests.helpers import (
    ISSUER,
    JWKS_URI,
    OTHER_ISSUER,
    UPSTREAM,
    VO_MEMBER,
    Signer,
    basic_policy,
    discovery,
    make_settings,
    write_policy,
)

ROLE_MEMBER = "urn:mace:egi.eu:group:vo.example.org:role=member#aai.egi.eu"
SUBGROUP_ADMIN = "urn:mace:egi.eu:group:vo.example.org:admins:role=owner#aai.egi.eu"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def principal(subject: str = "alice", issuer: str = ISSUER) -> Principal:
    return Principal(issuer, subject, MappingProxyType({}), (), 0.0, "t")


def rule(rule_id: str = "r", **limits: Any) -> Rule:
    spec = RateLimitSpec.model_validate(limits) if limits else None
    return Rule(rule_id, "test", "", None, None, (), (), (), (), rate_limit=spec)


def allowed(limiter: RateLimiter, r: Rule, p: Principal, ent: str | None = VO_MEMBER, n: int = 1) -> int:
    ok = 0
    for _ in range(n):
        try:
            limiter.check(r, p, ent)
            ok += 1
        except RateLimitedError:
            pass
    return ok


def test_identity_bucket_allows_the_burst_then_429_with_retry_after() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    r = rule(per_identity={"requests": 1, "period_seconds": 10, "burst": 3})
    assert allowed(limiter, r, principal(), n=3) == 3
    with pytest.raises(RateLimitedError) as caught:
        limiter.check(r, principal(), VO_MEMBER)
    error = caught.value
    assert error.status_code == 429 and error.reason == "rate_limited"
    assert error.headers["Retry-After"] == "10"
    assert "rule r" in error.detail and "for this identity" in error.detail


def test_tokens_refill_at_the_configured_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    r = rule(per_identity={"requests": 2, "period_seconds": 1})
    assert allowed(limiter, r, principal(), n=5) == 2
    clock.now += 0.5  # one token back
    assert allowed(limiter, r, principal(), n=5) == 1
    clock.now += 100  # never more than the burst
    assert allowed(limiter, r, principal(), n=5) == 2


def test_retry_after_is_rounded_up_to_whole_seconds() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    r = rule(per_identity={"requests": 1, "period_seconds": 2.5})
    limiter.check(r, principal(), None)
    clock.now += 1.0
    with pytest.raises(RateLimitedError) as caught:
        limiter.check(r, principal(), None)
    assert caught.value.headers["Retry-After"] == "2"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(principal("alice"), principal("bob"), id="two-subjects-sharing-a-service-account"),
        pytest.param(principal("alice", ISSUER), principal("alice", OTHER_ISSUER), id="same-subject-two-issuers"),
    ],
)
def test_identities_never_share_a_bucket(first: Principal, second: Principal) -> None:
    limiter = RateLimiter(clock=Clock())
    r = rule(per_identity={"requests": 1, "period_seconds": 60})
    assert allowed(limiter, r, first, n=3) == 1
    assert allowed(limiter, r, second, n=3) == 1


def test_vo_bucket_is_shared_by_the_vo_across_roles_and_subgroups() -> None:
    limiter = RateLimiter(clock=Clock())
    r = rule(per_vo={"requests": 3, "period_seconds": 60})
    assert allowed(limiter, r, principal("alice"), ROLE_MEMBER) == 1
    assert allowed(limiter, r, principal("bob"), SUBGROUP_ADMIN) == 1
    assert allowed(limiter, r, principal("carol"), ROLE_MEMBER, n=5) == 1
    with pytest.raises(RateLimitedError) as caught:
        limiter.check(r, principal("erin"), ROLE_MEMBER)
    assert "for this VO urn:mace:egi.eu:group:vo.example.org" in caught.value.detail
    other_vo = "urn:mace:egi.eu:group:vo.other.org:role=member#aai.egi.eu"
    assert allowed(limiter, r, principal("dave"), other_vo) == 1


def test_a_refusal_charges_no_bucket() -> None:
    limiter = RateLimiter(clock=Clock())
    r = rule(per_identity={"requests": 5, "period_seconds": 60}, per_vo={"requests": 1, "period_seconds": 60})
    assert allowed(limiter, r, principal("alice"), n=1) == 1
    assert allowed(limiter, r, principal("alice"), n=4) == 0  # the VO is empty; alice's bucket is not charged
    same_identity_bucket = rule(per_identity={"requests": 5, "period_seconds": 60})
    assert allowed(limiter, same_identity_bucket, principal("alice"), n=10) == 4  # 5 minus the one allowed


def test_rule_without_vo_or_without_limits() -> None:
    limiter = RateLimiter(clock=Clock())
    assert allowed(limiter, rule(), principal(), n=1000) == 1000
    only_vo = rule(per_vo={"requests": 1, "period_seconds": 60})
    assert allowed(limiter, only_vo, principal(), None, n=10) == 10  # admitted by subject: no VO bucket
    assert len(limiter) == 0


def test_buckets_belong_to_the_rule_and_its_limits() -> None:
    limiter = RateLimiter(clock=Clock())
    one = {"per_identity": {"requests": 1, "period_seconds": 60}}
    assert allowed(limiter, rule("a", **one), principal(), n=2) == 1
    assert allowed(limiter, rule("b", **one), principal(), n=2) == 1
    raised = {"per_identity": {"requests": 2, "period_seconds": 60}}
    assert allowed(limiter, rule("a", **raised), principal(), n=3) == 2  # reloaded limit: a fresh bucket


def test_memory_is_bounded_and_full_buckets_expire() -> None:
    clock = Clock()
    limiter = RateLimiter(max_keys=100, clock=clock)
    r = rule(per_identity={"requests": 1, "period_seconds": 1})
    for n in range(1000):
        limiter.check(r, principal(f"user{n}"), None)
    assert len(limiter) == 100
    clock.now += 1.01
    limiter.check(r, principal("late"), None)
    assert len(limiter) == 1


@pytest.mark.parametrize(
    ("entitlement", "vo"),
    [
        pytest.param(ROLE_MEMBER, "urn:mace:egi.eu:group:vo.example.org", id="role"),
        pytest.param(SUBGROUP_ADMIN, "urn:mace:egi.eu:group:vo.example.org", id="subgroup"),
        pytest.param(None, None, id="none"),
        pytest.param("not an entitlement", None, id="garbage"),
    ],
)
def test_vo_of(entitlement: str | None, vo: str | None) -> None:
    assert vo_of(entitlement) == vo


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        pytest.param({}, "needs per_identity, per_vo or both", id="empty"),
        pytest.param({"per_identity": {"requests": 0}}, "greater than 0", id="zero-rate"),
        pytest.param({"per_identity": {"requests": 1, "burst": 0}}, "greater than or equal to 1", id="zero-burst"),
        pytest.param({"per_vo": {"requests": 1, "per": "minute"}}, "Extra inputs", id="unknown-key"),
    ],
)
def test_invalid_rate_limits_are_refused(limits: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RateLimitSpec.model_validate(limits)


def test_bucket_defaults() -> None:
    assert BucketSpec(requests=10).capacity == 10 and BucketSpec(requests=10).rate == 10
    assert BucketSpec(requests=0.5).capacity == 1
    assert BucketSpec(requests=60, period_seconds=60, burst=5).rate == 1


def test_policy_file_carries_rate_limit_to_the_compiled_rule(tmp_path: Path) -> None:
    limits = {"per_identity": {"requests": 5, "period_seconds": 60, "burst": 2}, "per_vo": {"requests": 100}}
    policy = load_policy([write_policy(tmp_path, basic_policy(rate_limit=limits))])
    (compiled,) = policy.rules
    assert compiled.rate_limit == RateLimitSpec.model_validate(limits)
    assert RuleSpec.model_validate(basic_policy()["rules"][0]).rate_limit is None


@pytest.mark.anyio
async def test_429_reaches_the_client_and_the_audit(tmp_path: Path, httpx_mock: HTTPXMock, upstream: Upstream) -> None:
    signer = Signer()
    httpx_mock.add_response(url=f"{ISSUER}/.well-known/openid-configuration", json=discovery(), is_reusable=True)
    httpx_mock.add_response(url=JWKS_URI, json=signer.jwks(), is_reusable=True)
    upstream.add_response(url=f"{UPSTREAM}/slurm/v0.0.38/ping", json={"pings": []}, is_reusable=True)
    limits = {"per_identity": {"requests": 1, "period_seconds": 3600, "burst": 2}}
    settings = make_settings(tmp_path, basic_policy(rate_limit=limits))
    headers = {"Authorization": f"Bearer {signer.token()}"}
    other = {"Authorization": f"Bearer {signer.token(sub='bob@example.org')}"}
    async with app_client(settings) as client:
        statuses = [(await client.get("/slurm/v0.0.38/ping", headers=headers)).status_code for _ in range(3)]
        limited = await client.get("/slurm/v0.0.38/ping", headers=headers)
        bob = await client.get("/slurm/v0.0.38/ping", headers=other)  # same service account, own bucket
    assert statuses == [200, 200, 429]
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 3000
    assert limited.json()["slurmproxy"]["reason"] == "rate_limited"
    assert bob.status_code == 200
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [r["status"] for r in records] == [200, 200, 429, 429, 200]
    refused = records[2]
    assert refused["reason"] == "rate_limited" and refused["decision"] == "deny"
    assert refused["rule"] == "members" and refused["subject"] == "alice@example.org"
    assert refused["upstream_status"] is None and refused["local_user"] is None
    assert len(upstream.get_requests()) == 3


def test_policy_check_shows_the_rate_limits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    limits = {"per_identity": {"requests": 10, "period_seconds": 1, "burst": 20}, "per_vo": {"requests": 600.5}}
    directory = write_policy(tmp_path, basic_policy(rate_limit=limits))
    assert main(["policy", "check", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "rate limit: per identity 10 per 1 s (burst 20); per VO 600.5 per 1 s (burst 600)" in out
