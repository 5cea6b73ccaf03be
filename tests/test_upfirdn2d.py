"""upfirdn2d's GPU kernels (tiled and general, emulated on the CPU) and CPU kernels against the reference."""
import pytest
import torch

import ops.upfirdn2d as upfirdn2d_module
from ops import dispatch
from ops.upfirdn2d import setup_filter, upfirdn2d, upfirdn2d_ref

pytestmark = pytest.mark.usefixtures("fused_one_thread")

# Test shapes: odd sizes so that tiles and channel groups have partial edges, and at least two tiles along each axis
# for every variant (contiguous tiles are 64 or 32 wide and 16 high, channels-last ones 8 x 8).
CL_CHANNELS = 21  # channels-last: one full and one partial group for every dtype's channel block (8, 16 or 32)
SIZE = {False: (45, 79), True: (11, 13)}

# (up, down, taps, separable, padding) of each tiled variant's calls in training, by variant id (upfirdn2d.h).
VARIANTS = {
    0: (1, 1, 1, False, (1, 2, -1, 3)),   # 1x1 pad-only (crop on one side)
    1: (1, 1, 4, False, (2, 1, 2, 1)),    # 4-tap filter after G's transposed conv / before D's strided conv
    2: (2, 1, 4, False, (2, 1, 2, 1)),    # upsample2d
    3: (1, 2, 4, False, (1, 1, 1, 1)),    # downsample2d / D skip
    4: (1, 1, 4, True, (1, 2, 2, 1)),
    5: (2, 1, 4, True, (2, 1, 2, 1)),
    6: (1, 2, 4, True, (1, 1, 1, 1)),
    7: (2, 1, 12, True, (6, 5, 6, 5)),    # ADA: upsample2d with the 12-tap filter
    8: (1, 2, 12, True, (0, 0, 0, 0)),    # ADA: 'valid' decimation with the 12-tap filter
}

# Largest relative rounding step (unit roundoff) of each dtype's output.
EPS = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@pytest.fixture(scope="module")
def ext():
    dispatch.reset()
    return dispatch.load("upfirdn2d", "cpu")




# Input and filter of variant v (channels-last ids are the contiguous id + 10) in dtype.
def _case(v, dtype, cl, seed=0):
    up, down, taps, sep, pad = VARIANTS[v]
    g = torch.Generator().manual_seed(seed + v)
    x = torch.randn(2, CL_CHANNELS if cl else 2, *SIZE[cl], generator=g, dtype=torch.float64).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    f = torch.randn(*((taps,) if sep else (taps, taps)), generator=g, dtype=torch.float64)
    return x, f, up, down, pad


# One call of the extension with the same factors on both axes; path 2/3: the GPU's general/tiled kernels emulated.
def _kernel(ext, x, f, up, down, pad, flip, gain, path):
    return ext.upfirdn2d(x, f, up, up, down, down, *pad, flip, gain, path)


# The reference in float64 on the same (rounded) input, and the same with |x| and |f|: the kernel accumulates in
# float (double for double) and rounds once to the output dtype, so |y - ref| <= eps(dtype) |ref| (or half a
# subnormal step, eps(dtype) * tiny) plus the accumulation errors of kernel and reference, each at most (taps + 2)
# roundings of sum |w x| (2^-24 each in float, 2^-53 in double; the cases here sum at most 24 taps: 2 * 26 < 2^8).
def _bound(x, f, up, down, pad, flip, gain):
    r = upfirdn2d_ref(x.double(), f.double(), (up, up), (down, down), pad, flip, gain)
    s = upfirdn2d_ref(x.double().abs(), f.double().abs(), (up, up), (down, down), pad, flip, abs(gain))
    acc = 2.0 ** -53 if x.dtype == torch.float64 else 2.0 ** -24
    return r, EPS[x.dtype] * (r.abs() + torch.finfo(x.dtype).tiny) + 2 ** 8 * acc * s


# Every tiled variant is the one the host picks for its training call, in both layouts where it exists.
def test_variant_selection(ext):
    for v, (up, down, taps, sep, _) in VARIANTS.items():
        assert ext.tiled_variant(up, up, down, down, taps, taps, 1 if sep else 2, False) == v
        assert ext.tiled_variant(up, up, down, down, taps, taps, 1 if sep else 2, True) == (v + 10 if taps < 12
                                                                                          else -1)
    # Rare shapes go to the general kernel: anisotropic factors, non-square filters, other tap counts, up 3.
    for args in [(2, 1, 1, 1, 4, 4, 2), (1, 1, 1, 1, 3, 5, 2), (1, 1, 1, 1, 6, 6, 1), (3, 3, 1, 1, 4, 4, 1)]:
        assert ext.tiled_variant(*args, False) == -1


