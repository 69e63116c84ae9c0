"""The live feed's vocabulary (CONTRACT §7): close codes, error and auth frames, per-connection limits.

Close codes: 4401 authentication failed or token expired, 4403 Origin not allowed (refused
before the handshake completes, i.e. HTTP 403), 4008 too slow (see ``api.broadcaster``),
1008 message rate exceeded, 1009 frame too large, 1011 a message the server failed to handle (a
bug, logged). Errors that do not end the connection are ``{"type": "error", "code": ...,
"message": ...}`` frames (codes ``forbidden``, ``unknown_channel``, ``bad_request``,
``too_many_channels``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from api.auth import Principal
from api.broadcaster import dumps

CLOSE_UNAUTHORIZED: Final = 4401
CLOSE_ORIGIN: Final = 4403
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011
SUBPROTOCOL: Final = "bearer"
#: How long a closed-for-slowness client's sender may take to flush the ``too_slow`` error
#: before the connection is cut anyway (a client that stopped reading never lets it finish).
SLOW_GRACE_S: Final = 1.0
#: How long a connection ending for a reason it explains (rate, frame size, expired token) waits
#: for that error frame to go out before closing.
FLUSH_BEFORE_CLOSE_S: Final = 0.1
#: Longest wait for a close frame to go out to a client that may not be reading.
CLOSE_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class WsLimits:
    """Per-connection limits of the live feed."""

    max_frame_bytes: int = 64 * 1024
    #: Client messages per second allowed on average, and the burst above it.
    rate_per_s: float = 10.0
    burst: int = 40
    max_channels: int = 500
    auth_timeout_s: float = 10.0
    ping_interval_s: float = 20.0


def error(code: str, message: str, **extra: Any) -> str:
    return dumps({"type": "error", "code": code, "message": message, **extra})


def auth_ok(principal: Principal) -> str:
    return dumps(
        {
            "type": "auth_ok",
            "sub": principal.subject,
            "role": principal.role,
            "commune": principal.commune,
            "expires_at": principal.expires_at.isoformat() if principal.expires_at else None,
        }
    )
