"""Configuration: the settings model (one YAML file plus ``SLURMPROXY_*`` variables), issuer presets,
and the settings reference the README's table is generated from.

In: a file path (and the environment). Out: a validated, frozen :class:`Settings`, or a
:class:`~slurmproxy.errors.ConfigError` naming the file and every bad field.
"""

from slurmproxy.config.settings import Settings, load_settings

__all__ = ["Settings", "load_settings"]
