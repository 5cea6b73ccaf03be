"""Reference ops (upfirdn2d, bias_act, conv2d_resample, modulated_conv2d) against independent computations."""
import itertools
import math

import numpy as np
import pytest
import scipy.signal
import torch

from ops.bias_act import activation_funcs, bias_act
from ops.conv2d_resample import conv2d_resample, conv2d_resample_ref
from ops.modulated_conv import modulated_conv2d
from ops.upfirdn2d import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d


pytestmark = pytest.mark.usefixtures("ref_ops_one_thread")


# --------------------------------------------------------------------------------------------------------------
# Independent numpy implementations.

# 1-D upfirdn along `axis` via scipy: full convolution of the zero-inserted signal, then the padded/strided window.
def _upfirdn1d_np(x, f, up, down, p0, p1, axis):
    full = scipy.signal.upfirdn(f, x, up=up, down=1, axis=axis)
    n, fw = x.shape[axis], len(f)
    out_len = (n * up + p0 + p1 - fw) // down + 1
    idx = np.arange(out_len) * down + fw - 1 - p0  # output i reads full[i*down + fw-1-p0] (0 outside the signal)
    valid = (idx >= 0) & (idx < full.shape[axis])
    out = np.zeros(x.shape[:axis] + (out_len,) + x.shape[axis + 1:])
    src = np.take(full, idx[valid], axis=axis)
    sl = [slice(None)] * x.ndim
    sl[axis] = np.nonzero(valid)[0]
    out[tuple(sl)] = src
    return out


# Zero-insert, pad (negative crops) an [N, C, H, W] numpy array.
def _upsample_pad_np(x, upx, upy, px0, px1, py0, py1):
    n, c, h, w = x.shape
    z = np.zeros((n, c, h * upy, w * upx))
    z[:, :, ::upy, ::upx] = x
    z = np.pad(z, [(0, 0), (0, 0), (max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0))])
    return z[:, :, max(-py0, 0): z.shape[2] - max(-py1, 0), max(-px0, 0): z.shape[3] - max(-px1, 0)]


# 2-D upfirdn with a 2-D filter via scipy.signal.convolve2d (a true convolution), per image.
def _upfirdn2d_conv2d_np(x, f2, upx, upy, downx, downy, px0, px1, py0, py1):
    z = _upsample_pad_np(x, upx, upy, px0, px1, py0, py1)
    out = np.stack([np.stack([scipy.signal.convolve2d(zc, f2, mode="valid") for zc in zn]) for zn in z])
    return out[:, :, ::downy, ::downx]


