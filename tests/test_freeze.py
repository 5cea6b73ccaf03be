"""Freeze-D (train.freeze_d, NVIDIA's --freezed): D's layer order, frozen parameters through real steps, import."""
import copy
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import TINY, assert_same, run_train, tiny_nets, tiny_nets_like
from networks.discriminator import Discriminator
from networks.factory import build_networks
from tests import official_builder as ob
from training import run as run_setup
from training.config import ModelConfig, TrainConfig, compose_config
from training.io import official
from training.io.checkpoint import save_snapshot
from training.loss import StyleGAN2Loss
from training.loop import LoopHooks
from training.phases import freeze_summary, make_phases, optimizer_step
from training.resume import read_weights, resolve_freeze_d, source_freeze_d
from training.state import TrainState

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from probes import ProbeDone, run_with_probe  # noqa: E402 (scripts/: the benchmarks' loop probes)

# NVIDIA's counting at 32 px (blocks 32, 16, 8 above the 4x4 epilogue): per block from the input, fromRGB where the
# block has one (the entry block; every block with skip), conv0, conv1, and the skip with resnet.
ORDER = {
    "resnet": ["b32.fromrgb", "b32.conv0", "b32.conv1", "b32.skip", "b16.conv0", "b16.conv1", "b16.skip",
               "b8.conv0", "b8.conv1", "b8.skip"],
    "skip": ["b32.fromrgb", "b32.conv0", "b32.conv1", "b16.fromrgb", "b16.conv0", "b16.conv1", "b8.fromrgb",
             "b8.conv0", "b8.conv1"],
    "orig": ["b32.fromrgb", "b32.conv0", "b32.conv1", "b16.conv0", "b16.conv1", "b8.conv0", "b8.conv1"],
}


# A small D (32 px unless told), in training mode.
def small_d(arch="resnet", res=32, **kw):
    kw = dict(dict(c_dim=0, channel_base=128, channel_max=8, conv_clamp=256), **kw)
    return Discriminator(img_resolution=res, img_channels=3, architecture=arch, **kw).train()


# The tiny preset's G and D at 32 px (test_step's), from `seed`, with no gradients on until a phase asks.
def tiny_gd(seed=0):
    G, D = tiny_nets(seed)
    return G.requires_grad_(False), D.requires_grad_(False)


# The layer order of each architecture is the stated rule; layer i holds exactly its own module's parameters.
@pytest.mark.parametrize("arch", ["resnet", "skip", "orig"])
def test_layer_order_matches_nvidia_counting(arch):
    D = small_d(arch)
    layers = D.freezable_layers()
    assert [name for name, _ in layers] == ORDER[arch]
    assert all(modules == [name] for name, modules in layers)
    for n in range(len(layers) + 1):
        want = {f"{m}.{p}" for m in ORDER[arch][:n] for p, _ in D.get_submodule(m).named_parameters()}
        assert set(D.frozen_parameters(n)) == want
    assert list(D.frozen_parameters(2)) == ["b32.fromrgb.weight", "b32.fromrgb.bias", "b32.conv0.weight",
                                            "b32.conv0.bias"]


# The counts at the official resolutions (resnet): 4 + 3 per lower block, so --freezed=10 freezes the top three
# blocks and --freezed=13 the top four (NVIDIA's suggested values for transfer learning).
@pytest.mark.parametrize("res, blocks10, blocks13", [(256, [256, 128, 64], [256, 128, 64, 32]),
                                                     (1024, [1024, 512, 256], [1024, 512, 256, 128])])
def test_counts_at_official_resolutions(res, blocks10, blocks13):
    D = small_d(res=res, channel_base=4096, channel_max=4)
    layers = [name for name, _ in D.freezable_layers()]
    assert len(layers) == 4 + 3 * (len(D.block_resolutions) - 1)
    assert sorted({int(n.split(".")[0][1:]) for n in layers[:10]}, reverse=True) == blocks10
    assert sorted({int(n.split(".")[0][1:]) for n in layers[:13]}, reverse=True) == blocks13
    assert layers[9].endswith(".skip") and layers[12].endswith(".skip")


