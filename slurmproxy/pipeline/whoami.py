"""``GET /_slurmproxy/whoami``: who the proxy thinks the caller is, and what the policy lets them do.

The caller authenticates as for any request. The answer lists their identity (issuer, subject),
the entitlements the policy considered (parsed group entitlements; others are counted, not
shown), and every rule that admits them: the operations it allows, the local account its mapping
gives them (or why it gives none) and its job constraints. Rules that do not admit the caller are
not shown. Like every request, it gets an audit record; nothing is forwarded to slurmrestd.
"""

from __future__ import annotations

from typing import Any

from starlette.types import Receive, Scope, Send

from slurmproxy.core.entitlements import parse_all
from slurmproxy.core.principal import Principal
from slurmproxy.errors import ProxyError
from slurmproxy.pipeline.proxy import finish, refused
from slurmproxy.pipeline.runtime import Runtime
from slurmproxy.policy.rules import Policy, Rule, admitting
from slurmproxy.web.replies import Reply, json_reply
from slurmproxy.web.request import Incoming, headers_named


def policy_details(runtime: Runtime) -> dict[str, Any]:
    """The ``policy`` part of readiness: the policy in force and the outcome of the last reload."""
    if runtime.policy_reloader is None:
        return {"rules": len(runtime.policy.rules), "digest": runtime.policy.digest}
    details = runtime.policy_reloader.status.as_dict()
    details["rules"], details["digest"] = len(runtime.policy.rules), runtime.policy.digest
    return details


async def _account(runtime: Runtime, policy: Policy, rule: Rule, principal: Principal) -> dict[str, Any]:
    """The account the rule's mapping gives, asked without side effects (no pool lease is taken)."""
    reports = await runtime.mapper.explain(policy, rule, principal)
    chosen = next((r for r in reports if r.chosen), None)
    if chosen is not None:
        answer: dict[str, Any] = {"account": chosen.answer, "via": chosen.step}
        if chosen.detail:
            answer["detail"] = chosen.detail
        return answer
    failed = next((r.error for r in reports if r.error), None)
    return {"refused": failed or "unmapped: no mapping step gave an account"}


async def describe(runtime: Runtime, principal: Principal) -> dict[str, Any]:
    policy = runtime.policy
    parsed = parse_all(principal.entitlements)
    rules: list[dict[str, Any]] = []
    for rule, entitlement in admitting(policy, principal):
        entry: dict[str, Any] = {"id": rule.id, "allows": list(rule.groups)}
        if entitlement is not None:
            entry["entitlement"] = str(entitlement)
        if rule.description:
            entry["description"] = rule.description
        entry["mapping"] = await _account(runtime, policy, rule, principal)
        if rule.job is not None:
            entry["job"] = rule.job.describe()
        rules.append(entry)
    first = next((r["mapping"] for r in rules if "account" in r["mapping"]), None)
    return {
        "issuer": principal.issuer,
        "subject": principal.subject,
        "entitlements": {
            "considered": [str(e) for e in parsed.valid],
            "other_ignored": parsed.other,
            "malformed_ignored": parsed.malformed,
        },
        "account": first["account"] if first else None,
        "operations": sorted({g for r in rules for g in r["allows"]}),
        "rules": rules,
        "policy": {"digest": policy.digest},
    }


class WhoamiEndpoint:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime: Runtime = scope["state"]["runtime"]
        request = Incoming.of(scope, runtime.settings.server)
        record = request.record(runtime.settings.server, operation="whoami")
        reply: Reply
        try:
            principal = await runtime.tokens.authenticate(
                headers_named(request.headers, b"authorization"), record.client
            )
            record.set_principal(principal)
            body = await describe(runtime, principal)
            record.local_user = body["account"]
            record.allow(200)
            headers = {"x-request-id": request.request_id, "cache-control": "no-store"}
            reply = json_reply(body, headers=headers)
        except ProxyError as error:
            reply = refused(record, error)
        reply = await finish(runtime, record, reply)
        await reply.send(send)
