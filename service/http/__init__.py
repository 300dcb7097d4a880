"""The HTTP layer on the event loop: the uvicorn protocol, graceful shutdown, ASGI middleware, the fast path."""