# Self-attention and grow's extra fromRGB are not counted: they freeze with their block's conv0.
def test_attention_and_grow_fromrgb_go_with_conv0():
    D = small_d(attention=[16], grow=True)
    assert [name for name, _ in D.freezable_layers()] == ORDER["resnet"]
    four, five = set(D.frozen_parameters(4)), set(D.frozen_parameters(5))
    extra = {n for n in five - four if not n.startswith("b16.conv0.")}
    assert extra and all(n.startswith(("b16.attn.", "b16.fromrgb.")) for n in extra)
    assert any(n.startswith("b16.attn.") for n in extra) and any(n.startswith("b16.fromrgb.") for n in extra)


# A count beyond the number of layers freezes every block, never the epilogue (b4) or the label mapping;
# a negative count is refused.
def test_freeze_beyond_the_layers_keeps_epilogue_and_mapping():
    D = small_d(c_dim=4)
    frozen = D.frozen_parameters(1000)
    assert set(frozen) == set(D.frozen_parameters(len(ORDER["resnet"])))
    rest = {n for n, _ in D.named_parameters()} - set(frozen)
    assert all(n.startswith(("b4.", "mapping.")) for n in rest)
    assert any(n.startswith("b4.") for n in rest) and any(n.startswith("mapping.") for n in rest)
    assert all(n.split(".")[0] in {f"b{r}" for r in D.block_resolutions} for n in frozen)
    assert "all blocks" in freeze_summary(D, 1000)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="freeze_d"):
            D.frozen_parameters(bad)


# make_phases leaves the first N layers out of D's optimizer and the phases' params, with requires_grad False;
# G and an unfrozen D are as before.
def test_make_phases_leaves_frozen_layers_out():
    G, D = tiny_gd()
    frozen = D.frozen_parameters(5)
    phases = make_phases(G, D, TrainConfig(freeze_d=5, r1_interval=2, pl_interval=2), use_pl=True, use_r1=True)
    assert [ph.name for ph in phases] == ["Gmain", "Greg", "Dmain", "Dreg"]
    in_opt = {id(p) for ph in phases for g in ph.opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in frozen.values()}
    trainable = [p for n, p in D.named_parameters() if n not in frozen]
    for ph in phases[2:]:
        assert [id(p) for p in ph.params] == [id(p) for p in trainable]
        assert [id(p) for p in ph.opt.param_groups[0]["params"]] == [id(p) for p in trainable]
        ph.set_trainable(True)
        assert all(p.requires_grad for p in trainable) and not any(p.requires_grad for p in frozen.values())
        ph.set_trainable(False)
    assert [id(p) for p in phases[0].params] == [id(p) for p in G.parameters()]
    G2, D2 = tiny_gd()
    plain = make_phases(G2, D2, TrainConfig(r1_interval=2, pl_interval=2), use_pl=True, use_r1=True)
    assert len(plain[2].params) == len(list(D2.parameters()))
    with pytest.raises(ValueError, match="freeze_d"):
        make_phases(G2, D2, TrainConfig(), use_pl=True, use_r1=True, freeze_d=-2)


# Real minibatches through StyleGAN2Loss (Dmain, Dreg with R1, Gmain, Greg), stepped as the loop steps: the frozen
# parameters stay bit-identical and never get a gradient, every other D parameter and G moves.
def test_frozen_parameters_unchanged_after_real_steps(ref_ops_one_thread):
    G, D = tiny_gd()
    phases = make_phases(G, D, TrainConfig(freeze_d=5, r1_interval=2, pl_interval=2), use_pl=True, use_r1=True)
    loss = StyleGAN2Loss(G, D, r1_gamma=1.0, pl_weight=2.0)
    frozen = set(D.frozen_parameters(5))
    before = {n: p.detach().clone() for n, p in list(D.named_parameters()) + list(G.named_parameters(prefix="G"))}
    torch.manual_seed(3)
    r1 = []
    for batch_idx in range(4):
        real, z, c = torch.rand(8, 3, 32, 32) * 2 - 1, torch.randn(8, 32), torch.zeros(8, 0)
        for ph in phases:
            if batch_idx % ph.interval != 0:
                continue
            ph.opt.zero_grad(set_to_none=True)
            ph.set_trainable(True)
            stats = loss.accumulate_gradients(ph.name, real, c, z, c, gain=ph.interval)
            ph.set_trainable(False)
            r1 += [float(stats["Loss/r1_penalty"])] if "Loss/r1_penalty" in stats else []
            assert all(p.grad is None for n, p in D.named_parameters() if n in frozen)
            bad = optimizer_step(ph.opt, [p for p in ph.params if p.grad is not None], None)
            assert bad is not None and not bool(bad)
    assert len(r1) == 2 and all(v > 0 for v in r1)
    for n, p in D.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n
    assert all(not torch.equal(p, before[n]) for n, p in G.named_parameters(prefix="G"))


