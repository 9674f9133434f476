"""What the shared state hands the stages: implementations of the interfaces they own."""

from __future__ import annotations

from dataclasses import dataclass

from slurmproxy.identity.alise import LastKnownStore
from slurmproxy.identity.pool import LeaseBackend
from slurmproxy.policy.ratelimit import RateLimits
from slurmproxy.upstream.shield import SharedCache


@dataclass(frozen=True)
class SharedState:
    """What the stages get; None: the stage keeps its embedded implementation."""

    rate_limits: RateLimits | None = None
    shield_cache: SharedCache | None = None
    leases: LeaseBackend | None = None
    last_known: LastKnownStore | None = None
