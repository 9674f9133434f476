"""Shared service accounts: everyone a rule admits (typically all members of one VO) becomes one account.

The account is named in the policy (``service_account: svc-alpha``); like every backend's answer it
still passes the guard on each request, so a denied or system account is refused, not used.
"""

from __future__ import annotations


def service_account(target: str) -> str:
    return target