# R1 differentiates through the frozen layers with respect to the images: the penalty and the trainable
# parameters' gradients are those of the same D without Freeze-D.
def test_r1_passes_through_frozen_layers(ref_ops_one_thread):
    G, D = tiny_gd()
    D_plain = copy.deepcopy(D)
    ph = make_phases(G, D, TrainConfig(freeze_d=7, r1_interval=2), use_pl=False, use_r1=True)[-1]
    ph_plain = make_phases(G, D_plain, TrainConfig(r1_interval=2), use_pl=False, use_r1=True)[-1]
    frozen = set(D.frozen_parameters(7))
    real, c = torch.rand(8, 3, 32, 32) * 2 - 1, torch.zeros(8, 0)
    out = []
    for phase, net in ((ph, D), (ph_plain, D_plain)):
        phase.set_trainable(True)
        stats = StyleGAN2Loss(G, net, r1_gamma=1.0).accumulate_gradients("Dreg", real, c, None, c, gain=1)
        phase.set_trainable(False)
        out.append((float(stats["Loss/r1_penalty"]), {n: p.grad for n, p in net.named_parameters()}))
    assert out[0][0] == out[1][0] > 0
    for n, g in out[0][1].items():
        if n in frozen:
            assert g is None and out[1][1][n] is not None
        else:
            torch.testing.assert_close(g, out[1][1][n], rtol=0, atol=0)


# The training state of a frozen-D run (D's optimizer over the trainable parameters only) round-trips.
def test_train_state_round_trip_with_frozen_layers():
    model = ModelConfig(channel_base=64, channel_max=8, z_dim=8, w_dim=8, map_layers=1)
    train = TrainConfig(freeze_d=4, r1_interval=2, pl_interval=2)
    config = {"model": dataclasses.asdict(model), "train": dataclasses.asdict(train), "aug": {}}

    def make(seed):
        torch.manual_seed(seed)
        G, D, G_ema = build_networks(model, 16, 3, 0)
        loss = StyleGAN2Loss(G, D, r1_gamma=1.0, pl_weight=2.0)
        return TrainState(G, D, G_ema, make_phases(G, D, train, use_pl=True, use_r1=True), loss, config=config,
                          requested=config)
    a = make(1)
    for ph in a.phases:
        if ph.owns_opt:
            for p in ph.params:
                p.grad = torch.randn_like(p)
            ph.opt.step()
    saved = a.state_dict()
    d_opt = saved["opt"][1]
    assert len(d_opt["state"]) == len(d_opt["param_groups"][0]["params"]) == len(a.phases[2].params)
    assert len(a.phases[2].params) < len(list(a.D.parameters()))
    b = make(2)
    b.load_state_dict(saved)
    again = b.state_dict()
    saved.pop("rng"), again.pop("rng")  # the RNG of the moment (test_state checks that field)
    assert assert_same(again, saved) > 0
    assert not any(p.requires_grad for p in b.D.frozen_parameters(4).values())


