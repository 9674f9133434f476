"""The upstream stage: a local account and a request in, slurmrestd's answer out.

Entry point: :class:`Upstream` (``forward``, ``check_served``). Inside: ``client`` (a lean HTTP/1.1
client with a keep-alive pool), ``headers`` (what of the client's request reaches slurmrestd),
``exchange`` (one request and its streamed answer), ``credentials`` (the Slurm JWT or service token
per account), ``apiversions`` (what slurmrestd serves), ``authcheck`` (Slurm rejecting the proxy's own
credential), ``shield`` (coalescing and the short response cache).
"""

from slurmproxy.upstream.forward import Outgoing, Upstream

__all__ = ["Outgoing", "Upstream"]
