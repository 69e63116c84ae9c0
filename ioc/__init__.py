"""Shared pieces of the IOC backend: settings, registries, the database schema, the embedded stack and the CLI."""
