"""Job submissions and updates: the request body is checked against the policy before Slurm sees it.

* :mod:`~slurmproxy.policy.jobs.fields`: the fields a job may set, per body dialect, and their value kinds;
* :mod:`~slurmproxy.policy.jobs.body`: strict JSON parsing and the shapes of submit, allocate and update bodies;
* :mod:`~slurmproxy.policy.jobs.limits`: one rule's constraints applied to a body (checks and defaults);
* :mod:`~slurmproxy.policy.jobs.decide`: which rule accepts the body (and the 413/415 checks before reading it).
"""
