"""The committed job-body rules (slurmproxy/policy/jobs/openapi/*.json) match the running slurmrestd.

The proxy checks job bodies against rules made from each version's OpenAPI document and measured
``null`` behaviour (devstack/jobschema.py). This test makes them again from the generation under
test and compares: a Slurm package that changes a field, a shape or what null does to a field the
policy counts fails here, and ``python -m devstack.jobschema write`` brings the files up to date.
"""

from __future__ import annotations

from devstack import SlurmCluster
from devstack.jobschema import committed, differences, extract, measure_nulls, openapi_document, versions_in
from slurmproxy.policy.jobs.fields import ALLOWED, RESOURCE_FIELDS

# Null is measured again for the fields the policy reads (the whole table takes a minute per generation;
# `python -m devstack.jobschema check` does all of it).
POLICY_FIELDS = (RESOURCE_FIELDS | {"account", "partition", "qos", "time_limit", "time_minimum", "name"}) & ALLOWED


def test_the_committed_rules_match_the_running_slurmrestd(slurm: SlurmCluster) -> None:
    document = openapi_document(slurm)
    served = versions_in(document)
    assert served == slurm.api_versions
    problems = []
    for version in served:
        rules = extract(document, version)
        old = committed(version)
        assert old is not None, f"no committed rules for {version}: run python -m devstack.jobschema write"
        fields = POLICY_FIELDS & rules["job"].keys()
        rules["null"] = measure_nulls(slurm, version, fields)
        problems += differences({**old, "null": {k: v for k, v in old["null"].items() if k in fields}}, rules)
    assert problems == [], "run python -m devstack.jobschema write: " + "; ".join(problems)
