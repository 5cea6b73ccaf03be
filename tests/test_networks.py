"""Generator and discriminator: shapes, num_ws, equalized LR, truncation, noise, minibatch std, parameter counts."""
import math

import pytest
import torch

from networks import layers
from networks.discriminator import Discriminator, MinibatchStdLayer
from networks.generator import Generator
from networks.layers import FullyConnectedLayer, count_params


def small_G(res, arch="skip", c_dim=0, **kw):
    """A small G (16-dim z and w, 2 mapping layers, 16 channels) at `res` px."""
    return Generator(z_dim=16, c_dim=c_dim, w_dim=16, img_resolution=res, img_channels=3,
                     mapping_kwargs=dict(num_layers=2),
                     synthesis_kwargs=dict(channel_base=256, channel_max=16, architecture=arch, **kw))


def small_D(res, arch="resnet", c_dim=0, **kw):
    """A small D (16 channels, minibatch-std groups of 2) at `res` px."""
    return Discriminator(c_dim=c_dim, img_resolution=res, img_channels=3, architecture=arch, channel_base=256,
                         channel_max=16, mbstd_group_size=2, **kw)


@pytest.mark.parametrize("res", [8, 16, 32, 64])
@pytest.mark.parametrize("arch", ["orig", "skip", "resnet"])
def test_generator_shapes_and_num_ws(res, arch):
    """num_ws and image shapes for every architecture and resolution; every ws entry is used."""
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
    """D gives finite logits [N, 1] for every architecture and resolution."""
    D = small_D(res, arch)
    out = D(torch.randn(4, 3, res, res), None)
    assert out.shape == (4, 1)
    assert torch.isfinite(out).all()


def test_conditional_networks_use_labels():
    """Labels change G's images and D's logits; a conditional G refuses missing labels."""
    G, D = small_G(16, c_dim=5), small_D(16, c_dim=5)
    z = torch.randn(4, 16)
    c1, c2 = torch.eye(5)[[0, 1, 2, 3]], torch.eye(5)[[4, 4, 4, 4]]
    assert not torch.allclose(G(z, c1, noise_mode="const"), G(z, c2, noise_mode="const"))
    img = torch.randn(4, 3, 16, 16)
    assert not torch.allclose(D(img, c1), D(img, c2))
    with pytest.raises(ValueError, match="expected c of shape"):
        G(z, None)


def test_equalized_lr_statistics_at_init():
    """Equalized LR: stored weights are N(0, 1/lr_mult^2) and the runtime weight is scaled by lr_mult / sqrt(fan_in)."""
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
    """Truncation lerps towards w_avg (all or the first `cutoff` ws); update_emas tracks w_avg with beta 0.995."""
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


def test_w_avg_and_truncation_under_bf16_autocast():
    """Under bf16 autocast (train.mixed_precision=bf16) the mapping gives bf16 ws; w_avg stays float32, tracks the
    float32 mean of those ws, and truncation lerps in the ws' dtype."""
    G = small_G(16)
    z = torch.randn(4, 16)
    old = G.mapping.w_avg.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ws = G.mapping(z, None, update_emas=True)
        wst = G.mapping(z, None, truncation_psi=0.5, truncation_cutoff=2)
    assert ws.dtype == torch.bfloat16 and G.mapping.w_avg.dtype == torch.float32
    assert torch.allclose(G.mapping.w_avg, ws[:, 0].float().mean(0).lerp(old, 0.995), atol=1e-6)
    w_avg = G.mapping.w_avg.to(torch.bfloat16)
    assert wst.dtype == torch.bfloat16
    assert torch.equal(wst[:, :2], w_avg.lerp(ws[:, :2], 0.5)) and torch.equal(wst[:, 2:], ws[:, 2:])


def test_noise_modes():
    """'const' is repeatable, 'random' and 'none' differ from it, an unknown mode is refused."""
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


