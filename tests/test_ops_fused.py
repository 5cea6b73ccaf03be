"""Fused C++ ops against the reference: values, 1st/2nd-order gradients, layouts, dispatch, build failures, CUDA build."""
import fcntl
import itertools
import os
import shutil
import warnings

import pytest
import torch
from torch.utils import cpp_extension

import ops.upfirdn2d as upfirdn2d_module
from ops import _build, dispatch
from ops.bias_act import activation_funcs, bias_act
from ops.modulated_conv import modulated_conv2d
from ops.upfirdn2d import setup_filter, upfirdn2d

pytestmark = pytest.mark.usefixtures("fused_one_thread")

FORCE = "GANFORGE_OPS_FORCE_BUILD_FAILURE"


# Build (or load from the cache, keyed by a hash of the sources) the CPU extensions once for this module, both at
# once.
@pytest.fixture(scope="module")
def exts():
    saved = os.environ.pop(FORCE, None)
    dispatch.reset()
    modules = dispatch.load_all("cpu")
    for op, m in modules.items():
        assert not isinstance(m, Exception), f"building the CPU {op} extension failed: {m}"
    yield modules
    if saved is not None:
        os.environ[FORCE] = saved
    dispatch.reset()




# Forward output and gradients (w.r.t. every input that requires grad) of fn for a fixed random output gradient.
def _fwd_bwd(fn, inputs, impl, seed=0):
    xs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    y = fn(*xs, impl=impl)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    grads = torch.autograd.grad(y, [x for x in xs if x is not None], gy)
    return y, grads


# Assert fused and reference agree on values and gradients.
def _assert_parity(fn, inputs, atol, msg=""):
    (yr, gr), (yf, gf) = _fwd_bwd(fn, inputs, "ref"), _fwd_bwd(fn, inputs, "fused")
    assert yf.shape == yr.shape, msg
    torch.testing.assert_close(yf, yr, atol=atol, rtol=0, msg=lambda m: f"forward {msg}: {m}")
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"backward {msg}: {m}")


# --------------------------------------------------------------------------------------------------------------
# upfirdn2d

# Every up/down factor in 1..4 with 1-D filters of 1..6 taps, separable and non-separable 2-D filters, positive and
# negative padding, flip and gain; for each CPU kernel (fastest, direct 2-D, and the per-output CUDA code path).
@pytest.mark.parametrize("path", [0, 1, 2])
def test_upfirdn2d_matches_reference_grid(exts, path):
    upfirdn2d_module.upfirdn2d_cpu_path = path
    g = torch.Generator().manual_seed(1)
    filters = [torch.randn(n, generator=g, dtype=torch.float64) for n in range(1, 7)]
    filters += [torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64),
                setup_filter([1, 3, 3, 1]).double(), setup_filter([1, 2, 1]).double(), torch.ones(1, 1).double()]
    pads = [(0, 0, 0, 0), (2, 1, 1, 2), (-1, 2, 3, -2), (1, -1, 0, 1)]
    count = 0
    for (up, down), f in itertools.product(itertools.product((1, 2, 3, 4), repeat=2), filters):
        pad = pads[count % len(pads)]
        kw = dict(up=up, down=down, padding=pad, flip_filter=bool(count % 3 == 1), gain=(1.0, 2.5)[count % 2])
        count += 1
        x = torch.randn(1, 2, 7, 6, generator=g, dtype=torch.float64)
        fw, fh = (f.shape[0], f.shape[0]) if f.ndim == 1 else (f.shape[1], f.shape[0])
        if 6 * up + pad[0] + pad[1] < fw or 7 * up + pad[2] + pad[3] < fh:
            continue
        _assert_parity(lambda x, impl: upfirdn2d(x, f, impl=impl, **kw), [x], 1e-12, f"{tuple(f.shape)} {kw}")
    assert count == 176


# The vectorized float32 fast paths (fixed tap counts up to 8, padded planes, separable 2-D filters detected as
# rank one) and the generic fallback (more than 8 taps) on larger planes, at float32 tolerance.
def test_upfirdn2d_fast_paths_float32(exts):
    g = torch.Generator().manual_seed(2)
    for taps, up, down, pad in [(4, 1, 1, 2), (4, 1, 1, 1), (7, 1, 1, 3), (8, 1, 2, 3), (4, 2, 1, (2, 1, 2, 1)),
                                (4, 1, 2, 1), (9, 1, 1, 4), (12, 2, 2, 5), (3, 1, 1, (0, -1, 2, 0)), (5, 3, 1, 2)]:
        for sep in (False, True):
            f = setup_filter(torch.rand(taps, generator=g) + 0.1, separable=sep)
            x = torch.randn(2, 3, 37, 41, generator=g)
            kw = dict(up=up, down=down, padding=pad, gain=1.5)
            _assert_parity(lambda x, impl: upfirdn2d(x, f, impl=impl, **kw), [x], 2e-5, f"{taps} {sep} {kw}")


