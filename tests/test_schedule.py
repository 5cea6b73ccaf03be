"""Progressive growing: G and D fade-in identities, stage selection, stage reals, snapshot stage metadata."""
import pytest
import torch
import torch.nn.functional as F

from helpers import TINY, run_train
from networks.discriminator import Discriminator
from networks.generator import Generator
from ops.upfirdn2d import downsample2d, setup_filter, upsample2d
from training.io.checkpoint import load_snapshot, save_snapshot
from training.config import ScheduleConfig, TrainConfig
from training.schedule import Schedule, make_schedule, stage_meta, stage_reals

pytestmark = pytest.mark.usefixtures("ref_ops_one_thread")
FILTER = setup_filter([1, 3, 3, 1])


# A tiny conditional G/D pair at 32 px, built for growing (grow=True) or not.
def nets(g_arch="skip", d_arch="resnet", grow=True, seed=0, res=32):
    torch.manual_seed(seed)
    G = Generator(z_dim=8, c_dim=2, w_dim=8, img_resolution=res, img_channels=3,
                  mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(channel_base=128, channel_max=8, architecture=g_arch,
                                        **({"grow": True} if grow else {})))
    D = Discriminator(c_dim=2, img_resolution=res, img_channels=3, architecture=d_arch, channel_base=128,
                      channel_max=8, mbstd_group_size=2, grow=grow)
    for net in (G, D):  # Random biases and noise strengths, so that no term of the blend is trivially zero.
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith(("bias", "noise_strength")):
                    p.copy_(torch.randn_like(p) * 0.3)
    return G.eval(), D.eval()


def g_out(G, ws, res, alpha):
    G.synthesis.set_stage(res, alpha)
    return G.synthesis(ws, noise_mode="const")


def d_out(D, img, c, res, alpha):
    D.set_stage(res, alpha)
    return D(img, c)