@pytest.mark.parametrize("arch", ["skip", "resnet", "orig"])
def test_const_noise_equals_explicit_const_buffers(arch):
    """The explicit-noise argument: noise_mode='const' equals passing the layers' noise_const buffers, shared ([res,
    res]) or as per-sample maps ([N, 1, res, res]), bit for bit, for every architecture and both modconv paths; the
    names are the layers' module names in G.synthesis."""
    G = small_G(16, arch).eval()
    names = [name for name, _ in G.synthesis.noise_layers()]
    assert names == ["b4.conv1", "b8.conv0", "b8.conv1", "b16.conv0", "b16.conv1"]
    modules = dict(G.synthesis.named_modules())
    for name, layer in G.synthesis.noise_layers():
        assert modules[name] is layer
        layer.noise_strength.data.fill_(0.5)
    ws = G.mapping(torch.randn(3, 16), None)
    shared = {name: layer.noise_const for name, layer in G.synthesis.noise_layers()}
    per_sample = {name: m.reshape(1, 1, *m.shape).expand(3, 1, -1, -1).clone() for name, m in shared.items()}
    for fused in (True, False):
        ref = G.synthesis(ws, noise_mode="const", fused_modconv=fused)
        for noise in (shared, per_sample):
            for mode in ("random", "none", "const"):  # Every layer has a map: noise_mode does not matter.
                assert torch.equal(G.synthesis(ws, noise=noise, noise_mode=mode, fused_modconv=fused), ref)
    assert torch.equal(G(torch.zeros(1, 16), None, noise=shared), G(torch.zeros(1, 16), None, noise_mode="const"))


def test_explicit_noise_maps_are_per_layer_and_per_sample():
    """A given map replaces only its layer's noise (the others follow noise_mode), scaled by that layer's
    noise_strength; a per-sample map changes only its own sample; the maps get gradients through G.synthesis."""
    G = small_G(16).eval()
    ws = G.mapping(torch.randn(3, 16), None)
    ref = G.synthesis(ws, noise_mode="const")
    maps = {"b16.conv1": torch.randn(3, 1, 16, 16)}
    assert torch.equal(G.synthesis(ws, noise=maps, noise_mode="const"), ref)  # noise_strength 0 at init
    G.synthesis.b16.conv1.noise_strength.data.fill_(0.5)
    ref = G.synthesis(ws, noise_mode="const")
    got = G.synthesis(ws, noise=maps, noise_mode="const")
    assert not torch.allclose(got, ref, atol=1e-3)
    const = {"b16.conv1": G.synthesis.b16.conv1.noise_const.expand(3, 1, 16, 16).clone()}
    const["b16.conv1"][1] = maps["b16.conv1"][1]
    got = G.synthesis(ws, noise=const, noise_mode="const")
    assert torch.equal(got[[0, 2]], ref[[0, 2]]) and not torch.allclose(got[1], ref[1], atol=1e-3)
    assert torch.equal(G.synthesis(ws, noise={"b8.conv0": torch.zeros(8, 8)}, noise_mode="none"),
                       G.synthesis(ws, noise_mode="none"))
    for layer in (G.synthesis.b4.conv1, G.synthesis.b8.conv0):
        layer.noise_strength.data.fill_(0.5)
    maps = {name: torch.randn(3, 1, layer.resolution, layer.resolution, requires_grad=True)
            for name, layer in G.synthesis.noise_layers()}
    G.synthesis(ws, noise=maps, noise_mode="none").square().sum().backward()
    for name, layer in G.synthesis.noise_layers():
        grad = maps[name].grad
        assert grad is not None and grad.shape == maps[name].shape
        assert (grad.abs().sum() > 0) == (layer.noise_strength.item() != 0), name