# 2-D upfirdn by explicit loops over output pixels and taps (tiny shapes only).
def _upfirdn2d_loops_np(x, f2, up, down, px0, px1, py0, py1):
    n, c, h, w = x.shape
    fh, fw = f2.shape
    oh = (h * up + py0 + py1 - fh) // down + 1
    ow = (w * up + px0 + px1 - fw) // down + 1
    out = np.zeros((n, c, oh, ow))
    for oy, ox, ky, kx in itertools.product(range(oh), range(ow), range(fh), range(fw)):
        # Position in the zero-inserted image; the true convolution pairs window tap (ky, kx) with f[fh-1-ky, fw-1-kx].
        uy, ux = oy * down + ky - py0, ox * down + kx - px0
        if 0 <= uy < h * up and 0 <= ux < w * up and uy % up == 0 and ux % up == 0:
            out[:, :, oy, ox] += x[:, :, uy // up, ux // up] * f2[fh - 1 - ky, fw - 1 - kx]
    return out


# Valid 2-D correlation (flip_weight=True) or true convolution of x [N, C, H, W] with w [O, C/g, kh, kw], by loops.
def _conv_np(x, w, groups=1, flip_weight=True):
    if not flip_weight:
        w = w[:, :, ::-1, ::-1]
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    out = np.zeros((n, o, h - kh + 1, wd - kw + 1))
    for g in range(groups):
        xs = x[:, g * cg:(g + 1) * cg]
        for ky, kx in itertools.product(range(kh), range(kw)):
            win = xs[:, :, ky:ky + out.shape[2], kx:kx + out.shape[3]]
            out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", win, w[g * og:(g + 1) * og, :, ky, kx])
    return out


# --------------------------------------------------------------------------------------------------------------
# upfirdn2d

# Separable (1-D) filters: upfirdn2d equals scipy.signal.upfirdn along x then y, over the whole parameter grid.
def test_upfirdn2d_separable_matches_scipy_grid():
    rng = np.random.default_rng(0)
    pads = [(0, 0, 0, 0), (1, 2, 2, 1), (-1, 0, 2, -2), (3, -1, -1, 3)]
    count = 0
    for up, down, fw in itertools.product((1, 2, 3, 4), (1, 2, 3, 4), range(1, 7)):
        pad = pads[count % len(pads)]
        flip = bool(count % 2)
        gain = (1.0, 2.5)[(count // 2) % 2]
        count += 1
        x = rng.standard_normal((2, 3, 5, 6))
        taps = rng.standard_normal(fw)
        px0, px1, py0, py1 = pad
        if (6 * up + px0 + px1 - fw) < 0 or (5 * up + py0 + py1 - fw) < 0:
            continue
        f = torch.tensor(taps)
        y = upfirdn2d(torch.tensor(x), f, up=up, down=down, padding=pad, flip_filter=flip, gain=gain)
        t = taps[::-1] if flip else taps
        e = _upfirdn1d_np(x, t, up, down, px0, px1, axis=3)
        e = _upfirdn1d_np(e, t, up, down, py0, py1, axis=2) * gain
        assert y.shape == e.shape, (up, down, fw, pad)
        np.testing.assert_allclose(y.numpy(), e, rtol=1e-10, atol=1e-10, err_msg=str((up, down, fw, pad, flip)))
    assert count == 96


# Anisotropic factors: different up/down along x and y still match scipy per axis.
@pytest.mark.parametrize("up,down,pad", [((2, 1), (1, 3), (1, 0, 2, 2)), ((1, 3), (2, 1), (0, -1, 3, 1))])
def test_upfirdn2d_anisotropic_matches_scipy(up, down, pad):
    rng = np.random.default_rng(1)
    x, taps = rng.standard_normal((1, 2, 7, 6)), rng.standard_normal(3)
    y = upfirdn2d(torch.tensor(x), torch.tensor(taps), up=up, down=down, padding=pad)
    e = _upfirdn1d_np(x, taps, up[0], down[0], pad[0], pad[1], axis=3)
    e = _upfirdn1d_np(e, taps, up[1], down[1], pad[2], pad[3], axis=2)
    np.testing.assert_allclose(y.numpy(), e, rtol=1e-10, atol=1e-10)


# 2-D (non-separable, non-square) filters: upfirdn2d equals zero insertion + padding + scipy convolve2d + stride.
def test_upfirdn2d_2d_filter_matches_convolve2d_grid():
    rng = np.random.default_rng(2)
    pads = [(0, 0, 0, 0), (2, 1, 1, 2), (-1, 2, 0, -1)]
    count = 0
    for up, down, (fh, fw) in itertools.product((1, 2, 3, 4), (1, 2, 3, 4), [(1, 1), (2, 3), (4, 4), (5, 2), (6, 5)]):
        pad = pads[count % len(pads)]
        flip, gain = bool(count % 2), (1.0, 0.5)[(count // 2) % 2]
        count += 1
        x, f2 = rng.standard_normal((1, 2, 4, 5)), rng.standard_normal((fh, fw))
        px0, px1, py0, py1 = pad
        if (5 * up + px0 + px1 - fw) < 0 or (4 * up + py0 + py1 - fh) < 0:
            continue
        y = upfirdn2d(torch.tensor(x), torch.tensor(f2), up=up, down=down, padding=pad, flip_filter=flip, gain=gain)
        e = _upfirdn2d_conv2d_np(x, f2[::-1, ::-1] if flip else f2, up, up, down, down, *pad) * gain
        np.testing.assert_allclose(y.numpy(), e, rtol=1e-10, atol=1e-10, err_msg=str((up, down, fh, fw, pad)))


# The same 2-D case by explicit loops over taps (independent of scipy).
@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 1, 1, 1)), (2, 1, (2, 1, 1, 2)), (1, 2, (0, 1, -1, 2)),
                                         (3, 2, (1, -1, 2, 0))])
def test_upfirdn2d_2d_filter_matches_loops(up, down, pad):
    rng = np.random.default_rng(3)
    x, f2 = rng.standard_normal((1, 2, 4, 3)), rng.standard_normal((3, 2))
    y = upfirdn2d(torch.tensor(x), torch.tensor(f2), up=up, down=down, padding=pad)
    np.testing.assert_allclose(y.numpy(), _upfirdn2d_loops_np(x, f2, up, down, *pad), rtol=1e-10, atol=1e-10)


# A 1-D filter and its 2-D outer product give the same result (setup_filter's two forms agree).
def test_upfirdn2d_separable_equals_outer_product():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    f1 = setup_filter([1, 3, 3, 1], separable=True).double()
    f2 = setup_filter([1, 3, 3, 1]).double()
    assert f1.ndim == 1 and f2.ndim == 2
    for up, down in [(1, 1), (2, 1), (1, 2)]:
        a = upfirdn2d(x, f1, up=up, down=down, padding=2, gain=3.0)
        b = upfirdn2d(x, f2, up=up, down=down, padding=2, gain=3.0)
        torch.testing.assert_close(a, b)


# An empty output is rejected with a message instead of a cryptic conv error.
def test_upfirdn2d_rejects_empty_output():
    with pytest.raises(ValueError, match="empty"):
        upfirdn2d(torch.zeros(1, 1, 2, 2), torch.ones(5), padding=-1)


# --------------------------------------------------------------------------------------------------------------
# upsample2d / downsample2d / filter2d

# Output sizes: in*up, in/down, and unchanged for filter2d, for odd and even filters.
@pytest.mark.parametrize("taps", [[1], [1, 1], [1, 2, 1], [1, 3, 3, 1], [1, 4, 6, 4, 1], [1, 2, 3, 3, 2, 1]])
def test_resample_output_sizes(taps):
    f = setup_filter(taps)
    x = torch.randn(1, 2, 12, 12)
    for s in (2, 4):
        assert upsample2d(x, f, up=s).shape[2:] == (12 * s, 12 * s)
        assert downsample2d(x, f, down=s).shape[2:] == (12 // s, 12 // s)
    assert filter2d(x, f).shape[2:] == (12, 12)
    assert filter2d(x, f, padding=1).shape[2:] == (14, 14)


# DC gain: a constant image stays the same constant in the interior (away from the zero-padded border). For
# upsampling by s this holds when every polyphase component of the filter sums to 1/s (binomials for s=2).
@pytest.mark.parametrize("taps,up", [([1, 1], 2), ([1, 2, 1], 2), ([1, 3, 3, 1], 2), ([1, 4, 6, 4, 1], 2),
                                     ([1, 2, 3, 3, 2, 1], 2), ([1, 1, 1], 3), ([1, 2, 3, 2, 1], 3)])
def test_resample_preserves_constant(taps, up):
    f = setup_filter(taps)
    x = torch.full((1, 1, 16, 16), 3.0)
    b = len(taps)  # border affected by padding
    y = upsample2d(x, f, up=up)
    torch.testing.assert_close(y[..., b:-b, b:-b], torch.full_like(y[..., b:-b, b:-b], 3.0))
    for s in (2, 3):
        y = downsample2d(x, f, down=s)
        torch.testing.assert_close(y[..., 2:-2, 2:-2], torch.full_like(y[..., 2:-2, 2:-2], 3.0))
    y = filter2d(x, f)
    torch.testing.assert_close(y[..., b:-b, b:-b], torch.full_like(y[..., b:-b, b:-b], 3.0))
    y = filter2d(x, f, gain=2)
    torch.testing.assert_close(y[..., b:-b, b:-b], torch.full_like(y[..., b:-b, b:-b], 6.0))


# --------------------------------------------------------------------------------------------------------------
# bias_act

_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805


# Explicit numpy formula for each activation.
def _act_np(name, x, alpha):
    sig = 1 / (1 + np.exp(-x))
    return {
        "linear": x,
        "relu": np.maximum(x, 0),
        "lrelu": np.where(x >= 0, x, alpha * x),
        "tanh": np.tanh(x),
        "sigmoid": sig,
        "elu": np.where(x > 0, x, np.expm1(x)),
        "selu": _SELU_SCALE * np.where(x > 0, x, _SELU_ALPHA * np.expm1(x)),
        "softplus": np.log1p(np.exp(x)),
        "swish": x * sig,
    }[name]


_DEF_GAIN = {"linear": 1, "relu": math.sqrt(2), "lrelu": math.sqrt(2), "tanh": 1, "sigmoid": 1, "elu": 1, "selu": 1,
             "softplus": 1, "swish": math.sqrt(2)}


# Every activation against its formula, with default and explicit gain/alpha, clamp, and bias along dim 1 or 2.
@pytest.mark.parametrize("act", sorted(activation_funcs))
def test_bias_act_matches_formula(act):
    assert set(activation_funcs) == set(_DEF_GAIN)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4, 5)) * 3
    for dim, gain, alpha, clamp in [(1, None, None, None), (2, 0.7, 0.1, None), (1, 2.0, None, 1.5),
                                    (3, None, 0.3, 0.5)]:
        b = rng.standard_normal(x.shape[dim])
        shape = [-1 if i == dim else 1 for i in range(4)]
        a = (0.2 if act == "lrelu" else 0.0) if alpha is None else alpha
        e = _act_np(act, x + b.reshape(shape), a) * (_DEF_GAIN[act] if gain is None else gain)
        if clamp is not None:
            e = np.clip(e, -clamp, clamp)
        y = bias_act(torch.tensor(x), torch.tensor(b), dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)
        np.testing.assert_allclose(y.numpy(), e, rtol=1e-12, atol=1e-12, err_msg=str((act, dim, gain, clamp)))
    # No bias, 2-D input.
    x2 = rng.standard_normal((4, 6))
    np.testing.assert_allclose(bias_act(torch.tensor(x2), act=act, gain=1.0).numpy(), _act_np(act, x2, 0.2 if
                               act == "lrelu" else 0.0), rtol=1e-12, atol=1e-12)


