"""Spectral norm and SAGAN self-attention: sigma -> 1, buffers in snapshots, identity gate, R1, options-off parity."""
import hashlib

import pytest
import torch
import torch.nn.functional as F

from networks.attention import SelfAttention
from networks.discriminator import Discriminator
from networks.generator import Generator, SynthesisLayer, ToRGBLayer
from networks.layers import Conv2dLayer, FullyConnectedLayer
from networks.sn import sn_weight
from training.io.checkpoint import load_snapshot, save_snapshot
from training.loss import StyleGAN2Loss
from networks.factory import build_networks
from training.config import ModelConfig


pytestmark = pytest.mark.usefixtures("ref_ops_one_thread")


def tiny_nets(seed=0, sn=False, attention_g=(), attention_d=()):
    """Tiny conditional G and D at 16 px (16 channels); `sn` / `attention` only passed when given, as the factory
    does."""
    torch.manual_seed(seed)
    mapping_kwargs, synthesis_kwargs, d_kwargs = dict(num_layers=2), dict(channel_base=256, channel_max=16,
                                                                          architecture="resnet"), {}
    if sn:
        mapping_kwargs["sn"] = synthesis_kwargs["sn"] = d_kwargs["sn"] = True
    if attention_g:
        synthesis_kwargs["attention"] = list(attention_g)
    if attention_d:
        d_kwargs["attention"] = list(attention_d)
    G = Generator(z_dim=16, c_dim=3, w_dim=16, img_resolution=16, img_channels=3, mapping_kwargs=mapping_kwargs,
                  synthesis_kwargs=synthesis_kwargs)
    D = Discriminator(c_dim=3, img_resolution=16, img_channels=3, architecture="resnet", channel_base=256,
                      channel_max=16, mbstd_group_size=2, **d_kwargs)
    return G, D


def sn_modules(net):
    """(name, module) of every spectrally normalized module of `net`."""
    return [(name, m) for name, m in net.named_modules() if hasattr(m, "sn_u")]


def spectral_norm_of(weight):
    """The largest singular value of a weight reshaped to [out, in*k*k]."""
    return torch.linalg.matrix_norm(weight.detach().reshape(weight.shape[0], -1).double(), ord=2).item()


def keys_digest(net):
    """SHA-1 of the state dict's keys and shapes."""
    return hashlib.sha1("\n".join(f"{k}:{tuple(v.shape)}" for k, v in net.state_dict().items()).encode()).hexdigest()


# The plain StyleGAN2 networks as built at commit 16b598a (no SN or attention options), seed 0, reference ops:
# state-dict key digests and outputs recorded from that code. With the options off, keys, initialization (random
# draws in the same order) and outputs must be the same.
PLAIN_G_KEYS = (54, "fb333eae073b176aaa7fc31bcb80d62b1d94f372")
PLAIN_D_KEYS = (46, "7cb572cc952989cd81f5ca27ad0de467b83e1f44")
PLAIN_G_PIXELS = [-0.23224135, -0.54838854, -0.26344618, -0.34741053, 0.90003932, 1.1547468, 1.1119734,
                       1.2609661, 0.10548481, 0.28921151, 0.22298554, 0.35372448]
PLAIN_G_SUM = 188.88475420617033
PLAIN_D_LOGITS = [0.22581768035888672, 0.049793146550655365]


