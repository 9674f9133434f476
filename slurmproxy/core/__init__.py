"""Pure values every stage shares: the caller (:class:`Principal`), AARC entitlements, slurmrestd's paths
and versions, path canonicalisation, account names, durations, and the single-flight primitive.

Nothing here does I/O or knows the configuration; everything above may import it.
"""