# Anisotropic factors and padding.
def test_upfirdn2d_anisotropic(exts):
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    for f in (torch.randn(4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)):
        for up, down, pad in [((2, 1), (1, 3), (1, 2, 0, 1)), ((1, 3), (2, 1), (3, 0, -1, 2))]:
            _assert_parity(lambda x, impl: upfirdn2d(x, f, up=up, down=down, padding=pad, impl=impl), [x], 1e-12)


# First- and second-order gradients of the fused op (its backward is the same op, so any order works).
@pytest.mark.parametrize("f_shape,up,down,pad", [((4,), 2, 1, (2, 1, 2, 1)), ((3, 2), 1, 2, (1, -1, 0, 1)),
                                                 ((3,), 3, 2, (-1, 2, 1, 0)), ((4, 4), 1, 1, (2, 1, 1, 2))])
def test_upfirdn2d_gradcheck(exts, f_shape, up, down, pad):
    torch.manual_seed(3)
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    f = torch.randn(*f_shape, dtype=torch.float64)
    fn = lambda x: upfirdn2d(x, f, up=up, down=down, padding=pad, gain=1.5, impl="fused")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


# Non-contiguous and channels-last inputs give the reference values and gradients; channels-last stays channels-last.
def test_upfirdn2d_layouts(exts):
    f = setup_filter([1, 3, 3, 1]).double()
    base = torch.randn(2, 5, 12, 10, dtype=torch.float64)
    inputs = {"transposed": base.transpose(2, 3), "strided": base[:, ::2, 1::2, :],
              "channels_last": base.contiguous(memory_format=torch.channels_last)}
    for name, x in inputs.items():
        for kw in (dict(up=2, padding=(2, 1, 2, 1)), dict(down=2, padding=1), dict(padding=2)):
            _assert_parity(lambda x, impl: upfirdn2d(x, f, impl=impl, **kw), [x], 1e-12, f"{name} {kw}")
    y = upfirdn2d(inputs["channels_last"], f, down=2, padding=1, impl="fused")
    assert y.is_contiguous(memory_format=torch.channels_last)


# A filter that itself needs a gradient goes to the reference path, so its gradient is still right.
def test_upfirdn2d_filter_gradient(exts):
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    f0 = torch.randn(3, 3, dtype=torch.float64)
    fs = [f0.clone().requires_grad_(True) for _ in range(2)]
    ys = [upfirdn2d(x, f, up=2, padding=1, impl=impl) for f, impl in zip(fs, ("ref", "fused"))]
    gs = [torch.autograd.grad(y.square().sum(), f)[0] for y, f in zip(ys, fs)]
    torch.testing.assert_close(gs[1], gs[0])


# --------------------------------------------------------------------------------------------------------------
# bias_act

# Every activation, gain, alpha, clamp, bias dim, with and without bias, float64 and float32: values, first-order
# gradients (x and b) and second-order gradients (d/dx, d/db of sum(grad^2)) match the reference.
@pytest.mark.parametrize("act", sorted(activation_funcs))
def test_bias_act_matches_reference_grid(exts, act):
    g = torch.Generator().manual_seed(4)
    configs = [dict(), dict(gain=0.7, alpha=0.1), dict(clamp=0.8), dict(gain=2.0, clamp=5.0, alpha=0.3)]
    for dtype, (dim, kw), with_bias in itertools.product((torch.float64, torch.float32),
                                                         zip((1, 0, 2, 3), configs), (True, False)):
        x = torch.randn(3, 4, 5, 6, generator=g, dtype=dtype) * 2
        b = torch.randn(x.shape[dim], generator=g, dtype=dtype) if with_bias else None
        atol = 1e-12 if dtype == torch.float64 else 2e-5
        fn = lambda x, b, impl: bias_act(x, b, dim=dim, act=act, impl=impl, **kw)  # noqa: E731
        _assert_parity(fn, [x, b], atol, f"{dtype} dim={dim} {kw} bias={with_bias}")
        # Second order: d/d(x, b) of sum(dL/dx ^ 2).
        outs = []
        for impl in ("ref", "fused"):
            xs, bs = x.clone().requires_grad_(True), b.clone().requires_grad_(True) if b is not None else None
            inputs = [xs] + ([bs] if bs is not None else [])
            (gx,) = torch.autograd.grad(fn(xs, bs, impl).sin().sum(), xs, create_graph=True)
            outs.append(torch.autograd.grad(gx.square().sum(), inputs, allow_unused=True))
        for a, r in zip(outs[1], outs[0]):
            if a is None or r is None:  # piecewise-linear activations: no second derivative at all
                assert (a is None or not a.any()) and (r is None or not r.any())
            else:
                torch.testing.assert_close(a, r, atol=atol * 10, rtol=0, msg=lambda m: f"2nd order {dim} {kw}: {m}")


