"""The training step on its way to a GPU: host syncs per minibatch, fused vs reference, mixed precision, EMA, NaNs."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, four_phases, run_train, tiny_nets, tiny_nets_like
from ops import dispatch
from training import dist
from training.augment import AugmentPipe, presets
from training.loss import StyleGAN2Loss
from training.phases import optimizer_step, update_ema

sys.path.insert(0, str(ROOT / "scripts"))
from hostsync import HostSyncCounter  # noqa: E402 (scripts/: a tool of the benchmarks and tests)


# scripts/bench_sync.py as a module: the tests count with the benchmark's own configuration.
def _bench_sync():
    spec = importlib.util.spec_from_file_location("bench_sync", ROOT / "scripts/bench_sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The counter sees every kind of host read and host-to-tensor copy, names the call site, and leaves out the
# optimizers' own CPU step counters.
def test_host_sync_counter_counts_reads_and_copies():
    x = torch.arange(6.0)
    with HostSyncCounter() as c:
        x[0].item(), x.tolist(), bool(x[1]), float(x[2]), x.nonzero(), x[x > 2], x.cpu(), x.numpy()
        torch.tensor(1.0), torch.as_tensor([1, 2]), torch.full([2], 3.0), x.new_tensor(2.0)
        torch.full_like(x, 2.0), torch.where(x > 1, x, 0), x.fill_(1.0), torch.zeros(3)
    assert (c.reads, c.copies) == (8, 5)
    assert all(site.split()[1].startswith(os.path.relpath(__file__)) for site in c.sites)
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(3)
    with HostSyncCounter() as c:
        opt.step()  # Adam reads its CPU step counter: the optimizer's own, not counted
    assert (c.reads, c.copies) == (0, 0)


# The target, counted over one whole minibatch of the real loop (its step boundary included) with Gmain, Greg,
# Dmain and Dreg due and ADA at p = 0.5: at most 2 host reads (there is 1: the step boundary's) and no host-to-tensor
# copy.
def test_training_minibatch_host_syncs_one_process(ref_ops_one_thread):
    bench = _bench_sync()
    for p, aug in ((0.5, "ada"), (0.0, "noaug")):
        row = bench.count(p, aug)
        assert row["reads"] <= bench.TARGET_READS and row["copies"] == 0, row
        assert row["reads"] >= 1  # the step boundary's read (stop flag, non-finite streak, ADA statistic)


# The same with two gloo processes under accelerate launch (every rank's count).
@pytest.mark.slow
def test_training_minibatch_host_syncs_two_processes():
    row = _bench_sync()._launch(2, 0.5, "ada")
    assert 1 <= row["reads"] <= 2 and row["copies"] == 0, row


# The augmentation pipe's GPU path (every transform group) reads nothing back and copies nothing in, forward and
# through R1's double backward; untouched samples keep their pixels.
def test_augment_pipe_has_no_host_syncs():
    torch.manual_seed(0)
    pipe = AugmentPipe(**presets("bgcfnc"), sync_free=True)
    pipe.p.fill_(0.05)  # p known only on the device (p_host None): the pipe cannot take a host shortcut
    x = (torch.rand(32, 3, 16, 16) * 2 - 1).requires_grad_(True)
    with HostSyncCounter() as c:
        y = pipe(x)
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        g.square().sum().backward()
    assert (c.reads, c.copies) == (0, 0), c.summary()
    same = (y.detach() == x.detach()).flatten(1).all(1)
    assert 0 < int(same.sum()) < 32  # a small p leaves some samples untouched, bit for bit


# The CPU path (only the drawn samples, the margin they need: it reads) and the GPU path (the whole batch, the
# fixed margin: no reads) give the same images and R1 gradients for the same draws, at a small and a large p. Up to
# float32 rounding of the sampling grid: normalized to a padded image of a few hundred 2x pixels, a coordinate is
# exact to ~1e-5 px, and a bilinear sample moves by that times the image's slope (measured: 1.8e-5); the input
# gradient sums many such samples in another order (measured: 4e-6 of its largest entry; bound 5e-4).
def test_augment_pipe_cpu_and_gpu_paths_agree():
    torch.manual_seed(4)
    x = (torch.rand(24, 3, 16, 16) * 2 - 1).requires_grad_(True)
    for p in (0.05, 0.6):
        out = {}
        for sync_free in (False, True):
            pipe = AugmentPipe(**presets("bgcfnc"), sync_free=sync_free)
            pipe.p.fill_(p)
            torch.manual_seed(5)
            with HostSyncCounter() as c:
                y = pipe(x)
            (g,) = torch.autograd.grad(y.square().sum(), x)
            out[sync_free] = (y.detach(), g, c.reads)
        assert out[False][2] > 0 and out[True][2] == 0
        torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-4)
        g_gpu, g_cpu = out[True][1], out[False][1]
        assert (g_gpu - g_cpu).abs().max() <= 5e-4 * g_cpu.abs().max(), p


# One step of every phase with the fused C++ kernels gives the reference ops' losses and gradients. Same weights,
# inputs and draws, float32: each op differs from its reference only by rounding order (~1e-7 relative), and one
# step compounds that over a few dozen ops (measured: <= 1.2e-6 relative on the losses, <= 7e-7 of the largest
# gradient element, also under ATEN_CPU_CAPABILITY=default and avx2); the bounds below leave 100x of margin and
# still catch any wrong gain, bias, clamp, filter tap or derivative (all O(1e-2) or more).
def test_fused_step_matches_reference(ref_ops_one_thread):
    old = dispatch.default_impl()
    try:
        out = {}
        for impl in ("ref", "fused"):
            dispatch.set_default_impl(impl)
            out[impl] = four_phases()
    finally:
        dispatch.set_default_impl(old)
    (rs, rg), (fs, fg) = out["ref"], out["fused"]
    assert set(rs) == set(fs) and len(rs) >= 8
    for k in rs:
        assert fs[k] == pytest.approx(rs[k], rel=1e-4, abs=1e-7), k
    for phase in rg:
        scale = rg[phase].abs().max()
        assert scale > 0 and (fg[phase] - rg[phase]).abs().max() <= 1e-4 * scale, phase


# R1 and path length under CPU bfloat16 autocast stay within bfloat16's accuracy of float32 on the same weights.
# bf16 keeps 8 significant bits (2^-9 = 0.2% per rounding); a gradient through ~15 layers and its square gather
# a few % (measured: R1 6%, path length 0.8%, the G loss 0.1%); an underflowing or unscaled gradient would be off
# by 100%.
def test_bf16_r1_and_path_length_match_fp32(ref_ops_one_thread):
    fp32, _ = four_phases()
    bf16, _ = four_phases(torch.bfloat16)
    assert bf16["Loss/r1_penalty"] == pytest.approx(fp32["Loss/r1_penalty"], rel=0.2)
    assert bf16["Loss/pl_penalty"] == pytest.approx(fp32["Loss/pl_penalty"], rel=0.05)
    assert bf16["Loss/pl_mean"] == pytest.approx(fp32["Loss/pl_mean"], rel=0.05)
    assert bf16["Loss/G/loss"] == pytest.approx(fp32["Loss/G/loss"], rel=0.01)


# D(x) = v * (w . x) with v = w_i = 2^-13 (exact in float16): its input gradient 2^-26 underflows to 0 in float16
# autocast (the smallest subnormal is 2^-24), so R1 vanishes; with a grad scaler (2^16, over a batch of 4) the
# loss takes it on the scaled output and divides after, and R1 = 48 * 2^-52 per sample comes out exactly.
def test_fp16_inner_gradients_are_scaled():
    class LinearD(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0 = torch.nn.Linear(3 * 4 * 4, 1, bias=False)
            self.fc1 = torch.nn.Linear(1, 1, bias=False)
            torch.nn.init.constant_(self.fc0.weight, 2.0 ** -13)
            torch.nn.init.constant_(self.fc1.weight, 2.0 ** -13)

        def forward(self, img, c, update_emas=False):
            return self.fc1(self.fc0(img.flatten(1)))

    D = LinearD()
    real = torch.rand(4, 3, 4, 4)
    fp16 = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    for scaler, want in ((None, 0.0), (torch.amp.GradScaler("cpu", init_scale=2.0 ** 16), 48 * 2.0 ** -52)):
        loss = StyleGAN2Loss(torch.nn.Linear(1, 1), D, r1_gamma=1.0, autocast=fp16, grad_scaler=scaler)
        D.requires_grad_(True)
        stats = loss.accumulate_gradients("Dreg", real, torch.zeros(4, 0), None, None, gain=1)
        assert float(stats["Loss/r1_penalty"]) == want


# A whole bfloat16 training tick (Accelerate's CPU autocast) runs with finite losses and moves the weights.
@pytest.mark.slow
def test_bf16_training_tick(tmp_path):
    args = ["model=tiny", "train=test", "log.progress=false", "model.channel_base=128", "model.channel_max=16",
            "data.num_images=64", "metrics=none", "train.ops_impl=ref", "train.cpu_threads=1", "aug=ada", "aug.p=0.3",
            "train.kimg=0.032", "train.mixed_precision=bf16", "run_dir=run"]
    proc = run_train(args, tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = [json.loads(x) for x in (tmp_path / "run/stats.jsonl").read_text().splitlines()][-1]
    losses = {k: v for k, v in stats.items() if k.startswith("Loss/")}
    assert len(losses) >= 6 and all(np.isfinite(v) for v in losses.values()), losses
    state = torch.load(tmp_path / "run/training-state-000000.pt", weights_only=True)
    assert state["counters"]["cur_nimg"] == 32 and state["counters"]["skipped_steps"] == 0
    G0, D0 = tiny_nets_like(state)
    for name, net in (("G", G0), ("D", D0)):
        moved = [k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.equal(v, state[name][k])]
        assert len(moved) > 10, name


# G_ema follows G in one multi-tensor lerp, p_ema + (1 - beta) (p - p_ema) with beta = 0.5^(batch / ema_nimg);
# the running mean w_avg is copied, constant buffers (noise maps, filters) are not touched.
def test_ema_lerp_and_buffers():
    G, _ = tiny_nets(1)
    G_ema, _ = tiny_nets(2)
    before = {k: v.clone() for k, v in G_ema.state_dict().items()}
    G.mapping.w_avg.normal_()
    G.synthesis.b8.conv1.noise_const.fill_(7.0)
    update_ema(G_ema, G, cur_nimg=10_000, batch_size=32, ema_kimg=10, ema_rampup=None)
    beta = 0.5 ** (32 / 10_000)
    for (name, p), p_ema in zip(G.named_parameters(), G_ema.parameters()):
        torch.testing.assert_close(p_ema, before[name] + (1 - beta) * (p.detach() - before[name]),
                                   rtol=1e-6, atol=1e-6)
    assert torch.equal(G_ema.mapping.w_avg, G.mapping.w_avg)
    assert torch.equal(G_ema.synthesis.b8.conv1.noise_const, before["synthesis.b8.conv1.noise_const"])
    assert [n for n, _ in G.named_buffers() if n.endswith(dist.CHANGING_BUFFERS)] == ["mapping.w_avg"]


# A NaN in a phase's gradient: the step sees zeros (Adam with beta1 = 0 leaves the weights exactly where they
# were), and the flag says so on the device; a finite gradient steps normally.
def test_nonfinite_gradient_steps_with_zeros():
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.randn(5, 4))
    opt = torch.optim.Adam([w], lr=0.1, betas=(0.0, 0.99))
    before = w.detach().clone()
    w.grad = torch.randn(5, 4)
    w.grad[2, 1] = float("nan")
    bad = optimizer_step(opt, [w], scaler=None)
    assert bad.dtype == torch.bool and bool(bad) and torch.equal(w.detach(), before)
    assert torch.equal(w.grad, torch.zeros(5, 4))
    w.grad = torch.randn(5, 4)
    bad = optimizer_step(opt, [w], scaler=None)
    assert not bool(bad) and not torch.equal(w.detach(), before)
