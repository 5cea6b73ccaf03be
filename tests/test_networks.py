"""Generator and discriminator: shapes, num_ws, equalized LR, truncation, noise, minibatch std, parameter counts."""
import math

import pytest
import torch

from networks.discriminator import Discriminator, MinibatchStdLayer
from networks.generator import Generator
from networks.layers import FullyConnectedLayer, count_params


def small_G(res, arch="skip", c_dim=0, **kw):
    return Generator(z_dim=16, c_dim=c_dim, w_dim=16, img_resolution=res, img_channels=3,
                     mapping_kwargs=dict(num_layers=2),
                     synthesis_kwargs=dict(channel_base=256, channel_max=16, architecture=arch, **kw))


def small_D(res, arch="resnet", c_dim=0, **kw):
    return Discriminator(c_dim=c_dim, img_resolution=res, img_channels=3, architecture=arch, channel_base=256,
                         channel_max=16, mbstd_group_size=2, **kw)


@pytest.mark.parametrize("res", [8, 16, 32, 64])
@pytest.mark.parametrize("arch", ["orig", "skip", "resnet"])
def test_generator_shapes_and_num_ws(res, arch):
    G = small_G(res, arch)
    assert G.num_ws == 2 * int(math.log2(res)) - 2
    z = torch.randn(2, 16)
    ws = G.mapping(z, None)
    assert ws.shape == (2, G.num_ws, 16)
    img = G.synthesis(ws, noise_mode="const")
    assert img.shape == (2, 3, res, res)
    # Every ws entry is used: changing the last one changes the image (ToRGB of the last block).
    ws2 = ws.clone()
    ws2[:, -1] += 1
    assert not torch.allclose(G.synthesis(ws2, noise_mode="const"), img)


@pytest.mark.parametrize("res", [8, 16, 32, 64])
@pytest.mark.parametrize("arch", ["orig", "skip", "resnet"])
def test_discriminator_shapes(res, arch):
    D = small_D(res, arch)
    out = D(torch.randn(4, 3, res, res), None)
    assert out.shape == (4, 1)
    assert torch.isfinite(out).all()


def test_conditional_networks_use_labels():
    G, D = small_G(16, c_dim=5), small_D(16, c_dim=5)
    z = torch.randn(4, 16)
    c1, c2 = torch.eye(5)[[0, 1, 2, 3]], torch.eye(5)[[4, 4, 4, 4]]
    assert not torch.allclose(G(z, c1, noise_mode="const"), G(z, c2, noise_mode="const"))
    img = torch.randn(4, 3, 16, 16)
    assert not torch.allclose(D(img, c1), D(img, c2))
    with pytest.raises(ValueError, match="expected c of shape"):
        G(z, None)


# Equalized LR: stored weights are N(0, 1/lr_mult^2) and the runtime weight is scaled by lr_mult / sqrt(fan_in).
def test_equalized_lr_statistics_at_init():
    torch.manual_seed(0)
    fc = FullyConnectedLayer(512, 512, lr_multiplier=0.01)
    assert abs(fc.weight.std().item() * 0.01 - 1) < 0.01
    assert abs(fc.weight_gain - 0.01 / math.sqrt(512)) < 1e-12
    # Effective output variance of a linear layer on unit-variance input is ~1 (He init through the gain).
    x = torch.randn(4096, 512)
    y = FullyConnectedLayer(512, 512)(x)
    assert abs(y.std().item() - 1) < 0.05
    G = Generator(z_dim=64, c_dim=0, w_dim=64, img_resolution=16, img_channels=3,
                  synthesis_kwargs=dict(channel_base=1024, channel_max=64))
    conv = G.synthesis.b16.conv1
    assert abs(conv.weight.std().item() - 1) < 0.05 and abs(conv.weight.mean().item()) < 0.05
    assert torch.all(conv.affine.bias == 1)  # Styles start at 1: modulation starts as identity.
    assert conv.noise_strength.item() == 0


def test_truncation_and_w_avg():
    G = small_G(16)
    G.mapping.w_avg.copy_(torch.randn(16))
    z = torch.randn(3, 16)
    ws = G.mapping(z, None)
    ws0 = G.mapping(z, None, truncation_psi=0)
    assert torch.allclose(ws0, G.mapping.w_avg.expand_as(ws0))
    wsh = G.mapping(z, None, truncation_psi=0.5)
    assert torch.allclose(wsh, G.mapping.w_avg + 0.5 * (ws - G.mapping.w_avg), atol=1e-6)
    wsc = G.mapping(z, None, truncation_psi=0, truncation_cutoff=2)
    assert torch.allclose(wsc[:, :2], G.mapping.w_avg.expand(3, 2, 16)) and torch.allclose(wsc[:, 2:], ws[:, 2:])
    # w_avg tracks the mean of w with beta 0.995 while training.
    old = G.mapping.w_avg.clone()
    ws = G.mapping(z, None, update_emas=True)
    assert torch.allclose(G.mapping.w_avg, ws[:, 0].mean(0).lerp(old, 0.995), atol=1e-6)