# gradcheck and gradgradcheck of the fused kernels in float64 (inputs kept away from kinks and the clamp edge).
@pytest.mark.parametrize("act", sorted(activation_funcs))
def test_bias_act_gradcheck(exts, act):
    torch.manual_seed(5)
    x = (torch.rand(2, 3, 4, dtype=torch.float64) + 0.2) * torch.sign(torch.randn(2, 3, 4, dtype=torch.float64))
    x.requires_grad_(True)
    b = torch.tensor([0.05, -0.05, 0.02], dtype=torch.float64, requires_grad=True)
    for kw in (dict(gain=1.3), dict(clamp=10.0, alpha=0.3)):
        fn = lambda x, b: bias_act(x, b, dim=1, act=act, impl="fused", **kw)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, b))
        assert torch.autograd.gradgradcheck(fn, (x, b))


# Non-contiguous, channels-last (bias along the innermost memory dim) and 2-D inputs match the reference.
def test_bias_act_layouts(exts):
    base = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    cases = {"transposed": (base.transpose(1, 3), 1), "strided": (base[:, ::2, :, 1::2], 1),
             "channels_last": (base.contiguous(memory_format=torch.channels_last), 1),
             "channels_last dim 2": (base.contiguous(memory_format=torch.channels_last), 2),
             "2-D [N, C]": (torch.randn(9, 13, dtype=torch.float64), 1), "3-D": (torch.randn(4, 3, 5).double(), 2)}
    for name, (x, dim) in cases.items():
        b = torch.randn(x.shape[dim], dtype=torch.float64)
        for act in ("lrelu", "swish"):
            fn = lambda x, b, impl: bias_act(x, b, dim=dim, act=act, clamp=1.0, impl=impl)  # noqa: E731
            _assert_parity(fn, [x, b], 1e-12, f"{name} {act}")


# Second derivatives through a non-dense input (a view the kernel must copy): the copy is made where autograd sees
# it, so d(grad)/dx reaches the view's base (it was silently zero for tanh/sigmoid/elu/selu/softplus/swish).
@pytest.mark.parametrize("act", ["tanh", "swish"])
def test_bias_act_second_derivative_of_a_view(exts, act):
    base = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    outs = {}
    for impl in ("ref", "fused"):
        xb, bb = base.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = bias_act(xb[:, :, ::2].transpose(2, 3), bb, act=act, impl=impl)
        (gx,) = torch.autograd.grad(y.square().sum(), xb, create_graph=True)
        outs[impl] = torch.autograd.grad(gx.square().sum(), [xb, bb])
    for a, r in zip(outs["fused"], outs["ref"]):
        assert r.abs().max() > 0
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


# With several OpenMP threads (large enough tensors to go parallel): values, the bias gradient summed across
# threads, and determinism from run to run.
def test_multithreaded_kernels(exts):
    torch.set_num_threads(2)
    x = torch.randn(4, 64, 32, 32)
    b = torch.randn(64)
    fn = lambda x, b, impl: bias_act(x, b, act="lrelu", clamp=2.0, impl=impl)  # noqa: E731
    _assert_parity(fn, [x, b], 1e-4)
    g1, g2 = (_fwd_bwd(fn, [x, b], "fused")[1] for _ in range(2))
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))
    f = setup_filter([1, 3, 3, 1])
    for kw in (dict(padding=2), dict(up=2, padding=(2, 1, 2, 1)), dict(down=2, padding=1)):
        _assert_parity(lambda x, impl: upfirdn2d(x, f, impl=impl, **kw), [x], 1e-5, str(kw))


