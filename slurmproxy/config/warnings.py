"""What a configuration allows that is legal but probably unsafe: said by ``check-config`` and logged at
start-up, never an error (the policy's own warnings come from :mod:`slurmproxy.policy.checks`)."""

from __future__ import annotations

from slurmproxy.config.settings import Settings


def config_warnings(settings: Settings) -> list[str]:
    warnings: list[str] = []
    return warnings