# Invalid arguments are rejected with a clear message.
def test_bias_act_rejects_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown activation"):
        bias_act(x, act="gelu2")
    with pytest.raises(ValueError, match="clamp"):
        bias_act(x, clamp=-1)
    with pytest.raises(ValueError, match="bias"):
        bias_act(x, torch.zeros(2))


# --------------------------------------------------------------------------------------------------------------
# conv2d_resample

# The documented computation: zero-insert and pad (with the filter's own padding), filter with gain up^2,
# convolve (valid), then filter and keep every down-th pixel.
def _conv2d_resample_np(x, w, f, up, down, pad, groups, flip_weight):
    fw = len(f)
    px0 = px1 = py0 = py1 = pad
    if up > 1:
        px0, px1, py0, py1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2, py0 + (fw + up - 1) // 2, py1 + (fw - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fw - down + 1) // 2, py1 + (fw - down) // 2
    f2 = np.outer(f, f)
    if up > 1:
        x = _upfirdn2d_conv2d_np(x, f2 * up ** 2, up, up, 1, 1, px0, px1, py0, py1)
    else:
        x = _upsample_pad_np(x, 1, 1, px0, px1, py0, py1)
    x = _conv_np(x, w, groups, flip_weight)
    if down > 1:
        x = _upfirdn2d_conv2d_np(x, f2, 1, 1, down, down, 0, 0, 0, 0)
    return x


