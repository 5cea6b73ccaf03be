"""Shared test fixtures."""
import pytest
import torch


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
