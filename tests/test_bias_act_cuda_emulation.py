"""bias_act's CUDA kernels emulated on the host (same geometry, spans, 16-byte packs, reduction order): every element
visited once, values and fused bias gradients against the reference, vector width and walk chosen as intended."""
import pytest
import torch

from ops import dispatch
from ops.bias_act import ACT_IDS, bias_act_ref

_FWD, _GRAD_X = 0, 1


@pytest.fixture(scope="module")
def ext():
    return dispatch.load("bias_act", "cpu")


# (x, dim, expected walk 'rows'/'cols', expected vec for float32) cases: NCHW with a row length that is and is not a
# multiple of 4, channels-last, [N, C], a misaligned view (storage offset 1), a big [N, C] over many blocks.
def _cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return [("nchw 9x7", r(2, 8, 9, 7), 1, 0, 1), ("nchw 4x4", r(3, 8, 4, 4), 1, 0, 4),
            ("nchw 32x32", r(1, 3, 32, 32), 1, 0, 4),
            ("channels-last", r(2, 16, 5, 3).contiguous(memory_format=torch.channels_last), 1, 1, 4),
            ("[N, C] C=12", r(37, 12), 1, 1, 4), ("[N, C] C=6", r(9, 6), 1, 1, 1),
            ("misaligned", r(1 + 2 * 8 * 16)[1:].view(2, 8, 4, 4), 1, 0, 1),
            ("dim 0 [C, N]", r(5, 40), 0, 0, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_emulated_cuda_kernels(ext, case, dtype):
    name, x, dim, cols, vec32 = case
    x = x.to(dtype) if dtype != torch.float32 else x
    if name == "misaligned" and dtype != torch.float32:  # keep the odd offset in every dtype
        x = torch.empty(1 + x.numel(), dtype=dtype)[1:].view(x.shape).copy_(x)
    b = torch.linspace(-1, 1, x.shape[dim], dtype=dtype)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    gy = torch.empty_like(x).copy_(gy)  # x's layout
    kw = dict(act="lrelu", alpha=0.2, gain=1.4, clamp=2.0)
    inner, channels = max(x.stride(dim), 1), x.shape[dim]
    for max_blocks in (3, 1000):  # few blocks: every block walks several units (the grid-stride loop)
        y, _, visits, geom = ext.bias_act_emulate_cuda(x, b, torch.empty(0, dtype=dtype), ACT_IDS["lrelu"], _FWD,
                                                       0.2, 1.4, 2.0, inner, channels, False, max_blocks)
        assert torch.equal(visits, torch.ones_like(visits)), name
        assert geom[0] == cols and y.stride() == x.stride()
        if dtype == torch.float32:
            assert geom[1] == vec32
        elif vec32 == 4 and name != "[N, C] C=12":  # 16 bytes: 2 doubles, 8 halves
            assert geom[1] == 16 // x.element_size()
        truth = bias_act_ref(x.double(), b.double(), dim=dim, **kw)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(y.double(), truth, atol=2 * eps, rtol=2 * eps)
        # Gradient pass with the fused bias-gradient sums.
        gz, gb, visits, _ = ext.bias_act_emulate_cuda(x, b, gy, ACT_IDS["lrelu"], _GRAD_X, 0.2, 1.4, 2.0, inner,
                                                      channels, True, max_blocks)
        assert torch.equal(visits, torch.ones_like(visits))
        xd = x.double().requires_grad_(True)
        (tgz,) = torch.autograd.grad(bias_act_ref(xd, b.double(), dim=dim, **kw), xd, gy.double())
        torch.testing.assert_close(gz.double(), tgz, atol=2 * eps, rtol=2 * eps)
        tgb = tgz.sum([i for i in range(x.ndim) if i != dim])
        mag = tgz.abs().sum([i for i in range(x.ndim) if i != dim])
        assert ((gb.double() - tgb).abs() <= 4 * eps * mag + 2 * eps * tgb.abs()).all(), (gb, tgb)


# Without a bias the tensor is one row (channel-free) and any length works, including a tail of < 16 bytes.
def test_emulated_no_bias(ext):
    x = torch.randn(1001)
    y, _, visits, geom = ext.bias_act_emulate_cuda(x, torch.empty(0), torch.empty(0), ACT_IDS["tanh"], _FWD, 0.0,
                                                   1.0, -1.0, 1, 1001, False, 2)
    assert torch.equal(visits, torch.ones_like(visits)) and geom[0] == 0 and geom[1] == 1
    torch.testing.assert_close(y, torch.tanh(x), atol=1e-6, rtol=1e-6)