# Fade 0 at a new resolution is the previous stage's output upsampled; fade 1 is the new block alone, i.e. the plain
# network truncated at that resolution (for a skip G: the sum of every ToRGB; otherwise: the block's own ToRGB).
@pytest.mark.parametrize("arch", ["skip", "resnet", "orig"])
def test_generator_fade_endpoints(arch):
    G, _ = nets(g_arch=arch)
    ws = torch.randn([4, G.num_ws, G.w_dim])
    with torch.no_grad():
        for res in (8, 16, 32):
            prev = g_out(G, ws, res // 2, 1.0)
            at0 = g_out(G, ws, res, 0.0)
            torch.testing.assert_close(at0, upsample2d(prev, FILTER), rtol=0, atol=1e-6)
            at1 = g_out(G, ws, res, 1.0)
            assert at1.shape == (4, 3, res, res)
            assert (at1 - at0).abs().max() > 1e-3  # The new block contributes.
            mid = g_out(G, ws, res, 0.25)
            torch.testing.assert_close(mid, 0.75 * at0 + 0.25 * at1, rtol=0, atol=1e-5)
        full = g_out(G, ws, 32, 1.0)
    if arch == "skip":  # A skip G needs no extra layers: the same state dict as without grow.
        plain, _ = nets(g_arch=arch, grow=False)
        assert list(plain.state_dict()) == list(G.state_dict())
    else:  # The full-resolution output does not depend on the extra ToRGB layers of lower blocks.
        with torch.no_grad():
            G.synthesis.b16.torgb.weight.add_(1.0)
            torch.testing.assert_close(g_out(G, ws, 32, 1.0), full, rtol=0, atol=0)


# D at fade 0 equals the previous stage's D on the downsampled images; at fade 1, the new block's full path; the
# midpoint is linear in the features (so not in the logits), hence only the endpoints are compared exactly.
@pytest.mark.parametrize("arch", ["resnet", "skip", "orig"])
def test_discriminator_fade_endpoints(arch):
    _, D = nets(d_arch=arch)
    img, c = torch.randn([4, 3, 32, 32]), F.one_hot(torch.tensor([0, 1, 1, 0]), 2).float()
    with torch.no_grad():
        for res in (8, 16, 32):
            x = F.avg_pool2d(img, 32 // res)
            at0 = d_out(D, x, c, res, 0.0)
            prev = d_out(D, downsample2d(x, FILTER), c, res // 2, 1.0)
            torch.testing.assert_close(at0, prev, rtol=0, atol=1e-5)
            at1 = d_out(D, x, c, res, 1.0)
            assert (at1 - at0).abs().max() > 1e-4
        full = d_out(D, img, c, 32, 1.0)
        plain = Discriminator(**{k: v for k, v in D.init_kwargs.items() if k != "grow"})
        plain.load_state_dict(D.state_dict(), strict=False)
        torch.testing.assert_close(plain.eval()(img, c), full, rtol=0, atol=0)  # Extra fromRGBs unused at full res.


# The stage-4 D (images straight into the epilogue) and the fade from 4 to 8 px.
def test_discriminator_stage4():
    _, D = nets(d_arch="resnet")
    img, c = torch.randn([4, 3, 8, 8]), torch.zeros([4, 2])
    with torch.no_grad():
        torch.testing.assert_close(d_out(D, img, c, 8, 0.0), d_out(D, downsample2d(img, FILTER), c, 4, 1.0),
                                   rtol=0, atol=1e-5)


# Gradients reach the new block during a fade and the old entry (fromRGB of the previous stage) too.
def test_fade_gradients_reach_both_paths():
    G, D = nets(d_arch="resnet", g_arch="resnet")
    G.train(), D.train()
    G.set_stage(16, 0.5), D.set_stage(16, 0.5)
    z, c = torch.randn([4, 8]), torch.zeros([4, 2])
    D(G(z, c), c).sum().backward()
    for name in ("synthesis.b16.torgb.weight", "synthesis.b8.torgb.weight", "synthesis.b16.conv1.weight"):
        assert G.get_parameter(name).grad.abs().sum() > 0, name
    for name in ("b16.fromrgb.weight", "b8.fromrgb.weight", "b16.conv1.weight"):
        assert D.get_parameter(name).grad.abs().sum() > 0, name
    assert G.get_parameter("synthesis.b32.conv1.weight").grad is None  # Above the stage: untouched.


# Without grow, the stages a non-skip network cannot output are refused with a message that says how to build it.
def test_stage_needs_grow():
    G, D = nets(g_arch="resnet", d_arch="resnet", grow=False)
    with pytest.raises(ValueError, match="grow=True"):
        G.set_stage(16, 1.0)
    with pytest.raises(ValueError, match="grow=True"):
        D.set_stage(16, 1.0)
    with pytest.raises(ValueError, match="must be one of"):
        G.set_stage(12, 1.0)
    with pytest.raises(ValueError, match=r"expected images of shape \[N, 3, 32, 32\]"):
        D(torch.zeros([2, 3, 16, 16]), torch.zeros([2, 2]))


# Stage boundaries, fade weights and per-stage settings from the config; bad configs name the key.
def test_schedule_stages():
    train = TrainConfig(batch_size=32, batch_gpu=None, glr=0.002, dlr=0.002)
    s = Schedule(ScheduleConfig(start_res=8, stable_kimg=2, fade_kimg=1, boundaries_kimg=[], batch_size=[64, 32, 16]),
                 32, train)
    assert s.resolutions == [8, 16, 32] and s.starts == [0, 2000, 5000]
    assert s.at(0) == s.at(1999) and s.at(1999).resolution == 8 and s.at(1999).alpha == 1.0
    st = s.at(2500)
    assert (st.index, st.resolution, st.alpha, st.batch_size, st.glr) == (1, 16, 0.5, 32, 0.002)
    assert s.at(3000).alpha == 1.0 and s.at(4999).resolution == 16
    assert (s.at(5250).resolution, s.at(5250).alpha, s.at(10 ** 9).alpha) == (32, 0.25, 1.0)
    s = Schedule(ScheduleConfig(start_res=4, stable_kimg=0, fade_kimg=0, boundaries_kimg=[1, 1.5, 4]), 32, train)
    assert [s.at(n).resolution for n in (999, 1000, 1499, 1500, 4000)] == [4, 8, 8, 16, 32]
    assert s.at(1000).alpha == 1.0  # No fade.
    bad = [(dict(start_res=12), "start_res"), (dict(start_res=64), "start_res"),
           (dict(boundaries_kimg=[1]), "boundaries_kimg has 1"), (dict(boundaries_kimg=[2, 2.5]), "room"),
           (dict(batch_size=[1, 2]), "batch_size has 2"), (dict(target_res=64), "prog32")]
    for override, msg in bad:
        cfg = {**dict(start_res=8, stable_kimg=2, fade_kimg=1, boundaries_kimg=[]), **override}
        with pytest.raises(ValueError, match=msg):
            Schedule(ScheduleConfig(**cfg), 32, train)
    assert make_schedule(ScheduleConfig(enabled=False), 32, train) is None


# Reals at a stage: the box average of the dataset image, blended like the fakes during a fade.
def test_stage_reals():
    img = torch.randn([2, 3, 32, 32])
    box = img.reshape(2, 3, 8, 4, 8, 4).mean(dim=(3, 5))
    torch.testing.assert_close(stage_reals(img, 8, 1.0), box)
    at0 = stage_reals(img, 8, 0.0)
    torch.testing.assert_close(at0, upsample2d(downsample2d(box, FILTER), FILTER))
    torch.testing.assert_close(stage_reals(img, 8, 0.3), 0.7 * at0 + 0.3 * box)
    assert torch.equal(stage_reals(img, 32, 1.0), img)


# A snapshot taken during a stage records it; the loaded G generates at that stage's resolution and fade.
def test_snapshot_records_stage(tmp_path):
    G, D = nets(g_arch="resnet")
    G.set_stage(16, 0.5), D.set_stage(16, 0.5)
    path = tmp_path / "snap.safetensors"
    save_snapshot(path, G, D, G, extra={"stage": stage_meta(G)})
    snap = load_snapshot(path)
    assert snap["G_ema"].stage == (16, 0.5) and snap["D"].stage == (16, 0.5)
    z, c = torch.randn([2, 8]), torch.zeros([2, 2])
    with torch.no_grad():
        torch.testing.assert_close(snap["G_ema"](z, c, noise_mode="const"), G(z, c, noise_mode="const"))


# A stage's learning rates reach every optimizer, times the lazy-regularization ratio k/(k+1) of its phases.
def test_stage_learning_rates_with_lazy_ratio():
    from training.phases import make_phases
    from training.schedule import Stage, set_stage
    G, D = nets()
    t = TrainConfig(glr=0.002, dlr=0.002, beta1=0.0, beta2=0.99, eps=1e-8, pl_interval=4, r1_interval=16)
    phases = make_phases(G, D, t, use_pl=True, use_r1=True)
    set_stage([G, D], phases, Stage(1, 16, 0.25, 0, 8, None, glr=0.01, dlr=0.03))
    lrs = {ph.name: ph.opt.param_groups[0]["lr"] for ph in phases}
    assert lrs == pytest.approx({"Gmain": 0.01 * 4 / 5, "Greg": 0.01 * 4 / 5, "Dmain": 0.03 * 16 / 17,
                                 "Dreg": 0.03 * 16 / 17})
    assert G.stage == (16, 0.25) and D.stage == (16, 0.25)


# ---- End-to-end: the schedule in the training loop (subprocess runs of scripts/train.py, as tests/test_training.py).

# Stages 8 -> 16 -> 32 px starting at 0.032 and 0.056 kimg (multiples of the batch), a 16-image fade, a batch of 16
# at 8 px and 8 above; ticks every 40 images, so the stage starts are ticks only because a new stage ends a tick.
PROG = ["schedule=prog32", "schedule.start_res=8", "schedule.boundaries_kimg=[0.032,0.056]",
        "schedule.fade_kimg=0.016", "schedule.batch_size=[16,8,8]", "train.tick_kimg=0.04"]


def read_stats(run_dir):
    import json
    return [json.loads(x) for x in (run_dir / "stats.jsonl").read_text().splitlines()]


# Stage transitions at the configured kimg in stats.jsonl, with the stage's batch and fade; a snapshot taken mid-fade
# records its stage and generates at its resolution; the grids are shown at the dataset's size.
def test_stage_transitions_in_a_short_run(tmp_path):
    import PIL.Image
    proc = run_train(TINY + PROG + ["train.kimg=0.064", "run_dir=run"], tmp_path)
    rows = [(round(s["Progress/kimg"] * 1000), s["Progress/resolution"], s["Progress/fade"],
             s["Progress/batch_size"]) for s in read_stats(tmp_path / "run")]
    assert rows == [(0, 8, 1.0, 16), (32, 16, 0.0, 8), (56, 32, 0.0, 8), (64, 32, 0.5, 8)]
    assert "Stage 1: 16 px from 0.032 kimg" in proc.stdout and "Stage 2: 32 px from 0.056 kimg" in proc.stdout
    snap = load_snapshot(tmp_path / "run/network-snapshot-000000.safetensors")
    assert snap["meta"]["stage"] == {"resolution": 32, "alpha": 0.5}
    assert snap["G_ema"].stage == (32, 0.5) and snap["D"].stage == (32, 0.5)
    state = torch.load(tmp_path / "run/training-state-000000.pt", weights_only=True)
    assert state["stage"] == {"resolution": 32, "alpha": 0.5}
    assert PIL.Image.open(tmp_path / "run/fakes000000.png").size == (4 * 32, 2 * 32)
    # A resnet D grows a fromRGB per resolution; a skip G needs none (same keys as without the schedule).
    assert "b16.fromrgb.weight" in snap["D"].state_dict() and "grow" not in snap["G"].init_kwargs["synthesis_kwargs"]


# Bad schedules are refused at start-up, naming the key: a preset for another resolution, a stage batch that the
# minibatch-std group does not divide.
def test_bad_schedule_is_refused_at_startup(tmp_path):
    proc = run_train(TINY + ["schedule=prog64", "run_dir=a"], tmp_path, check=False)
    assert proc.returncode != 0 and "schedule=prog64 is made for 64 px, but the dataset is 32 px" in proc.stderr
    proc = run_train(TINY + PROG + ["schedule.batch_size=[16,6,8]", "run_dir=b"], tmp_path, check=False)
    assert proc.returncode != 0 and "schedule stage 1 (16 px" in proc.stderr and "mbstd_group=4" in proc.stderr


# Everything at once for two ticks: progressive schedule (a stage change mid-run), spectral norm in G and D,
# self-attention in G and D at stage resolutions, hinge loss and ADA with a fast p. Losses stay finite, p moves,
# and the snapshot carries SN buffers, attention gates and the stage.
def test_schedule_sn_attention_hinge_ada_two_ticks(tmp_path):
    import math
    args = [a for a in TINY if a != "aug=noaug"] + PROG + [
        "model.sn=both", "model.attention_g=[8,16]", "model.attention_d=[16]", "train.loss=hinge", "aug=ada",
        "aug.ada_kimg=1", "aug.ada_interval=1", "aug.ada_target=0.0", "train.kimg=0.048", "outdir=runs"]
    run_train(args, tmp_path)
    run_dir = tmp_path / "runs/00000-synthetic-tiny-prog32"  # The schedule preset is part of the run's name.
    stats = read_stats(run_dir)
    assert [s["Progress/tick"] for s in stats] == [0, 1, 2]
    assert [s["Progress/resolution"] for s in stats] == [8, 16, 16]
    for s in stats[1:]:
        for key in ("Loss/G/loss", "Loss/D/loss_real", "Loss/D/loss_fake", "Loss/r1_penalty"):
            assert math.isfinite(s[key]), key
    assert stats[-1]["Progress/augment_p"] > 0  # Target 0: p rises at every update.
    snap = load_snapshot(run_dir / "network-snapshot-000000.safetensors")
    G, D = snap["G_ema"], snap["D"]
    assert G.stage == (16, 1.0) and D.stage == (16, 1.0)
    assert any(k.endswith("sn_u") for k in D.state_dict()) and any(k.endswith("sn_u") for k in G.state_dict())
    assert "synthesis.b16.attn.gamma" in G.state_dict() and "b16.attn.gamma" in D.state_dict()
    assert float(D.b16.attn.gamma.abs()) > 0  # The gate left 0: attention trained through the stages.
    with torch.no_grad():
        img = G(torch.randn([2, G.z_dim]), torch.zeros([2, 0]), noise_mode="const")
    assert img.shape == (2, 3, 16, 16) and torch.isfinite(img).all()
