"""Fixtures for the integration tests (helpers live in tests/harness.py)."""

from harness import workdir

__all__ = ["workdir"]
