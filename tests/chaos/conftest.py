"""The `caduceus_factory` fixture (tests/harness.py) for these tests."""

from tests.harness import caduceus_factory

__all__ = ["caduceus_factory"]
