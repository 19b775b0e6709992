"""Shared fixtures: a fresh zmqfork Context per test, torn down without hanging."""

from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import zmqfork  # noqa: E402


@pytest.fixture
def ctx() -> Iterator[zmqfork.Context]:
    """A zmqfork Context destroyed with linger 0 after the test."""
    context = zmqfork.Context()
    yield context
    context.destroy(linger=0)