def test_options_off_match_the_plain_networks():
    """With SN and attention off, the factory and the constructors build the plain StyleGAN2 networks (see above)."""
    model = ModelConfig(z_dim=16, w_dim=16, map_layers=2, map_lr_mult=0.01, channel_base=256, channel_max=16,
                        g_arch="resnet", d_arch="resnet", mbstd_group=2, mbstd_channels=1, conv_clamp=None,
                        num_fp16_res=0, sn="none", attention_g=[], attention_d=[])
    g = torch.Generator().manual_seed(1)
    z, c = torch.randn(2, 16, generator=g), torch.eye(3)[[0, 2]]
    x = torch.randn(2, 3, 16, 16, generator=g)
    torch.manual_seed(0)
    G, D, _ = build_networks(model, resolution=16, channels=3, c_dim=3)
    for G, D in ((G, D), tiny_nets(seed=0)):
        assert (len(G.state_dict()), keys_digest(G)) == PLAIN_G_KEYS
        assert (len(D.state_dict()), keys_digest(D)) == PLAIN_D_KEYS
        assert not any("sn_" in k or "attn" in k for k in list(G.state_dict()) + list(D.state_dict()))
        assert "sn" not in D.init_kwargs and "attention" not in D.init_kwargs
        assert "sn" not in G.init_kwargs["synthesis_kwargs"] and "sn" not in G.init_kwargs["mapping_kwargs"]
        with torch.no_grad():
            img = G(z, c, noise_mode="const")
            logits = D(x, c)
        assert torch.allclose(img[0, :, :2, :2].flatten(), torch.tensor(PLAIN_G_PIXELS), rtol=0, atol=1e-5)
        assert abs(img.double().sum().item() - PLAIN_G_SUM) < 1e-3
        assert torch.allclose(logits.flatten(), torch.tensor(PLAIN_D_LOGITS), rtol=0, atol=1e-5)


def test_power_iteration_converges_and_layers_use_w_over_sigma():
    """A weight with a known spectrum (sigma_1 = 3, sigma_2 = 2): from random u, v, power iteration (one per
    training-mode forward) converges to sigma_1; eval mode leaves u, v alone; the layer computes with W / sigma_1 and no
    equalized-LR gain."""
    torch.manual_seed(0)
    conv = Conv2dLayer(6, 8, kernel_size=3, sn=True)
    left, _ = torch.linalg.qr(torch.randn(8, 8))
    right, _ = torch.linalg.qr(torch.randn(54, 8))
    spectrum = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.8, 0.5, 0.3, 0.1])
    with torch.no_grad():
        conv.weight.copy_((left @ torch.diag(spectrum) @ right.t()).reshape(8, 6, 3, 3))
        conv.sn_u.copy_(F.normalize(torch.randn(8), dim=0))
        conv.sn_v.copy_(F.normalize(torch.randn(54), dim=0))
    x = torch.randn(2, 6, 5, 5)
    u0 = conv.sn_u.clone()
    conv.eval()
    conv(x)
    assert torch.equal(conv.sn_u, u0)  # No iteration in eval mode.
    conv.train()
    with torch.no_grad():
        for _ in range(30):
            conv(x)
    assert not torch.equal(conv.sn_u, u0)
    w_eff = sn_weight(conv.weight, conv.sn_u, conv.sn_v, update=False)
    assert abs(spectral_norm_of(w_eff) - 1) < 1e-4
    conv.eval()
    expected = F.conv2d(x, conv.weight / 3.0, conv.bias, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-5)
    fc = FullyConnectedLayer(5, 4, sn=True).eval()
    x = torch.randn(3, 5)
    assert torch.allclose(fc(x), x @ (fc.weight / spectral_norm_of(fc.weight)).t() + fc.bias, atol=1e-6)