# Without autograd (no_grad, or nothing requiring grad) the kernel is called directly: same values, no graph.
def test_inference_fast_path(exts):
    x, b = torch.randn(2, 3, 4, 4), torch.randn(3)
    f = setup_filter([1, 3, 3, 1])
    with torch.no_grad():
        y = bias_act(x.requires_grad_(True), b, act="lrelu", impl="fused")
        z = upfirdn2d(x, f, up=2, padding=(2, 1, 2, 1), impl="fused")
    assert y.grad_fn is None and z.grad_fn is None
    torch.testing.assert_close(y, bias_act(x.detach(), b, act="lrelu", impl="ref"))
    torch.testing.assert_close(z, upfirdn2d(x.detach(), f, up=2, padding=(2, 1, 2, 1), impl="ref"))


# The composite ops with every kernel fused (the default impl set as the training loop does): conv2d_resample and
# the modulated convolution match the reference in values and in first- and second-order gradients (R1's path).
@pytest.mark.parametrize("up,down", [(2, 1), (1, 2)])
def test_modulated_conv_with_fused_kernels(exts, up, down):
    torch.manual_seed(6)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    s = torch.rand(2, 3, dtype=torch.float64) + 0.5
    b = torch.randn(4, dtype=torch.float64)
    f = setup_filter([1, 3, 3, 1]).double()

    def layer(x, w, s, fused_modconv):
        y = modulated_conv2d(x, w, s, up=up, down=down, padding=1, resample_filter=f, fused_modconv=fused_modconv)
        return bias_act(y, b, act="lrelu", clamp=3.0)

    old = dispatch.default_impl()
    try:
        for fused_modconv in (True, False):
            outs = {}
            for impl in ("ref", "fused"):
                dispatch.set_default_impl(impl)
                xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
                y = layer(xs, ws, s, fused_modconv)
                (gx,) = torch.autograd.grad(y.square().sum(), xs, create_graph=True)
                outs[impl] = [y, gx, *torch.autograd.grad(gx.square().sum(), [xs, ws])]
            for a, r in zip(outs["fused"], outs["ref"]):
                torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)
        dispatch.set_default_impl("fused")
        xs, ws = x[:1, :, :4, :4].clone().requires_grad_(True), w.clone().requires_grad_(True)
        fn = lambda x, w: layer(x, w, s[:1], True)  # noqa: E731
        assert torch.autograd.gradgradcheck(fn, (xs, ws))
    finally:
        dispatch.set_default_impl(old)


# --------------------------------------------------------------------------------------------------------------
# Dispatch and build failures

# Run ops under `auto` with a forced build failure: one warning per op naming the reason, reference results.
def test_forced_build_failure_warns_once_and_uses_reference(exts, monkeypatch):
    monkeypatch.setenv(FORCE, "1")
    dispatch.reset()
    x, b, f = torch.randn(2, 3, 8, 8), torch.randn(3), setup_filter([1, 3, 3, 1])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ys = [bias_act(x, b, act="lrelu", impl="auto") for _ in range(3)]
            zs = [upfirdn2d(x, f, down=2, padding=1, impl="auto") for _ in range(3)]
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 2, messages
        assert all(FORCE in m and "reference" in m for m in messages)
        assert {m.split(":")[0] for m in messages} == {"ops.bias_act", "ops.upfirdn2d"}
        assert torch.equal(ys[0], bias_act(x, b, act="lrelu", impl="ref"))
        assert torch.equal(zs[0], upfirdn2d(x, f, down=2, padding=1, impl="ref"))
    finally:
        monkeypatch.delenv(FORCE)
        dispatch.reset()
    assert torch.allclose(bias_act(x, b, act="lrelu", impl="auto"), ys[0])  # built again after the reset


# impl='fused' (per call or as the default) with a failed build raises with the reason instead of falling back.
def test_fused_with_failed_build_raises(exts, monkeypatch):
    monkeypatch.setenv(FORCE, "upfirdn2d")
    dispatch.reset()
    x, f = torch.randn(1, 2, 6, 6), setup_filter([1, 2, 1])
    old = dispatch.default_impl()
    try:
        with pytest.raises(RuntimeError, match=f"impl='fused'.*|{FORCE}") as info:
            upfirdn2d(x, f, impl="fused")
        assert FORCE in str(info.value) and "impl='fused'" in str(info.value)
        dispatch.set_default_impl("fused")
        with pytest.raises(RuntimeError, match=FORCE):
            upfirdn2d(x, f)
        assert bias_act(x, act="lrelu").shape == x.shape  # only upfirdn2d is forced to fail
    finally:
        dispatch.set_default_impl(old)
        monkeypatch.delenv(FORCE)
        dispatch.reset()