# Fast paths, general path and explicit computation agree for up/down in {1, 2}, 1x1 and 3x3, groups 1 and 2.
@pytest.mark.parametrize("up,down", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("k", [1, 3])
def test_conv2d_resample_matches_ref_and_explicit(up, down, k):
    rng = np.random.default_rng(5)
    taps = np.array([1.0, 3.0, 3.0, 1.0]) / 8
    f = torch.tensor(np.outer(taps, taps))
    for groups, flip_weight in itertools.product((1, 2), (True, False)):
        x = rng.standard_normal((2, 4, 6, 6))
        w = rng.standard_normal((6, 4 // groups, k, k))
        pad = k // 2
        kw = dict(f=f, up=up, down=down, padding=pad, groups=groups, flip_weight=flip_weight)
        y = conv2d_resample(torch.tensor(x), torch.tensor(w), **kw)
        r = conv2d_resample_ref(torch.tensor(x), torch.tensor(w), **kw)
        e = _conv2d_resample_np(x, w, taps, up, down, pad, groups, flip_weight)
        assert y.shape == (2, 6, 6 * up // down, 6 * up // down)
        np.testing.assert_allclose(r.numpy(), e, rtol=1e-9, atol=1e-9, err_msg=f"ref g={groups} flip={flip_weight}")
        np.testing.assert_allclose(y.numpy(), e, rtol=1e-9, atol=1e-9, err_msg=f"fast g={groups} flip={flip_weight}")


# --------------------------------------------------------------------------------------------------------------
# modulated_conv2d

# Per-sample loop: modulate the weight by the sample's styles, demodulate, convolve, add noise.
def _modconv_loop(x, weight, styles, noise, up, down, padding, f, demodulate, flip_weight):
    outs = []
    for n in range(x.shape[0]):
        w = weight * styles[n].reshape(1, -1, 1, 1)
        if demodulate:
            w = w / torch.sqrt(w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8)
        outs.append(conv2d_resample_ref(x[n:n + 1], w, f=f, up=up, down=down, padding=padding,
                                        flip_weight=flip_weight))
    y = torch.cat(outs)
    return y + noise if noise is not None else y


# Fused (grouped) and non-fused modulated convolution agree with each other and with the per-sample loop.
@pytest.mark.parametrize("up,down,demodulate", [(1, 1, True), (2, 1, True), (1, 2, True), (1, 1, False)])
def test_modulated_conv2d_matches_loop(up, down, demodulate):
    torch.manual_seed(6)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    weight = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    styles = torch.randn(3, 4, dtype=torch.float64)
    f = setup_filter([1, 3, 3, 1]).double()
    res = 8 * up // down
    noise = torch.randn(3, 1, res, res, dtype=torch.float64)
    for flip_weight, nz in itertools.product((True, False), (None, noise)):
        kw = dict(up=up, down=down, padding=1, resample_filter=f, demodulate=demodulate, flip_weight=flip_weight)
        a = modulated_conv2d(x, weight, styles, noise=nz, fused_modconv=True, **kw)
        b = modulated_conv2d(x, weight, styles, noise=nz, fused_modconv=False, **kw)
        e = _modconv_loop(x, weight, styles, nz, up, down, 1, f, demodulate, flip_weight)
        assert a.shape == (3, 5, res, res)
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(b, e, rtol=1e-9, atol=1e-9)


# Demodulation normalizes: with unit-variance input the output of each (sample, channel) has a bounded scale, and
# scaling the styles of one sample leaves its demodulated output unchanged.
def test_modulated_conv2d_demodulation_is_scale_invariant():
    torch.manual_seed(7)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    weight = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    styles = torch.randn(2, 4, dtype=torch.float64)
    a = modulated_conv2d(x, weight, styles, padding=1)
    b = modulated_conv2d(x, weight, styles * torch.tensor([[5.0], [0.1]], dtype=torch.float64), padding=1)
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------------------
# Gradients in float64: first and second order (R1 needs grad-of-grad through the whole discriminator).

@pytest.mark.parametrize("f_shape,up,down,pad", [((4,), 2, 1, (2, 1, 2, 1)), ((3, 2), 1, 2, (1, -1, 0, 1)),
                                                 ((3,), 3, 2, (-1, 2, 1, 0))])
def test_upfirdn2d_gradcheck(f_shape, up, down, pad):
    torch.manual_seed(8)
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    f = torch.randn(*f_shape, dtype=torch.float64)
    fn = lambda x: upfirdn2d(x, f, up=up, down=down, padding=pad, gain=1.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("act", sorted(activation_funcs))
def test_bias_act_gradcheck(act):
    torch.manual_seed(9)
    # Inputs kept away from the relu/lrelu kink at 0 and from the clamp boundary.
    x = (torch.rand(2, 3, 3, dtype=torch.float64) + 0.2) * torch.sign(torch.randn(2, 3, 3, dtype=torch.float64))
    b = torch.tensor([0.05, -0.05, 0.02], dtype=torch.float64, requires_grad=True)
    x.requires_grad_(True)
    fn = lambda x, b: bias_act(x, b, dim=1, act=act, gain=1.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))
    clamped = lambda x, b: bias_act(x, b, dim=1, act=act, clamp=10.0)  # noqa: E731
    assert torch.autograd.gradgradcheck(clamped, (x, b))


@pytest.mark.parametrize("up,down,k,groups", [(2, 1, 3, 1), (1, 2, 3, 2), (2, 1, 1, 1), (1, 2, 1, 1), (1, 1, 3, 1)])
def test_conv2d_resample_gradcheck(up, down, k, groups):
    torch.manual_seed(10)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2 // groups, k, k, dtype=torch.float64, requires_grad=True)
    f = setup_filter([1, 3, 3, 1]).double()
    fn = lambda x, w: conv2d_resample(x, w, f=f, up=up, down=down, padding=k // 2, groups=groups)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))


@pytest.mark.parametrize("fused", [True, False])
def test_modulated_conv2d_gradcheck(fused):
    torch.manual_seed(11)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    styles = (torch.rand(2, 2, dtype=torch.float64) + 0.5).requires_grad_(True)
    noise = torch.randn(2, 1, 8, 8, dtype=torch.float64)  # output resolution (up=2)
    f = setup_filter([1, 3, 3, 1]).double()
    fn = lambda x, w, s: modulated_conv2d(x, w, s, noise=noise, up=2, padding=1, resample_filter=f,  # noqa: E731
                                          fused_modconv=fused)
    assert torch.autograd.gradcheck(fn, (x, weight, styles))
    assert torch.autograd.gradgradcheck(fn, (x, weight, styles))
