"""Shared fixtures: a fresh zmqfork Context per test, torn down without hanging; the CI skip guard."""

from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import zmqfork  # noqa: E402
from forking import kill_leftover_children  # noqa: E402

# Under CI (or --allowed-skips FILE), a skip or xfail the allow-list gives no reason for fails the run.
from skipguard import pytest_addoption, pytest_configure  # noqa: E402, F401


@pytest.fixture(autouse=True)
def no_child_left_behind() -> Iterator[None]:
    """After every test, even one interrupted by a timeout, kill the children it did not reap."""
    yield
    leftovers = kill_leftover_children()
    assert not leftovers, f"{leftovers} forked child(ren) were still running after the test"


@pytest.fixture
def ctx() -> Iterator[zmqfork.Context]:
    """A zmqfork Context destroyed with linger 0 after the test."""
    context = zmqfork.Context()
    yield context
    context.destroy(linger=0)
