from __future__ import annotations

from pathlib import Path

import pytest

from slurmproxy.config.settings import IdentitySettings
from slurmproxy.errors import IdentityMappingError
from slurmproxy.identity import AccountGuard, IdentityMapper
from slurmproxy.policy import load_policy
from tests.helpers import ISSUER, VO_MEMBER, basic_policy, write_policy
from tests.policy.test_rules import principal

pytestmark = pytest.mark.anyio

UIDS = {"alice": 2001, "svc-alpha": 2101, "root2": 0, "daemonish": 500, "slurm": 64030, "lowsvc": 999}


def guard(**settings: object) -> AccountGuard:
    return AccountGuard(IdentitySettings(**settings), lookup=UIDS.get)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        pytest.param("root", "account_refused", id="root"),
        pytest.param("slurm", "account_refused", id="slurm-user"),
        pytest.param("root2", "account_refused", id="uid-0-alias"),
        pytest.param("daemonish", "account_refused", id="below-min-uid"),
        pytest.param("lowsvc", "account_refused", id="uid-999"),
        pytest.param("Alice", "invalid_username", id="uppercase"),
        pytest.param("-alice", "invalid_username", id="leading-dash"),
        pytest.param("alice bob", "invalid_username", id="space"),
        pytest.param("al\nice", "invalid_username", id="newline"),
        pytest.param("a" * 33, "invalid_username", id="too-long"),
        pytest.param("", "invalid_username", id="empty"),
        pytest.param("../etc", "invalid_username", id="path"),
        pytest.param("alice$", "invalid_username", id="dollar"),
    ],
)
async def test_refused_accounts(name: str, reason: str) -> None:
    with pytest.raises(IdentityMappingError) as err:
        await guard().check(name, "test")
    assert err.value.reason == reason
    assert err.value.status_code == 403


async def test_denied_users_and_custom_slurm_user() -> None:
    g = guard(slurm_user="slurmadm", denied_users=("svc-alpha",))
    with pytest.raises(IdentityMappingError, match="SlurmUser"):
        await g.check("slurmadm", "t")
    with pytest.raises(IdentityMappingError, match="denied"):
        await g.check("svc-alpha", "t")


async def test_ordinary_account_passes_with_uid() -> None:
    account = await guard().check("alice", "table:users")
    assert (account.name, account.uid, account.source) == ("alice", 2001, "table:users")


@pytest.mark.parametrize("name", ["slurmdbd", "mysql", "toor", "remoteonly"])
async def test_an_account_this_host_does_not_know_is_refused_by_default(name: str) -> None:
    """Issue 15, item 7: a name the host cannot look up has no uid to check (a system account of the
    cluster's, a uid-0 alias): by default it is refused, never passed on unchecked."""
    with pytest.raises(IdentityMappingError) as err:
        await guard().check(name, "t")
    assert err.value.reason == "account_unknown" and err.value.status_code == 403
    assert "identity.unknown_accounts" in err.value.detail


async def test_unknown_accounts_allowed_by_an_explicit_pattern_or_by_turning_the_check_off() -> None:
    """A proxy whose host lacks the cluster's users names the accounts it may use unchecked."""
    pattern = guard(unknown_accounts=r"svc-[a-z]+|pool[0-9]{3}")
    assert (await pattern.check("svc-remote", "t")).uid is None
    assert (await pattern.check("pool007", "t")).uid is None
    for name in ("slurmdbd", "svc-remote2", "xsvc-remote", "pool0071"):
        with pytest.raises(IdentityMappingError) as err:
            await pattern.check(name, "t")
        assert err.value.reason == "account_unknown"
    with pytest.raises(IdentityMappingError):  # the pattern never lets a known, refused account through
        await guard(unknown_accounts=r"[a-z]+").check("daemonish", "t")
    assert (await guard(require_local_account=False).check("remoteonly", "t")).uid is None


async def test_table_first_then_service_account(tmp_path: Path) -> None:
    policy = load_policy([write_policy(tmp_path, basic_policy())])
    rule = policy.rules[0]
    mapper = IdentityMapper(guard())
    mapped = await mapper.map(policy, rule, principal(VO_MEMBER, subject="alice@example.org"))
    assert (mapped.name, mapped.source) == ("alice", "table:users")
    shared = await mapper.map(policy, rule, principal(VO_MEMBER, subject="bob@example.org"))
    assert (shared.name, shared.source) == ("svc-alpha", "service_account:svc-alpha")


async def test_same_subject_other_issuer_does_not_collide(tmp_path: Path) -> None:
    policy = load_policy([write_policy(tmp_path, basic_policy(mapping=[{"table": "users"}]))])
    mapper = IdentityMapper(guard())
    with pytest.raises(IdentityMappingError) as err:
        await mapper.map(
            policy,
            policy.rules[0],
            principal(VO_MEMBER, issuer="https://other.example.org", subject="alice@example.org"),
        )
    assert err.value.reason == "unmapped"
    assert "table:users" in err.value.detail
    assert ISSUER not in err.value.detail


async def test_refused_table_entry_is_not_replaced_by_a_fallback(tmp_path: Path) -> None:
    policy_data = basic_policy()
    policy_data["tables"]["users"]["entries"][0]["user"] = "root"
    policy = load_policy([write_policy(tmp_path, policy_data)])
    with pytest.raises(IdentityMappingError, match="root"):
        await IdentityMapper(guard()).map(policy, policy.rules[0], principal(VO_MEMBER, subject="alice@example.org"))


async def test_real_user_database_lookup_refuses_root_alias() -> None:
    real = AccountGuard(IdentitySettings())
    with pytest.raises(IdentityMappingError):
        await real.check("daemon", "t")  # uid 1 on Debian
