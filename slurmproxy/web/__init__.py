"""The HTTP edge: what comes in over a connection and what goes back out.

``protocol``: uvicorn's httptools protocol with header deadlines, size limits and a connection cap,
answering abusive connections itself (with an audit record); ``deadlines``: body and write deadlines;
``request``: reading headers, the request id, the client's address and the body; ``replies``: raw ASGI
replies and the one renderer of error bodies; ``forwarded``: ``X-Forwarded-For`` from trusted proxies.
"""
