"""The policy file format, as pydantic models. Unknown keys are errors (``extra="forbid"``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,63}")


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


MappingStep = Annotated[TableMap | ServiceAccountMap | AliseMap | PoolMap, Field(union_mode="left_to_right")]


class RuleSpec(_Model):
    id: str
    description: str = ""
    issuers: list[str] | None = Field(None, description="Only tokens from these issuers. Default: any trusted.")
    entitlements: list[str | EntitlementSpec] = Field(
        default_factory=list, description="The caller must hold at least one of these."
    )
    subjects: list[str] | None = Field(None, description="Only these subjects (exact).")
    allow: list[str | OperationSpec] = Field(min_length=1, description="Operation groups or inline operations.")
    mapping: list[MappingStep] = Field(min_length=1, description="Mapping backends, tried in order.")

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _RULE_ID.fullmatch(value):
            raise ValueError(f"rule id must match {_RULE_ID.pattern}, got {value!r}")
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
    rules: list[RuleSpec] = Field(default_factory=list)
    operations: dict[str, list[OperationSpec]] = Field(default_factory=dict)
    tables: dict[str, TableSpec] = Field(default_factory=dict)


class TableFile(_Model):
    entries: list[TableEntry] = Field(default_factory=list)
