"""Fixtures shared by the unit and integration tests (the run's set-up is in the root conftest.py)."""

import pytest
from helpers import assert_trees_close


@pytest.fixture
def trees_close():
    return assert_trees_close
