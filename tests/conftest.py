"""CUDA cases are decided at test time (never at import), so the suite collects and skips cleanly without a GPU."""

import pytest
import torch


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