def test_sn_double_backward_matches_torch_spectral_norm():
    """Gradients and second-order gradients (as R1 takes them) treat u and v as constants, exactly like
    torch.nn.utils.parametrizations.spectral_norm given the same vectors."""
    torch.manual_seed(1)
    ours = FullyConnectedLayer(7, 5, sn=True).double().eval()
    ref = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(7, 5).double()).eval()
    with torch.no_grad():
        ref.parametrizations.weight.original.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
        ours.sn_u.copy_(F.normalize(torch.randn(5, dtype=torch.float64), dim=0))  # Not converged: sigma's
        ours.sn_v.copy_(F.normalize(torch.randn(7, dtype=torch.float64), dim=0))  # gradient is then visible.
        ref.parametrizations.weight[0]._u.copy_(ours.sn_u)
        ref.parametrizations.weight[0]._v.copy_(ours.sn_v)
    grads = []
    for layer, weight in ((ours, ours.weight), (ref, ref.parametrizations.weight.original)):
        x = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        out = layer(x).tanh().sum()
        (gx,) = torch.autograd.grad(out, [x], create_graph=True)
        (gw,) = torch.autograd.grad(gx.square().sum(), [weight])
        grads.append((out.detach(), gx.detach(), gw))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_sn_singular_values_after_power_iterations():
    """G and D with SN on every layer (mapping, affine, modulated, ToRGB, skip, attention, epilogue), after the weights
    moved away from those the vectors were computed for (10% random change, so the stored vectors are stale): 30
    training-mode forward passes (one power iteration each) bring the largest singular value of every normalized weight
    within 1% of 1. (During training, one iteration per step tracks sigma as W changes slowly; when the top two singular
    values cross, the estimate lags for some steps, as in Miyato et al. and torch's spectral_norm.)"""
    G, D = tiny_nets(seed=2, sn=True, attention_g=[8], attention_d=[16])
    G.train(), D.train()
    modules = [m for net in (G, D) for _, m in sn_modules(net)]
    layers = [m for net in (G, D) for m in net.modules()
              if isinstance(m, (FullyConnectedLayer, Conv2dLayer, SynthesisLayer, ToRGBLayer))]
    assert len(modules) == len(layers) == 44
    with torch.no_grad():
        for m in modules:
            m.weight.add_(0.1 * m.weight.std() * torch.randn_like(m.weight))
    errors = lambda: [abs(spectral_norm_of(sn_weight(m.weight, m.sn_u, m.sn_v, update=False)) - 1)  # noqa: E731
                      for m in modules]
    assert max(errors()) > 0.01  # Stale vectors after the change.
    g = torch.Generator().manual_seed(3)
    c = torch.eye(3)[[0, 1]]
    with torch.no_grad():
        for _ in range(30):
            D(G(torch.randn(2, 16, generator=g), c), c)
    assert max(errors()) < 0.01


def test_sn_buffers_are_saved_and_round_trip_through_snapshots(tmp_path):
    """SN vectors and attention weights are saved in snapshots and load back bit for bit, outputs included."""
    model = ModelConfig(z_dim=16, w_dim=16, map_layers=2, map_lr_mult=0.01, channel_base=256, channel_max=16,
                        g_arch="skip", d_arch="resnet", mbstd_group=2, mbstd_channels=1, conv_clamp=256,
                        num_fp16_res=0, sn="both", attention_g=[8], attention_d=[16])
    torch.manual_seed(0)
    G, D, G_ema = build_networks(model, resolution=16, channels=3, c_dim=0)
    assert G.init_kwargs["synthesis_kwargs"]["sn"] and G.init_kwargs["synthesis_kwargs"]["attention"] == [8]
    assert G.init_kwargs["mapping_kwargs"]["sn"] and D.init_kwargs["sn"] and D.init_kwargs["attention"] == [16]
    for net in (G, D):
        state = net.state_dict()
        names = [name for name, _ in sn_modules(net)]
        assert names and all(f"{n}.sn_u" in state and f"{n}.sn_v" in state for n in names)
    assert "synthesis.b8.attn.gamma" in G.state_dict() and "b16.attn.f.sn_u" in D.state_dict()
    with torch.no_grad():  # Move the vectors away from their initial values (weights changed by hand).
        for net in (G, D):
            for _, m in sn_modules(net):
                m.weight.mul_(1 + 0.3 * torch.rand_like(m.weight))
        z = torch.randn(2, 16)
        D(G.train()(z, None), None)
    path = tmp_path / "snap.safetensors"
    save_snapshot(path, G, D, G_ema)
    loaded = load_snapshot(path)
    for name, net in (("G", G), ("D", D), ("G_ema", G_ema)):
        ref, got = net.state_dict(), loaded[name].state_dict()
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
    G.eval(), D.eval()
    with torch.no_grad():
        img = G(z, None, noise_mode="const")
        assert torch.equal(loaded["G"](z, None, noise_mode="const"), img)
        assert torch.equal(loaded["D"](img, None), D(img, None))


