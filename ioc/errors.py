"""The exception hierarchy of the project.

IocError
 ├── ConfigurationError      settings or registry files that cannot be used
 ├── InvalidEvent            a record that fails validation (goes to the dead-letter topic)
 ├── EmbeddedServiceError    the embedded broker or PostgreSQL could not be started
 └── AuthError               a token that is missing, malformed, expired or not trusted
      └── Forbidden          a valid caller asking for something outside its rights
"""

from __future__ import annotations


class IocError(Exception):
    """Base class of every error raised by this project."""


class ConfigurationError(IocError, ValueError):
    """Settings or registry data that cannot be used as given."""


class InvalidEvent(IocError):
    """A record that does not satisfy its schema; ``stage`` and ``reason`` go into dead-letter headers."""

    def __init__(self, reason: str, *, stage: str = "validate", field: str | None = None) -> None:
        self.reason = reason
        self.stage = stage
        self.field = field
        super().__init__(f"{field}: {reason}" if field else reason)


class EmbeddedServiceError(IocError, RuntimeError):
    """The embedded broker or database did not start."""


class AuthError(IocError):
    """A token that is missing, malformed, expired or signed with an unknown key."""


class Forbidden(AuthError):
    """An authenticated caller asking for data outside its role or commune."""