def test_noise_modes():
    G = small_G(16)
    for layer in (G.synthesis.b8.conv0, G.synthesis.b16.conv1):
        layer.noise_strength.data.fill_(0.5)
    ws = G.mapping(torch.randn(2, 16), None)
    a, b = G.synthesis(ws, noise_mode="const"), G.synthesis(ws, noise_mode="const")
    assert torch.equal(a, b)
    assert not torch.allclose(G.synthesis(ws, noise_mode="random"), a)
    assert not torch.allclose(G.synthesis(ws, noise_mode="none"), a)
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(ws, noise_mode="bogus")


def test_fused_and_split_modconv_agree():
    G = small_G(32, "resnet").eval()
    ws = G.mapping(torch.randn(3, 16), None)
    a = G.synthesis(ws, noise_mode="const", fused_modconv=True)
    b = G.synthesis(ws, noise_mode="const", fused_modconv=False)
    assert torch.allclose(a, b, atol=1e-5)


def test_minibatch_std_against_explicit_computation():
    x = torch.randn(8, 6, 4, 4, dtype=torch.float64)
    out = MinibatchStdLayer(group_size=4, num_channels=2)(x)
    assert out.shape == (8, 8, 4, 4)
    # Sample n belongs to group member n // 2 of sub-batch n % 2; each feature split f covers 3 channels.
    for n in range(8):
        m = n % 2
        members = x[[m, m + 2, m + 4, m + 6]]
        for f in range(2):
            chans = members[:, 3 * f:3 * f + 3]
            std = ((chans - chans.mean(0)).pow(2).mean(0) + 1e-8).sqrt().mean()
            assert torch.allclose(out[n, 6 + f], std.expand(4, 4))


# The official networks count G 24.77M / D 24.00M (paper256) and G 30.37M / D 29.01M (stylegan2, 1024 px).
@pytest.mark.parametrize("res,cbase,g_m,d_m", [(256, 16384, 24.77, 24.00), (1024, 32768, 30.37, 29.01)])
def test_parameter_counts_match_official(res, cbase, g_m, d_m):
    G = Generator(512, 0, 512, res, 3, mapping_kwargs=dict(num_layers=8),
                  synthesis_kwargs=dict(channel_base=cbase, channel_max=512))
    D = Discriminator(0, res, 3, channel_base=cbase, channel_max=512)
    assert round(count_params(G) / 1e6, 2) == g_m
    assert round(count_params(D) / 1e6, 2) == d_m


def test_bad_resolution_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        small_G(48)
    with pytest.raises(ValueError, match="expected images of shape"):
        small_D(16)(torch.randn(2, 3, 32, 32), None)


# Blocks that compute in float16 (num_fp16_res, CUDA) keep their activations channels-last, as NVIDIA's do. On this
# CPU the layout is forced for every block: G's images and D's logits and input gradients (R1's path) must equal
# those of the default layout (the same sums in another order: float32 rounding only), and the convolutions must
# really see channels-last inputs.
@pytest.mark.parametrize("g_arch,d_arch", [("skip", "resnet"), ("resnet", "skip")])
def test_channels_last_blocks_match_default_layout(monkeypatch, g_arch, d_arch):
    import networks.discriminator
    import networks.generator
    torch.manual_seed(0)
    G, D = small_G(16, g_arch), small_D(16, d_arch)
    z = torch.randn(4, 16)
    outs = {}
    for layout in ("default", "channels_last"):
        if layout == "channels_last":
            force = lambda dtype: torch.channels_last  # noqa: E731
            monkeypatch.setattr(networks.generator, "block_memory_format", force)
            monkeypatch.setattr(networks.discriminator, "block_memory_format", force)
        seen = []
        hook = G.synthesis.b16.conv1.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        img = G(z, None, noise_mode="const")
        x = img.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(D(x, None).sum(), x)
        hook.remove()
        assert seen == [layout == "channels_last"]
        outs[layout] = (img, D(img, None), grad)
    for a, b in zip(outs["channels_last"], outs["default"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
