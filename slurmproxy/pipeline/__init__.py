"""The composition root: the stages wired together for one request, and the ASGI app around them.

``runtime``: one object per stage, built at start-up; ``proxy``: the pipeline for slurmrestd paths
(token → policy → identity → upstream → audit); ``whoami``: who the proxy thinks the caller is;
``explain``: the same decision as ``proxy``, with its whole trace and no side effects (``slurmproxy
policy explain``); ``app``: the ASGI app, its lifespan and the proxy's own endpoints.
"""