# An official D pickle (frozen layers' weights stored as buffers, as NVIDIA stores them) keeps its freeze_layers
# on import, as config['freeze_d'], outside D's constructor arguments; resolve_freeze_d combines it with
# train.freeze_d (an explicit value wins, 0 included) and with a ganforge snapshot or training state.
def test_official_pickle_keeps_freeze_layers(tmp_path):
    D = small_d()
    kwargs = dict(c_dim=0, img_resolution=32, img_channels=3, architecture="resnet", channel_base=128, channel_max=8,
                  conv_clamp=256, block_kwargs=ob.EasyDict(freeze_layers=4, activation="lrelu"), mapping_kwargs={},
                  epilogue_kwargs=ob.EasyDict(mbstd_group_size=4))
    tree = ob.module_tree(D.state_dict(), {"": "Discriminator"}, {"": kwargs})
    for layer in ORDER["resnet"][:4]:
        node = tree
        for part in layer.split("."):
            node = node.modules[part]
        node.buffers.update(node.params)
        node.params.clear()
    path = tmp_path / "frozen.pkl"
    ob.write_pkl(path, {"G": None, "D": tree, "G_ema": None, "augment_pipe": None})
    nets = official.build_networks(path)
    assert nets["config"]["freeze_d"] == 4 and "freeze_layers" not in json.dumps(nets["config"]["D_kwargs"])
    assert_same(nets["D"].state_dict(), D.state_dict())
    assert "b32.fromrgb.weight" not in official.load_official_pkl(path)["D"]["param_names"]
    weights = read_weights({"kind": "weights", "path": str(path)})
    assert official.read_freeze_layers(path) == source_freeze_d(weights["snapshot"]) == 4
    assert [resolve_freeze_d(r, weights) for r in (None, 0, 7)] == [4, 0, 7]
    del kwargs["block_kwargs"]["freeze_layers"]
    ob.write_pkl(path, {"D": ob.module_tree(D.state_dict(), {"": "Discriminator"}, {"": kwargs})})
    weights = read_weights({"kind": "weights", "path": str(path)})
    assert official.read_freeze_layers(path) is None and resolve_freeze_d(None, weights) == 0
    kwargs["block_kwargs"]["freeze_layers"] = -1
    ob.write_pkl(path, {"D": ob.module_tree(D.state_dict(), {"": "Discriminator"}, {"": kwargs})})
    with pytest.raises(official.OfficialFormatError, match="freeze_layers=-1"):
        official.build_networks(path)
    snap = tmp_path / "network-snapshot-000000.safetensors"
    save_snapshot(snap, None, D, None, config={"train": {"freeze_d": 3}})
    assert resolve_freeze_d(None, read_weights({"kind": "weights", "path": str(snap)})) == 3
    save_snapshot(snap, None, D, None, config={"source": "frozen.pkl", "freeze_d": 5})  # convert_official.py's
    assert source_freeze_d(read_weights({"kind": "weights", "path": str(snap)})["snapshot"]) == 5
    state = {"kind": "state", "state": {"config": json.dumps({"train": {"freeze_d": 6}})}}
    assert resolve_freeze_d(None, state) == 6 and resolve_freeze_d(None, {"kind": "fresh"}) == 0


# scripts/train.py with train.freeze_d=2: the final training state's first two D layers (b32.fromrgb, b32.conv0)
# are the initial ones bit for bit, every other D parameter moved, and D's Adam holds only the trainable ones.
def test_train_script_keeps_frozen_layers(tmp_path):
    run_train(TINY + ["run_dir=run", "train.freeze_d=2"], tmp_path)
    state = torch.load(tmp_path / "run/training-state-000000.pt", weights_only=True)
    assert json.loads(state["config"])["train"]["freeze_d"] == 2
    _, D0 = tiny_nets_like(state)
    frozen = set(D0.frozen_parameters(2))
    assert frozen == {"b32.fromrgb.weight", "b32.fromrgb.bias", "b32.conv0.weight", "b32.conv0.bias"}
    for name, p in D0.named_parameters():
        assert torch.equal(state["D"][name], p.detach()) == (name in frozen), name
    assert [name for name, _ in state["phases"]] == ["Gmain", "Greg", "Dmain", "Dreg"]
    d_opt = state["opt"][1]  # One Adam per network, G's first.
    assert len(d_opt["param_groups"][0]["params"]) == len(list(D0.parameters())) - len(frozen)


# The loop in this process: after every minibatch (every phase due, R1 included) the frozen layers hold no gradient
# and requires_grad False (the loop turns requires_grad on for each phase's own parameters only).
def test_loop_gives_frozen_layers_no_gradient(tmp_path, monkeypatch, ref_ops_one_thread):
    nets, ends = {}, []

    def spy(G, D, *args, **kwargs):
        nets["D"] = D
        return make_phases(G, D, *args, **kwargs)
    monkeypatch.setattr(run_setup, "make_phases", spy)

    class Probe(LoopHooks):
        def end_minibatch(self, counters):
            frozen = nets["D"].frozen_parameters(2).values()
            ends.append(all(p.grad is None and not p.requires_grad for p in frozen))
            if counters.batch_idx >= 4:
                raise ProbeDone()
    run_with_probe(compose_config(TINY + [f"run_dir={tmp_path / 'run'}", "train.freeze_d=2"]), Probe())
    assert ends == [True] * 4