# Tiled kernels (path 3) and the general kernel (path 2), emulated, against the float64 reference: every variant,
# both layouts, both filter orientations, every dtype the GPU kernels take.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cl", [False, True])
def test_gpu_kernels_match_reference(ext, dtype, cl):
    for v in VARIANTS:
        if cl and VARIANTS[v][2] == 12:
            continue
        x, f, up, down, pad = _case(v, dtype, cl)
        for flip, gain in [(False, 1.0), (True, 2.5)]:
            r, bound = _bound(x, f, up, down, pad, flip, gain)
            for path in (2, 3):
                y = _kernel(ext, x, f, up, down, pad, flip, gain, path)
                assert y.dtype == dtype and y.shape == r.shape
                assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
                err = (y.double() - r).abs()
                assert (err <= bound).all(), (v, dtype, cl, flip, path, (err / bound).max().item())


# Channels-last, strided and expanded inputs are read in place and give bit-identical results to the contiguous
# input, kernel by kernel (each output sums the same taps in the same order in every tile shape).
def test_gpu_kernels_layouts_exact(ext):
    for v in (1, 2, 3, 5, 6, 7, 8):
        x, f, up, down, pad = _case(v, torch.float32, False)
        x = x.repeat(1, 5, 1, 1)
        want = {path: _kernel(ext, x.contiguous(), f, up, down, pad, False, 1.5, path) for path in (2, 3)}
        views = {"channels_last": x.contiguous(memory_format=torch.channels_last),
                 "transposed": x.transpose(2, 3).contiguous().transpose(2, 3),
                 "strided": torch.stack([x, -x], dim=-1)[..., 0]}
        for name, xv in views.items():
            if name == "channels_last" and VARIANTS[v][2] == 12:
                continue  # no channels-last tile for 12 taps: the general kernel sums them in another order
            for path in (2, 3):
                assert torch.equal(_kernel(ext, xv, f, up, down, pad, False, 1.5, path), want[path]), (v, name, path)
    x = torch.randn(2, 1, 1, 1).expand(2, 6, 9, 9)  # a gradient of a sum arrives expanded
    f = torch.randn(4, 4)
    y = _kernel(ext, x, f, 1, 2, (1, 1, 1, 1), False, 1.0, 3)
    assert torch.equal(y, _kernel(ext, x.contiguous(), f, 1, 2, (1, 1, 1, 1), False, 1.0, 3))


# The filter is read as it is: a float16, bfloat16 or float64 filter gives exactly the result of its float32 value.
def test_gpu_kernels_filter_dtypes(ext):
    x, f, up, down, pad = _case(5, torch.float32, True)
    for ft in (f.half(), f.bfloat16(), f.double()):
        want = _kernel(ext, x, ft.float(), up, down, pad, True, 2.0, 3)
        assert torch.equal(_kernel(ext, x, ft, up, down, pad, True, 2.0, 3), want), ft.dtype


# First and second derivatives through the tiled kernels (path 3) and the CPU kernels (path 0), both layouts:
# the backward is the same op with up/down swapped, so it runs the partner variant.
@pytest.mark.parametrize("path", [0, 3])
@pytest.mark.parametrize("v", [2, 3, 5, 7, 8])
def test_gradcheck(ext, path, v):
    upfirdn2d_module.upfirdn2d_cpu_path = path
    up, down, taps, sep, pad = VARIANTS[v]
    g = torch.Generator().manual_seed(v)
    f = torch.randn(*((taps,) if sep else (taps, taps)), generator=g, dtype=torch.float64)
    size = 5 if taps < 12 else (6 if up == 2 else 14)
    for cl in ([False, True] if taps < 12 else [False]):
        x = torch.randn(1, 3, size, size + 1, generator=g, dtype=torch.float64)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        fn = lambda x: upfirdn2d(x, f, up=up, down=down, padding=pad, gain=1.5, impl="fused")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


# The CPU kernels (path 0) at training's shapes in both layouts: float64 to rounding, float32 within the bound;
# channels-last in, channels-last out.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_kernels_training_shapes(ext, dtype):
    f4 = setup_filter([1, 3, 3, 1]).double()
    f12 = setup_filter(torch.randn(12, generator=torch.Generator().manual_seed(1)).abs())
    calls = [(f4, 1, 1, (2, 1, 2, 1), False, 4.0), (f4, 1, 1, (2, 2, 2, 2), False, 1.0),
             (f4, 1, 2, (1, 1, 1, 1), False, 1.0), (f4, 2, 1, (2, 1, 2, 1), False, 4.0),
             (f12.double(), 2, 1, (6, 5, 6, 5), False, 4.0), (f12.double(), 1, 2, (0, 0, 0, 0), True, 1.0),
             (torch.ones(1, 1, dtype=torch.float64), 1, 1, (1, 0, 0, 1), False, 1.0)]
    for cl in (False, True):
        x = torch.randn(2, 24, 16, 16, dtype=torch.float64).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        for f, up, down, pad, flip, gain in calls:
            y = _kernel(ext, x, f, up, down, pad, flip, gain, 0)
            if cl:
                y = y.contiguous(memory_format=torch.channels_last)
            r, bound = _bound(x, f, up, down, pad, flip, gain)
            assert ((y.double() - r).abs() <= bound).all(), (tuple(f.shape), up, down, cl)

