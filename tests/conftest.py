"""Shared test fixtures."""
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
# The repository root (test modules import scripts/ as a package) and tests/ (helpers.py, the workers) on the path.
sys.path[:0] = [str(HERE.parent), str(HERE)]


# Never touch the network and never see a developer's real cache or detector: offline, the cache in tmp_path, and a
# download attempt fails the test.
@pytest.fixture
def no_downloads(monkeypatch, tmp_path):
    from training.eval import inception_weights
    from training.io import weights
    monkeypatch.setenv("GANFORGE_OFFLINE", "1")
    monkeypatch.setenv("GANFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GANFORGE_INCEPTION", raising=False)

    def no_network(*a, **k):
        raise AssertionError("test tried to download")
    monkeypatch.setattr(weights, "transfer", no_network)
    monkeypatch.setattr(inception_weights, "fetch_wheel_member", no_network)


# The reference ops on one intra-op thread: for tests of code that must not depend on (or wait for the build of) the
# fused kernels; on the shared 2-core machine, two threads run several times slower than one for small tensors.
@pytest.fixture
def ref_ops_one_thread():
    from ops import dispatch
    old, threads = dispatch.default_impl(), torch.get_num_threads()
    dispatch.set_default_impl("ref")
    torch.set_num_threads(1)
    yield
    dispatch.set_default_impl(old)
    torch.set_num_threads(threads)


# Fused-kernel tests on one intra-op thread (tests that need OpenMP threads set them), with upfirdn2d's CPU kernel
# path reset to the default (0) afterwards.
@pytest.fixture
def fused_one_thread():
    from ops import upfirdn2d
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    upfirdn2d.upfirdn2d_cpu_path = 0
