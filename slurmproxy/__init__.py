"""slurmproxy: an OAuth/OIDC authorization proxy in front of slurmrestd."""

__version__ = "0.1.0"
