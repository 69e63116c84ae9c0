"""Every use of a third-party library's internals, one module per library (each says what it assumes).

A module here relies on something its library does not promise (a private class, an attribute,
how a coroutine behaves); `SUPPORTED` is the version range it was checked against (pinned the same
in pyproject.toml) and `problems()` lists, in words, each assumption the installed version breaks.
tests/unit/test_compat.py fails with those words on an upgrade that breaks one.
"""
