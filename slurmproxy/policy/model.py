"""The policy file format, as pydantic models. Unknown keys are errors (``extra="forbid"``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,63}")
_SLURM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")
_CLAIM_NAME = re.compile(r"[A-Za-z0-9_:.\-/]{1,128}")
ClaimValue = str | int | bool


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EntitlementSpec(_Model):
    """An entitlement requirement by parts. Omitted role/authority match any value."""

    namespace: str = "urn:mace:egi.eu"
    group: str
    subgroups: list[str] | Literal["any"] = Field(default_factory=list)
    role: str | None = None
    authority: str | None = None


class OperationSpec(_Model):
    methods: list[str] = Field(min_length=1)
    path: str


class TableMap(_Model):
    table: str = Field(description="Name of a table under `tables:`.")


class ServiceAccountMap(_Model):
    service_account: str = Field(description="A shared local account for everyone this rule admits.")


class AliseMap(_Model):
    alise: str = Field(description="Name of an ALISE service under `identity.alise` in the configuration.")


class PoolMap(_Model):
    pool: str = Field(description="Name of an account pool under `identity.pools` in the configuration.")
    max_leases: int | None = Field(
        None,
        ge=1,
        description="At most this many live leases of the pool for identities this rule admits (newcomers beyond "
        "it get 503 `pool_rule_cap`). Default: no cap.",
    )


MappingStep = Annotated[TableMap | ServiceAccountMap | AliseMap | PoolMap, Field(union_mode="left_to_right")]


def _slurm_names(values: list[str] | None) -> list[str] | None:
    for value in values or []:
        if not _SLURM_NAME.fullmatch(value):
            raise ValueError(f"not a Slurm account, partition or QOS name: {value!r}")
    if values is not None and len(set(values)) != len(values):
        raise ValueError("a name is listed twice")
    return values


class JobSpec(_Model):
    """What a job submitted (or updated) under this rule may ask Slurm for.

    A list that is left out does not restrict that field. When a list is given, the job's value
    must be one of it, and a job that names none gets the default: ``default_*`` if given, else
    the first listed value.
    """

    accounts: list[str] | None = Field(None, description="Slurm accounts the job may charge.")
    default_account: str | None = None
    partitions: list[str] | None = Field(None, description="Partitions the job may use.")
    default_partition: str | None = None
    qos: list[str] | None = Field(None, description="QOS the job may use.")
    default_qos: str | None = None
    max_time: int | str | None = Field(None, description="Longest time limit: minutes or a Slurm time string.")
    default_time: int | str | None = Field(None, description="Time limit of jobs that set none. Default: max_time.")
    max_nodes: int | None = Field(None, ge=1, description="Most nodes a job may ask for.")
    max_cpus: int | None = Field(None, ge=1, description="Most CPUs a job may ask for (tasks x cpus_per_task).")
    max_gpus: int | None = Field(None, ge=0, description="Most GPUs a job may ask for (gres/gpu).")
    max_memory: int | str | None = Field(
        None, description="Most memory a job may ask for in total: MB, or a size such as 16G."
    )
    default_memory: int | str | None = Field(
        None, description="Memory of jobs that ask for none (with max_memory). Default: max_memory."
    )
    max_array_tasks: int | None = Field(None, ge=1, description="Most tasks of a job array.")
    extra_fields: list[str] = Field(default_factory=list, description="Job fields allowed beyond the built-in list.")

    _names = field_validator("accounts", "partitions", "qos")(_slurm_names)

    @model_validator(mode="after")
    def _defaults_are_allowed(self) -> JobSpec:
        for values, default, name in (
            (self.accounts, self.default_account, "account"),
            (self.partitions, self.default_partition, "partition"),
            (self.qos, self.default_qos, "qos"),
        ):
            if default is not None:
                _slurm_names([default])
                if values is not None and default not in values:
                    raise ValueError(f"default_{name} {default!r} is not one of the allowed values {values}")
            if values is not None and not values:
                raise ValueError(f"an empty list of {name} values would refuse every job; leave it out or name one")
        return self


class BucketSpec(_Model):
    """A token bucket: ``requests`` per ``period_seconds`` sustained, up to ``burst`` at once."""

    requests: float = Field(gt=0, description="Sustained rate: this many requests per `period_seconds`.")
    period_seconds: float = Field(1.0, gt=0, le=86400, description="The period of `requests`. Defaults to 1.")
    burst: int | None = Field(None, ge=1, description="Requests allowed at once. Defaults to `requests` (at least 1).")

    @property
    def capacity(self) -> float:
        return float(self.burst) if self.burst is not None else max(1.0, float(int(self.requests)))

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self.requests / self.period_seconds


class RateLimitSpec(_Model):
    """Per-rule rate limits; each caller the rule admits gets its own buckets (see slurmproxy.ratelimit)."""

    per_identity: BucketSpec | None = Field(None, description="One bucket per issuer + subject.")
    per_vo: BucketSpec | None = Field(None, description="One bucket per VO of the entitlement that admitted.")

    @model_validator(mode="after")
    def _not_empty(self) -> RateLimitSpec:
        if self.per_identity is None and self.per_vo is None:
            raise ValueError("rate_limit needs per_identity, per_vo or both")
        return self


class RuleSpec(_Model):
    id: str
    description: str = ""
    issuers: list[str] | None = Field(None, description="Only tokens from these issuers. Default: any trusted.")
    entitlements: list[str | EntitlementSpec] = Field(
        default_factory=list, description="The caller must hold at least one of these."
    )
    subjects: list[str] | None = Field(None, description="Only these subjects (exact).")
    claims: dict[str, list[ClaimValue]] | None = Field(
        None, description="Other claims the caller must hold: each named claim has (or contains) one of the values."
    )
    allow: list[str | OperationSpec] = Field(min_length=1, description="Operation groups or inline operations.")
    mapping: list[MappingStep] = Field(min_length=1, description="Mapping backends, tried in order.")
    job: JobSpec | None = Field(None, description="Constraints on job submissions and updates under this rule.")
    rate_limit: RateLimitSpec | None = Field(None, description="Request rate limits. Default: none.")

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _RULE_ID.fullmatch(value):
            raise ValueError(f"rule id must match {_RULE_ID.pattern}, got {value!r}")
        return value

    @field_validator("claims")
    @classmethod
    def _claim_conditions(cls, value: dict[str, list[ClaimValue]] | None) -> dict[str, list[ClaimValue]] | None:
        for name, accepted in (value or {}).items():
            if not _CLAIM_NAME.fullmatch(name):
                raise ValueError(f"not a claim name: {name!r}")
            if not accepted:
                raise ValueError(f"claim {name!r} lists no accepted value")
        return value

    @model_validator(mode="after")
    def _has_identity_condition(self) -> RuleSpec:
        if not self.entitlements and not self.subjects:
            raise ValueError("a rule needs `entitlements` or `subjects`; a rule that admits everyone is not allowed")
        return self


class TableEntry(_Model):
    issuer: str
    subject: str
    user: str


class TableSpec(_Model):
    file: Path | None = Field(None, description="A YAML (entries: [...]) or CSV (issuer,subject,user) file.")
    entries: list[TableEntry] = Field(default_factory=list)


class PolicyFile(_Model):
    issuers: list[str] | None = Field(
        None, description="Rules in this file admit tokens from these issuers only (a rule may narrow it further)."
    )
    rules: list[RuleSpec] = Field(default_factory=list)
    operations: dict[str, list[OperationSpec]] = Field(default_factory=dict)
    tables: dict[str, TableSpec] = Field(default_factory=dict)

    @field_validator("rules", "operations", "tables", mode="before")
    @classmethod
    def _empty_section(cls, value: object, info: ValidationInfo) -> object:
        """A section with only comments under it (YAML null) is an empty section."""
        if value is None:
            return [] if info.field_name == "rules" else {}
        return value


class TableFile(_Model):
    entries: list[TableEntry] = Field(default_factory=list)