def test_attention_matches_sagan_equations_and_zero_gate_is_identity():
    """Self-attention equals SAGAN eq. 1-3 written with einsum; with gamma 0 it returns its input."""
    torch.manual_seed(0)
    attn = SelfAttention(16)
    assert (attn.key_channels, attn.value_channels) == (2, 8) and attn.gamma.item() == 0
    x = torch.randn(2, 16, 5, 6)
    assert torch.equal(attn(x), x)
    with torch.no_grad():
        attn.gamma.fill_(0.7)
        attn.f.bias.normal_(), attn.g.bias.normal_()
    f, g, h = (m(x).flatten(2) for m in (attn.f, attn.g, attn.h))  # [N, C', HW]
    s = torch.einsum("nci,ncj->nij", f, g)                         # s_ij = f(x_i)^T g(x_j)
    beta = s.softmax(dim=1)                                        # beta_{j,i}: softmax over i
    o = torch.einsum("nij,nci->ncj", beta, h).reshape(2, 8, 5, 6)  # sum_i beta_{j,i} h(x_i)
    assert torch.allclose(attn(x), x + 0.7 * attn.v(o), atol=1e-5)


def test_attention_gradgradcheck():
    """Self-attention (with SN) passes gradcheck and gradgradcheck (R1 differentiates it twice)."""
    torch.manual_seed(0)
    attn = SelfAttention(8, sn=True).double()
    with torch.no_grad():
        attn.gamma.fill_(0.5)
    x = torch.randn(1, 8, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(attn, (x,))
    assert torch.autograd.gradgradcheck(attn, (x,))


def test_attention_blocks_start_as_identity_in_g_and_d():
    """Attention blocks with gate 0 leave G and D unchanged: the same weights give the same outputs bit for bit."""
    G0, D0 = tiny_nets(seed=0)
    G1, D1 = tiny_nets(seed=5, attention_g=[4, 16], attention_d=[16, 8])
    for plain, with_attn in ((G0, G1), (D0, D1)):
        missing, unexpected = with_attn.load_state_dict(plain.state_dict(), strict=False)
        assert not unexpected and missing and all(".attn." in k for k in missing)
    z, c = torch.randn(2, 16), torch.eye(3)[[0, 2]]
    with torch.no_grad():
        img = G0(z, c, noise_mode="const")
        assert torch.equal(G1(z, c, noise_mode="const"), img)
        assert torch.equal(D1(img, c), D0(img, c))
    with pytest.raises(ValueError, match="attention resolutions"):
        tiny_nets(attention_d=[4])


def test_sn_attention_networks_r1_and_autocast():
    """G and D with attention and SN: shapes, a finite R1 penalty through double backward (also through the loss with
    the hinge loss), and the same under CPU autocast (bfloat16)."""
    G, D = tiny_nets(seed=3, sn=True, attention_g=[8, 16], attention_d=[16, 8])
    G.train(), D.train()
    z, c = torch.randn(4, 16), torch.eye(3)[[0, 1, 2, 0]]
    img = G(z, c)
    assert img.shape == (4, 3, 16, 16)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            x = img.detach().requires_grad_(True)
            logits = D(x, c)
            assert logits.shape == (4, 1) and torch.isfinite(logits).all()
            (grad,) = torch.autograd.grad(logits.float().sum(), [x], create_graph=True)
            penalty = grad.float().square().sum([1, 2, 3]).mean()
        D.zero_grad()
        penalty.backward()
        assert torch.isfinite(penalty) and penalty > 0
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in D.parameters())
        assert D.b16.attn.gamma.grad is not None and D.b16.attn.gamma.grad.abs() > 0
    loss = StyleGAN2Loss(G, D, r1_gamma=1.0, style_mixing_prob=0.5, loss_type="hinge")
    stats = loss.accumulate_gradients("Dboth", img.detach(), c, z, c, gain=1)
    assert all(torch.isfinite(v) for v in stats.values()) and stats["Loss/r1_penalty"] > 0
