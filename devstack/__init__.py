"""slurmproxy's test and demo harness: a real Slurm with slurmrestd, and a real OpenID provider.

See devstack/README.md. Nothing here mocks anything: every component is a real process.
"""

from ._proc import DevstackError
from .slurm import DEFAULT_PARTITIONS, FINISHED_STATES, GENERATIONS, Generation, Partition, SlurmCluster

__all__ = [
    "DEFAULT_PARTITIONS",
    "FINISHED_STATES",
    "GENERATIONS",
    "DevstackError",
    "Generation",
    "Partition",
    "SlurmCluster",
]