def test_explicit_noise_errors():
    """Explicit noise maps that do not fit are refused with the layer names or the expected shapes."""
    G = small_G(16)
    ws = G.mapping(torch.randn(2, 16), None)
    with pytest.raises(ValueError, match=r"no noise layer named \['b16.conv2'\]"):
        G.synthesis(ws, noise={"b16.conv2": torch.zeros(16, 16)})
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        G.synthesis(ws, noise={"b8.conv1": torch.zeros(2, 1, 16, 16)})
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        G.synthesis(ws, noise={"b8.conv1": torch.zeros(3, 1, 8, 8)})
    with pytest.raises(ValueError, match="no noise layer named"):
        G.synthesis.b8(None, None, ws[:, :3], noise={"conv2": torch.zeros(8, 8)})
    quiet = Generator(16, 0, 16, 8, 3, mapping_kwargs=dict(num_layers=2),
                      synthesis_kwargs=dict(channel_base=256, channel_max=16, use_noise=False))
    assert quiet.synthesis.noise_layers() == []
    with pytest.raises(ValueError, match="use_noise=False"):
        quiet.synthesis.b8.conv1(torch.zeros(1, 16, 8, 8), torch.zeros(1, 16), noise=torch.zeros(8, 8))


def test_fused_and_split_modconv_agree():
    """The grouped (fused) and split modulated convolutions give the same images."""
    G = small_G(32, "resnet").eval()
    ws = G.mapping(torch.randn(3, 16), None)
    a = G.synthesis(ws, noise_mode="const", fused_modconv=True)
    b = G.synthesis(ws, noise_mode="const", fused_modconv=False)
    assert torch.allclose(a, b, atol=1e-5)


def test_minibatch_std_against_explicit_computation():
    """Minibatch std against a per-sample, per-split computation written out."""
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


@pytest.mark.parametrize("res,cbase,g_m,d_m", [(256, 16384, 24.77, 24.00), (1024, 32768, 30.37, 29.01)])
def test_parameter_counts_match_official(res, cbase, g_m, d_m):
    """The official networks count G 24.77M / D 24.00M (paper256) and G 30.37M / D 29.01M (stylegan2, 1024 px)."""
    G = Generator(512, 0, 512, res, 3, mapping_kwargs=dict(num_layers=8),
                  synthesis_kwargs=dict(channel_base=cbase, channel_max=512))
    D = Discriminator(0, res, 3, channel_base=cbase, channel_max=512)
    assert round(count_params(G) / 1e6, 2) == g_m
    assert round(count_params(D) / 1e6, 2) == d_m


def test_bad_resolution_is_refused():
    """A resolution that is not a power of two, and images of the wrong size, are refused."""
    with pytest.raises(ValueError, match="power of two"):
        small_G(48)
    with pytest.raises(ValueError, match="expected images of shape"):
        small_D(16)(torch.randn(2, 3, 32, 32), None)


@pytest.mark.parametrize("g_arch,d_arch", [("skip", "resnet"), ("resnet", "skip")])
def test_channels_last_blocks_match_default_layout(monkeypatch, g_arch, d_arch):
    """Blocks that compute in float16 (num_fp16_res, CUDA) keep their activations channels-last, as NVIDIA's do. On this
    CPU the layout is forced for every block through the one place G's and D's blocks look it up
    (networks.layers.block_memory_format): G's images and D's logits and input gradients (R1's path) must equal those of
    the default layout (the same sums in another order: float32 rounding only), and the convolutions of both networks
    must really see channels-last inputs."""
    torch.manual_seed(0)
    G, D = small_G(16, g_arch), small_D(16, d_arch)
    z = torch.randn(4, 16)
    outs = {}
    for layout in ("default", "channels_last"):
        if layout == "channels_last":
            monkeypatch.setattr(layers, "block_memory_format", lambda dtype: torch.channels_last)
        seen_g, seen_d = [], []
        hooks = [G.synthesis.b16.conv1.register_forward_pre_hook(
                     lambda m, args: seen_g.append(args[0].is_contiguous(memory_format=torch.channels_last))),
                 D.b8.conv0.register_forward_pre_hook(
                     lambda m, args: seen_d.append(args[0].is_contiguous(memory_format=torch.channels_last)))]
        img = G(z, None, noise_mode="const")
        x = img.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(D(x, None).sum(), x)
        for hook in hooks:
            hook.remove()
        assert seen_g == [layout == "channels_last"] and seen_d == [layout == "channels_last"]
        outs[layout] = (img, D(img, None), grad)
    for a, b in zip(outs["channels_last"], outs["default"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
