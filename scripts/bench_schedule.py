"""Benchmark training seconds per kimg at each progressive-schedule stage against the full-resolution networks."""
import argparse
import collections
import copy
import math
import statistics
import time

import torch
import yaml

from networks.discriminator import Discriminator
from networks.factory import build_networks
from networks.generator import Generator
from ops import dispatch
from training.config import CONF_DIR, Config, ModelConfig, TrainConfig, apply_auto, check_batch
from training.loss import StyleGAN2Loss
from training.phases import make_phases, update_ema
from training.schedule import stage_reals


def load_preset(name, res):
    """The model and train settings of conf/model/<name>.yaml over the schema defaults ('auto' rules applied at `res`).
    """
    with open(CONF_DIR / "model" / f"{name}.yaml") as f:
        preset = yaml.safe_load(f) or {}
    cfg = Config(model=ModelConfig(**(preset.get("model") or {})), train=TrainConfig(**(preset.get("train") or {})))
    cfg = apply_auto(cfg, res, 1)
    return cfg.model, cfg.train


def networks(m, res, grow, device):
    """G, D and G_ema from the factory (same seed for both pairs); `grow` rebuilds a non-skip G or D with the
    ToRGB/fromRGB layers that the lower stages need, as the progressive schedule does."""
    torch.manual_seed(0)
    G, D, _ = build_networks(m, res, 3, 0)
    if grow and m.g_arch != "skip":
        kwargs = copy.deepcopy(G.init_kwargs)
        kwargs["synthesis_kwargs"]["grow"] = True
        G = Generator(**kwargs)
    if grow and m.d_arch != "skip":
        D = Discriminator(**D.init_kwargs, grow=True)
    G, D = G.train().requires_grad_(False).to(device), D.train().requires_grad_(False).to(device)
    return G, D, copy.deepcopy(G).eval()


def timed(fn, device):
    """Wall time (s) of one fn() call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def trainer(nets, t, batch, device):
    """The training loop's minibatch for one G/D pair: step(stage, due) runs the phases flagged in `due` (StyleGAN2Loss
    with make_phases' optimizers, on stage_reals at `stage` = (resolution, alpha), or on the full-resolution reals
    for stage None, with no set_stage), then the EMA update. Also returns each kind of minibatch (the set of phases
    due at batch_idx: main phases always, path length every pl_interval, lazy R1 every r1_interval) with its share
    of one period of the intervals, so that weighting the kinds' times amortizes the lazy regularizers as training
    does."""
    G, D, G_ema = nets
    loss = StyleGAN2Loss(G, D, r1_gamma=t.r1_gamma, style_mixing_prob=t.style_mixing_prob,
                         pl_weight=t.pl_weight, pl_batch_shrink=t.pl_batch_shrink, pl_decay=t.pl_decay,
                         loss_type=t.loss, wgan_lambda=t.wgan_lambda, wgan_drift=t.wgan_drift)
    phases = make_phases(G, D, t, use_pl=t.pl_weight != 0, use_r1=loss.has_d_reg)
    period = math.lcm(*(ph.interval for ph in phases))
    kinds = collections.Counter(tuple(i % ph.interval == 0 for ph in phases) for i in range(period))
    reals = torch.rand([batch, 3, G.img_resolution, G.img_resolution], device=device) * 2 - 1
    c = torch.zeros([batch, 0], device=device)
    nimg = [0]

    def step(stage, due):
        if stage is not None:
            for net in nets:
                net.set_stage(*stage)
        img = reals if stage is None else stage_reals(reals, *stage)
        for ph, on in zip(phases, due):
            if not on:
                continue
            ph.opt.zero_grad(set_to_none=True)
            ph.module.requires_grad_(True)
            z = torch.randn([batch, G.z_dim], device=device)
            loss.accumulate_gradients(ph.name, img, c, z, c, gain=ph.interval)
            ph.module.requires_grad_(False)
            ph.opt.step()
        nimg[0] += batch
        update_ema(G_ema, G, nimg[0], batch, t.ema_kimg, t.ema_rampup)

    return step, {due: n / period for due, n in kinds.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny", help="preset in conf/model/")
    ap.add_argument("--res", type=int, default=32, help="full (dataset) resolution, px")
    ap.add_argument("--start-res", type=int, default=8, help="resolution of the first stage, px")
    ap.add_argument("--batch", type=int, default=16, help="images per minibatch")
    ap.add_argument("--steps", type=int, default=3, help="timed rounds: minibatches of each kind per row (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--impl", default="auto", choices=dispatch.IMPLS, help="custom ops implementation")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device to time on (default: cuda when present)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dispatch.set_default_impl(args.impl)
    m, t = load_preset(args.model, args.res)
    check_batch(args.batch, None, 1, m.mbstd_group)
    stages = [args.start_res * 2 ** i for i in range(int(math.log2(args.res // args.start_res)) + 1)]
    if stages[-1] != args.res:
        raise SystemExit(f"--start-res {args.start_res} must be a power of two <= --res {args.res}")

    plain_step, kinds = trainer(networks(m, args.res, False, device), t, args.batch, device)
    grown_step, _ = trainer(networks(m, args.res, True, device), t, args.batch, device)
    rows = [(f"{args.res} (plain)", 1.0, plain_step, None)]
    for i, res in enumerate(stages):
        for alpha in ((0.5, 1.0) if i == 1 else (1.0,)):
            rows.append((str(res), alpha, grown_step, (res, alpha)))
    # Round 0 warms up; the rows are interleaved round by round, so that a change in the machine's load (a shared
    # machine) hits every row alike instead of whichever row runs at the time.
    times = collections.defaultdict(list)
    for rnd in range(args.steps + 1):
        for i, (_, _, step, stage) in enumerate(rows):
            for due in kinds:
                dt = timed(lambda: step(stage, due), device)
                if rnd:
                    times[i, due].append(dt)
    sec = [sum(w * statistics.median(times[i, due]) for due, w in kinds.items()) for i in range(len(rows))]

    print(f"Training step per stage, model={args.model} ({m.g_arch} G, {m.d_arch} D, cbase "
          f"{m.channel_base}, cmax {m.channel_max}), {args.res} px, pl every {t.pl_interval} "
          f"(weight {t.pl_weight:g}), R1 every {t.r1_interval}, device={device}, "
          f"threads={torch.get_num_threads()}, ops={args.impl}, {args.steps} timed minibatches per kind")
    print(f"{'stage px':<12}{'alpha':>7}{'batch':>7}{'sec/kimg':>11}{'x full':>9}")
    for (name, alpha, _, _), s in zip(rows, sec):
        print(f"{name:<12}{alpha:>7.2f}{args.batch:>7}{s / args.batch * 1000:>11.2f}{s / sec[0]:>9.2f}")


if __name__ == "__main__":
    main()
