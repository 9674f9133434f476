"""Rate limits per identity and per VO, on the real server with real tokens and real Slurm."""

from __future__ import annotations

from typing import Any

import pytest

from devstack import SlurmCluster
from devstack.provider import MEMBER_ENTITLEMENT, OTHER_VO_ENTITLEMENT, PROXY_AUDIENCE, PROXY_RESOURCE, OidcProvider
from devstack.proxy import ProxyServer
from tests.integration.conftest import ProxyFactory, call, proxy_config, records_for
from tests.integration.hostile import Forger, RestdLog

HOUR = 3600


def _policy(issuer: str) -> dict[str, Any]:
    return {
        "rules": [
            {
                "id": "shared-account",
                "issuers": [issuer],
                "subjects": ["alice", "carol"],
                "allow": ["ping"],
                "mapping": [{"service_account": "svc-alpha"}],
                "rate_limit": {"per_identity": {"requests": 3, "period_seconds": HOUR}},
            },
            {
                "id": "example-vo",
                "entitlements": [MEMBER_ENTITLEMENT],
                "allow": ["read-only"],
                "mapping": [{"service_account": "svc-alpha"}],
                "rate_limit": {
                    "per_identity": {"requests": 100, "period_seconds": HOUR},
                    "per_vo": {"requests": 4, "period_seconds": HOUR},
                },
            },
            {
                "id": "other-vo",
                "entitlements": [OTHER_VO_ENTITLEMENT],
                "allow": ["read-only"],
                "mapping": [{"service_account": "svc-beta"}],
                "rate_limit": {"per_vo": {"requests": 4, "period_seconds": HOUR}},
            },
        ]
    }


@pytest.fixture(scope="module")
def limited(slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory) -> ProxyServer:
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}
    return proxy_factory(proxy_config(slurm, [issuer]), {"limits.yaml": _policy(oidc.issuer)})


def test_users_sharing_a_service_account_do_not_share_a_limit(
    limited: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str, request_id: str
) -> None:
    alice = oidc.client_credentials_token("alice-cli")
    carol = oidc.login("carol", resource=PROXY_RESOURCE)
    restd = RestdLog(slurm)
    mark = restd.mark()
    alice_statuses = [
        call(limited, "GET", f"{api}/ping", token=alice, request_id=f"{request_id}-a{n}").status_code for n in range(5)
    ]
    carol_statuses = [
        call(limited, "GET", f"{api}/ping", token=carol, request_id=f"{request_id}-c{n}").status_code for n in range(4)
    ]
    assert alice_statuses == [200, 200, 200, 429, 429]
    assert carol_statuses == [200, 200, 200, 429]
    assert len(restd.since(mark)) == 6  # the refused requests never reached slurmrestd
    refused = call(limited, "GET", f"{api}/ping", token=alice, request_id=f"{request_id}-last")
    assert refused.status_code == 429 and 1000 < int(refused.headers["retry-after"]) <= HOUR
    body = refused.json()
    assert body["slurmproxy"]["reason"] == "rate_limited" and "shared-account" in body["errors"][0]["error"]
    (record,) = records_for(limited, f"{request_id}-last")
    assert record["reason"] == "rate_limited" and record["status"] == 429 and record["decision"] == "deny"
    assert record["subject"] == "alice" and record["rule"] == "shared-account" and record["local_user"] is None
    assert [r["local_user"] for r in records_for(limited, f"{request_id}-c0")] == ["svc-alpha"]


def test_a_vo_shares_one_bucket_and_other_vos_have_their_own(
    limited: ProxyServer, oidc: OidcProvider, api: str, request_id: str
) -> None:
    forger = Forger(oidc)
    members = [forger.signed(sub=f"member-{n}") for n in range(3)]
    statuses = [
        call(limited, "GET", f"{api}/jobs", token=members[n % 3], request_id=f"{request_id}-m{n}").status_code
        for n in range(6)
    ]
    assert statuses == [200, 200, 200, 200, 429, 429]
    outsider = forger.signed(sub="outsider", eduperson_entitlement=[OTHER_VO_ENTITLEMENT])
    assert call(limited, "GET", f"{api}/jobs", token=outsider).status_code == 200
    (record,) = records_for(limited, f"{request_id}-m5")
    assert record["reason"] == "rate_limited" and record["rule"] == "example-vo"
    assert "VO urn:mace:egi.eu:group:vo.example.org" in record["detail"]