# Bad impl names are rejected; a dtype the CPU kernels lack falls back under auto (one warning) and raises under fused.
def test_impl_validation_and_unsupported_dtype(exts):
    with pytest.raises(ValueError, match="auto"):
        dispatch.set_default_impl("fast")
    with pytest.raises(ValueError, match="impl"):
        bias_act(torch.zeros(2, 3), impl="cuda")
    dispatch.reset()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = bias_act(x, act="relu", impl="auto")
    assert len(caught) == 1 and "float16" in str(caught[0].message)
    assert torch.equal(y, bias_act(x, act="relu", impl="ref"))
    with pytest.raises(RuntimeError, match="float16"):
        bias_act(x, act="relu", impl="fused")
    dispatch.reset()


# A compiler error names the first error line and the build log (which holds the full output); the failure is
# remembered for the process until reset, and ninja or nvcc missing is reported as such.
def test_build_errors_name_their_cause(exts, tmp_path, monkeypatch):
    monkeypatch.setenv("GANFORGE_OPS_CACHE", str(tmp_path))
    bad = tmp_path / "bad_op.cpp"
    bad.write_text("int broken( { return deliberately_undefined; }\n")
    try:
        with pytest.raises(_build.BuildError, match="error") as info:
            _build.load_extension("bad_op", [str(bad)], cuda=False)
        log = str(info.value).split("full log: ")[1].rstrip(")")
        assert os.path.isfile(log) and "deliberately_undefined" in open(log).read()
        assert str(tmp_path) in log
        with pytest.raises(_build.BuildError) as again:  # cached: no second compile
            _build.load_extension("bad_op", [str(bad)], cuda=False)
        assert str(again.value) == str(info.value)
        _build.reset_cache()
        monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
        with pytest.raises(_build.BuildError, match="ninja"):
            _build.load_extension("bad_op", [str(bad)], cuda=False)
        monkeypatch.undo()
        monkeypatch.setenv("GANFORGE_OPS_CACHE", str(tmp_path))
        monkeypatch.setattr(_build, "find_cuda_home", lambda: None)
        with pytest.raises(_build.BuildError, match="nvcc"):
            _build.load_extension("bad_op", [str(bad)], cuda=True)
    finally:
        _build.reset_cache()


# The cache key changes with sources and flags (and building leaves the flag lists untouched, so it is stable);
# the build lock excludes a second holder.
def test_build_key_and_lock(exts, tmp_path, monkeypatch):
    assert _build.LDFLAGS == ["-fopenmp"] and _build.CUDA_CFLAGS[-1] == "-DGF_WITH_CUDA"
    src = tmp_path / "a.cpp"
    src.write_text("int a;\n")
    k1 = _build._build_key("x", [str(src)], False, None)
    assert k1 == _build._build_key("x", [str(src)], False, None)
    src.write_text("int a = 1;\n")
    k2 = _build._build_key("x", [str(src)], False, None)
    monkeypatch.setattr(_build, "CFLAGS", _build.CFLAGS + ["-DX"])
    k3 = _build._build_key("x", [str(src)], False, None)
    assert len({k1, k2, k3}) == 3
    lock = tmp_path / "b.lock"
    with _build._file_lock(lock):
        with open(lock) as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock) as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released


_NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


# The CUDA sources compile (nvcc, for sm_90) and the extensions import, on a machine without a GPU (both
# extensions at once, one compile job each).
@pytest.mark.skipif(_NVCC is None, reason="nvcc not found (no CUDA toolkit): cannot compile the CUDA kernels")
def test_cuda_sources_compile_and_import(exts, monkeypatch):
    home = os.path.dirname(os.path.dirname(os.path.realpath(_NVCC)))
    monkeypatch.setenv("CUDA_HOME", home if os.path.isfile(os.path.join(home, "bin", "nvcc")) else "/usr/local/cuda")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setenv("MAX_JOBS", "1")
    for op, module in dispatch.load_all("cuda").items():
        assert not isinstance(module, Exception), f"building the CUDA {op} extension failed: {module}"
        assert module.has_cuda()
        assert os.path.basename(module.__file__).startswith(f"gf_{op}_cuda_")
