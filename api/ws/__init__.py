"""The ``/ws`` live feed (CONTRACT §7), by job.

- :mod:`api.ws.handshake`: the Origin check, the token, authentication; ``websocket_endpoint``.
- :mod:`api.ws.connection`: one client's life, its limits, and where its frames leave.
- :mod:`api.ws.commands`: what a client may ask (subscribe, unsubscribe, ping, a fresh token).
- :mod:`api.ws.frames`: close codes, error and auth frames, limits.

Nothing is imported here, so importing one of them imports no other.
"""
