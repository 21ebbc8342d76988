"""sam_if tests: tiny float64 problems; one intra-op thread (small ops are far slower with contended threads)."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every sam_if test runs on one thread (``one_thread``: tests/conftest.py)."""
