"""The training loop: one function, with its phases in a fixed order, progress counted in images (cur_nimg)."""
import copy
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ops import dispatch
from training.io import checkpoint as ckpt
from training import dist
from training.io.images import save_image_grid, to_uint8, make_grid, save_png
from training.data.loader import default_num_workers, local_process_count, make_loader
from training.loss import StyleGAN2Loss
from networks.factory import apply_auto, build_networks
from training.preempt import Faults, NonFiniteError, ParentWatch, StopRequest, all_finite
from training.report import TickStats, evaluate_metrics, init_wandb, peak_memory_gb, write_report
from training.data.sampler import InfiniteSampler
from training.schedule import check_stage_state, make_schedule, set_stage, stage_meta, stage_reals
from training.state import (KeepRNG, check_config, load_weights, reseed, resolve_resume_all, restore_state,
                            save_checkpoint, truncate_stats, write_config_files)


# One G or D optimization phase (StyleGAN2-ADA): which loss terms, which network and optimizer, and every how
# many minibatches it runs (lazy regularization, StyleGAN2 sec. 3.1).
@dataclass
class Phase:
    name: str
    module: torch.nn.Module
    opt: torch.optim.Optimizer
    interval: int
    lr_ratio: float = 1.0  # Adam lr multiplier of the lazy-regularization compensation, k / (k + 1)


# The phases for G and D: with lazy regularization every k minibatches, Adam's lr and betas are compensated by
# k/(k+1) so that the combined updates match an unregularized schedule.
def make_phases(G, D, t: dict, use_pl: bool, use_r1: bool):
    phases = []
    for name, module, lr, interval, active in (("G", G, t["glr"], t["pl_interval"], use_pl),
                                               ("D", D, t["dlr"], t["r1_interval"], use_r1)):
        params = [p for p in module.parameters()]
        if not active or interval in (None, 0, 1):
            opt = torch.optim.Adam(params, lr=lr, betas=(t["beta1"], t["beta2"]), eps=t["eps"])
            phases.append(Phase(name + ("both" if active else "main"), module, opt, 1))
        else:
            ratio = interval / (interval + 1)
            opt = torch.optim.Adam(params, lr=lr * ratio, betas=(t["beta1"] ** ratio, t["beta2"] ** ratio),
                                   eps=t["eps"])
            phases.append(Phase(name + "main", module, opt, 1, ratio))
            phases.append(Phase(name + "reg", module, opt, interval, ratio))
    return phases


# Check batch divisibility at start-up and return (batch_gpu, accumulation rounds).
def check_batch(batch_size: int, batch_gpu, world: int, mbstd_group: int):
    if batch_gpu is None:
        if batch_size % world != 0:
            raise ValueError(f"train.batch_size={batch_size} is not divisible by the number of processes ({world})")
        batch_gpu = batch_size // world
    if batch_gpu <= 0 or batch_size % (batch_gpu * world) != 0:
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of train.batch_gpu={batch_gpu} times "
                         f"the number of processes ({world})")
    group = min(mbstd_group, batch_gpu)
    if batch_gpu % group != 0:
        raise ValueError(f"train.batch_gpu={batch_gpu} must be divisible by model.mbstd_group={mbstd_group}")
    return batch_gpu, batch_size // (batch_gpu * world)


# Update G_ema towards G: half-life ema_kimg, optionally capped at ema_rampup * cur_nimg (StyleGAN2-ADA), in one
# multi-tensor lerp; the buffers that training changes (w_avg, spectral-norm vectors) are copied in one call.
def update_ema(G_ema, G, cur_nimg: int, batch_size: int, ema_kimg: float, ema_rampup) -> None:
    ema_nimg = ema_kimg * 1000
    if ema_rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * ema_rampup)
    ema_beta = 0.5 ** (batch_size / max(ema_nimg, 1e-8))
    with torch.no_grad():
        torch._foreach_lerp_(list(G_ema.parameters()), list(G.parameters()), 1 - ema_beta)
        bufs = dist.changing_buffers(G_ema)
        if bufs:
            torch._foreach_copy_(bufs, dist.changing_buffers(G))


# Step one phase's optimizer: average the gradients over ranks, unscale them (fp16 loss scaling), make them zero
# when any value is NaN or infinite (every rank sees the same averaged gradients, so all agree without a host
# read), step, and let the grad scaler adapt its scale (GradScaler.step would read its overflow flag: a sync).
# Returns a 0-dim bool device tensor, True when the gradient was non-finite (with Adam beta1 = 0, as in every
# preset, a zero gradient leaves the weights where they were), or None when no parameter had a gradient.
def optimizer_step(opt, params, scaler):
    raw = getattr(opt, "optimizer", opt)  # under Accelerate's wrapper, the torch optimizer
    flat = dist.reduce_grads(params)
    if flat is None:
        return None
    if scaler is not None:
        scaler.unscale_(raw)
    bad = ~flat.isfinite().all()
    flat.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).mul_(~bad)
    raw.step()
    if scaler is not None:
        scaler.update()
    return bad


# The fixed latents, labels and dataset indices of the image grids (the same for every run with this seed).
def grid_setup(dataset, seed: int, grid_size, z_dim: int):
    grid_w, grid_h = grid_size
    gen = torch.Generator().manual_seed(seed + 12345)
    idx = torch.randperm(len(dataset), generator=gen)[: grid_w * grid_h].tolist()
    z = torch.randn([len(idx), z_dim], generator=gen)
    c = torch.from_numpy(np.stack([dataset.get_label(i) for i in idx]))
    return idx, z, c


# Generate G_ema images for the fixed grid latents, in batches.
@torch.no_grad()
def generate_grid(G_ema, grid_z, grid_c, batch: int):
    out = [G_ema(z, c, noise_mode="const") for z, c in zip(grid_z.split(batch), grid_c.split(batch))]
    return torch.cat(out)


# Train G and D as `cfg` (a plain dict of the resolved config) says, in `run_dir`. Resumes from the newest intact
# training state there (else from cfg['resume']); stops at the next step boundary with a checkpoint on SIGTERM,
# SIGINT or SIGUSR1. Returns the final counters (with 'stopped': the signal's name after such a stop). `probe`
# (benchmarks, tests, gpu_check) is called as probe.begin(counters) / probe.end(counters) around every minibatch
# (its step boundary included) and may raise to end the run there.
def training_loop(cfg: dict, run_dir, probe=None) -> dict:
    stop = StopRequest().install()
    try:
        return _train(cfg, Path(run_dir), stop, probe)
    finally:
        stop.uninstall()


def _train(cfg: dict, run_dir: Path, stop: StopRequest, probe) -> dict:
    from training.data.dataset import open_dataset
    requested = copy.deepcopy(cfg)  # The config as asked for (before 'auto'), compared on resume.
    t, m, d = cfg["train"], cfg["model"], cfg["data"]
    accelerator = dist.init(mixed_precision=t["mixed_precision"])
    device = dist.device()
    rank, world = dist.get_rank(), dist.get_world_size()
    dispatch.set_default_impl(t["ops_impl"])
    if device.type == "cpu":  # Oversubscribed OpenMP threads spin against each other: split the cores.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(t["cpu_threads"] or max(1, (os.cpu_count() or 1) // max(local, 1)))
    if t["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    # TF32 convolutions and matmuls (Ampere and newer) only when asked: faster, but ~1e-3 relative precision.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(t["tf32"])

    # Data: every rank reads its own shard of an endless seeded stream.
    synthetic_kwargs = dict(resolution=d["resolution"], num_images=d["num_images"]) if d["path"] is None else {}
    dataset = open_dataset(d["path"], use_labels=d["use_labels"], xflip=d["xflip"], max_size=d["max_size"],
                           random_seed=t["seed"], **synthetic_kwargs)
    apply_auto(cfg, dataset.resolution, world)
    batch_gpu, rounds = check_batch(t["batch_size"], t["batch_gpu"], world, m["mbstd_group"])
    batch_size = t["batch_size"]
    # Progressive schedule (None when off): every stage's batches are checked now, not when the stage begins.
    schedule = make_schedule(cfg, dataset.resolution)
    for start in (schedule.starts if schedule is not None else []):
        st = schedule.at(start)
        try:
            check_batch(st.batch_size, st.batch_gpu, world, m["mbstd_group"])
        except ValueError as e:
            raise ValueError(f"schedule stage {st.index} ({st.resolution} px, schedule.batch_size/batch_gpu): "
                             f"{e}") from None
    total_nimg = int(t["kimg"] * 1000)
    keep, max_nonfinite = t.get("keep", 3), t.get("max_nonfinite", 20)

    # Networks, initialized from the same seed on every rank and then made identical by broadcast from rank 0.
    torch.manual_seed(t["seed"])
    G, D, G_ema = build_networks(m, dataset.resolution, dataset.num_channels, dataset.label_dim,
                                 grow=schedule is not None)
    G, D, G_ema = G.train().requires_grad_(False).to(device), D.train().requires_grad_(False).to(device), \
        G_ema.to(device)
    for net in (G, D, G_ema):
        dist.broadcast_module(net)
    nets = {"G": G, "D": D, "G_ema": G_ema}

    # Loss and phases; optimizers go through Accelerate for mixed-precision loss scaling.
    tick_stats = TickStats()
    loss = StyleGAN2Loss(G, D, r1_gamma=t["r1_gamma"], style_mixing_prob=t["style_mixing_prob"],
                         pl_weight=t["pl_weight"], pl_batch_shrink=t["pl_batch_shrink"], pl_decay=t["pl_decay"],
                         autocast=accelerator.autocast, backward=accelerator.backward,
                         loss_type=t.get("loss", "ns"), wgan_lambda=t.get("wgan_lambda", 10.0),
                         wgan_drift=t.get("wgan_drift", 0.001), grad_scaler=accelerator.scaler)
    phases = make_phases(G, D, t, use_pl=t["pl_weight"] != 0, use_r1=loss.has_d_reg)
    unique = list({id(ph.opt): ph.opt for ph in phases}.values())
    wrapped = accelerator.prepare(*unique)
    wrapped = list(wrapped) if isinstance(wrapped, (list, tuple)) else [wrapped]
    by_id = {id(o): w for o, w in zip(unique, wrapped)}
    for ph in phases:
        ph.opt = by_id[id(ph.opt)]

    # Adaptive discriminator augmentation: every image D sees goes through the pipe (the loss applies it), and
    # the sign of D on augmented reals drives p (ADA, Karras et al. 2020, sec. 3).
    from training.data.augment import make_adaptive_p, make_augment_pipe
    augment_pipe = make_augment_pipe(cfg["aug"])
    if augment_pipe is not None:
        augment_pipe = augment_pipe.to(device)
    loss.augment_pipe = augment_pipe

    # Where to start: the run directory's newest intact training state, else cfg['resume'] (a training state or
    # run directory: everything; a snapshot: weights only, for transfer learning), else from scratch.
    if dist.is_main():
        for p in ckpt.remove_stale_temps(run_dir):
            print(f"Removed {p}, left by a checkpoint write that was interrupted", flush=True)
    plan = resolve_resume_all(cfg, run_dir, log=dist.print0)
    resumed = plan["kind"] == "state"
    counters = dict(cur_nimg=0, cur_tick=0, batch_idx=0, tick_start_nimg=0, skipped_steps=0, sampler_pos=0,
                    metrics_nimg=0, nonfinite_streak=0)
    # ada_kimg_resume (a faster p) only when starting from another run's weights; a full resume continues exactly.
    ada = make_adaptive_p(cfg["aug"], augment_pipe, batch_size=batch_size, resumed=plan["kind"] == "weights")
    rng = None
    if resumed:
        state = plan.pop("state")
        if "config_requested" in state:
            allowed = check_config(json.loads(state["config_requested"]), requested, plan["path"])
        else:  # Written before 'config_requested' existed: its config is the resolved one.
            allowed = check_config(json.loads(state["config"]), cfg, plan["path"])
        for line in allowed:
            dist.print0(f"Config change on resume (allowed): {line}")
        loaded, rng = restore_state(state, plan["path"], G, D, G_ema, phases, loss, augment_pipe, ada,
                                    accelerator.scaler, log=dist.print0)
        counters.update(loaded)
        check_stage_state(state, schedule, counters["cur_nimg"], plan["path"])
        del state
        dist.print0(f"Resuming from {plan['path']} at {counters['cur_nimg'] / 1000:.3f} kimg")
    elif plan["kind"] == "weights":
        load_weights(plan["path"], G, D, G_ema, log=dist.print0)
        dist.print0(f"Starting from the weights of {plan['path']} (optimizers, counters and augmentation start "
                    f"fresh)")
    if ada is not None:
        loss.on_real_logits = ada.accumulate
    if dist.is_main():  # stats.jsonl keeps the lines up to the resume point (none when starting afresh).
        write_config_files(run_dir, requested)
        truncate_stats(run_dir, counters["cur_nimg"] if resumed else -1)
    if resumed and counters["cur_nimg"] >= total_nimg:
        dist.print0(f"Already trained to {counters['cur_nimg'] / 1000:.3f} kimg (train.kimg={t['kimg']}): nothing "
                    f"to do; raise train.kimg to continue")
        if dist.is_main():
            (run_dir / "DONE").write_text(json.dumps({"kimg": counters["cur_nimg"] / 1000}))
        dist.barrier()
        return counters

    # A stage's total batch, per-process batch and accumulation rounds (ADA's step size follows the batch); the
    # stage at the start (or resume) point sets them now, its resolution and learning rates at the first step.
    def stage_batch(st):
        if ada is not None:
            ada.batch_size = st.batch_size
        return (st.batch_size, *check_batch(st.batch_size, st.batch_gpu, world, m["mbstd_group"]))
    stage = schedule.at(counters["cur_nimg"]) if schedule is not None else None
    if stage is not None:
        batch_size, batch_gpu, rounds = stage_batch(stage)

    # The loader draws no global random numbers (its own generator), so that resuming does not shift them; it
    # starts at the stream position consumed so far (also when a stage changes the per-process batch).
    # Worker processes load (and pin, on CUDA) the uint8 batches off the critical path; data.num_workers=null means
    # the cores per process less one, at most 8, on an accelerator, and none on the CPU (training uses every core).
    num_workers = d["num_workers"] if d["num_workers"] is not None else \
        default_num_workers(device.type, local_process_count())

    def open_loader(batch_gpu):
        sampler = InfiniteSampler(len(dataset), rank=rank, num_replicas=world, seed=t["seed"],
                                  start=counters["sampler_pos"])
        return make_loader(dataset, sampler, batch_gpu, num_workers, device, t["seed"])
    loader = open_loader(batch_gpu)

    # Fixed grid latents and labels; reals.png once.
    grid_w, grid_h = t["grid_size"]
    grid_idx, grid_z, grid_c = grid_setup(dataset, t["seed"], t["grid_size"], G.z_dim)
    grid_z, grid_c = grid_z.to(device), grid_c.to(device)
    if dist.is_main() and not (run_dir / "reals.png").exists():
        save_png(make_grid(np.stack([dataset[i][0] for i in grid_idx]).transpose(0, 2, 3, 1), grid_w, grid_h),
                 run_dir / "reals.png")

    # Metrics: the detector is loaded once; when its file is missing, metrics are off and we say so once.
    metric_names, detector = list(cfg["metrics"]["names"]), None
    if metric_names:
        from training.eval import inception
        from training.eval.metrics import parse_metric
        for name in metric_names:
            parse_metric(name)  # An unknown metric name is an error now, not after hours of training.
        try:
            detector = inception.load_detector(cfg["metrics"]["detector"], device=device)
        except inception.DetectorNotFound as e:
            dist.print0(f"Metrics are off ({', '.join(metric_names)}): {e}")
            metric_names = []

    # Logging: stats.jsonl, the progress bar and wandb live on rank 0.
    wandb_run = init_wandb(cfg, run_dir) if dist.is_main() else None
    pbar = None
    if dist.is_main() and cfg["log"]["progress"]:
        from tqdm import tqdm
        pbar = tqdm(total=total_nimg / 1000, initial=counters["cur_nimg"] / 1000, unit="kimg", dynamic_ncols=True,
                    bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}]")
    dist.print0(f"Training for {t['kimg']} kimg: batch {batch_size} = {batch_gpu} per process x {world} processes x "
                f"{rounds} rounds; {len(dataset)} images at {dataset.resolution} px; {num_workers} loader workers "
                f"per process; run dir {run_dir}")
    if schedule is not None:
        dist.print0("Progressive schedule: " + ", ".join(f"{r} px from {n / 1000:g} kimg" for r, n in
                                                       zip(schedule.resolutions, schedule.starts)) +
                    f"; each new stage fades in over {schedule.fade_nimg / 1000:g} kimg")
    start_time = tick_start_time = time.time()
    tick_start_nimg = counters["tick_start_nimg"]
    first_report = counters["cur_tick"] == 0  # A resumed run already reported the tick it resumes in.
    save = dict(cfg=cfg, requested=requested, nets=nets, phases=phases, loss=loss, augment_pipe=augment_pipe,
                ada=ada, scaler=accelerator.scaler, keep=keep, stage=None)

    # The random streams start here, from the seed or from the checkpoint: nothing above draws from them.
    if rng is not None:
        ckpt.set_rng_state(rng)
    else:
        seed = t["seed"] * world + rank
        if resumed:
            reseed(t["seed"], counters["cur_nimg"], rank)
        else:
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
    faults = Faults(rank)
    watch = ParentWatch()
    stopped = None
    # The non-finite streak and count live on the device between step boundaries (no read per phase).
    nonfinite_streak = torch.zeros([], dtype=torch.float64, device=device) + counters["nonfinite_streak"]
    skipped_steps = torch.zeros([], dtype=torch.float64, device=device) + counters["skipped_steps"]

    while True:
        if probe is not None:
            probe.begin(counters)
        cur_nimg = counters["cur_nimg"]
        done = cur_nimg >= total_nimg
        at_tick = done or first_report or cur_nimg >= tick_start_nimg + t["tick_kimg"] * 1000

        # 0. Step boundary: one host read, summed over ranks, of what the host decides on: stop signals, the
        # non-finite streak and count, and ADA's statistic when p is due an update (ADA, Karras et al. 2020, sec. 3;
        # p moves before the next minibatch, as after the one that completed the interval). Every rank agrees.
        faults.at_step(cur_nimg)
        ada_due = ada is not None and counters["batch_idx"] > 0 and ada.due(counters["batch_idx"] - 1)
        local_stop = stop.signum is not None or watch.gone()
        got = dist.sum_to_host([float(local_stop), nonfinite_streak, skipped_steps] +
                               (ada.pending() if ada_due else []))
        counters["nonfinite_streak"], counters["skipped_steps"] = round(got[1] / world), round(got[2] / world)
        if ada_due:
            ada.update(got[3], got[4])

        # Progressive schedule: the stage and fade at cur_nimg; a new stage ends the tick (so that stats.jsonl
        # has a line where it starts) and brings its batch, learning rates and loader.
        if schedule is not None:
            new = schedule.at(cur_nimg)
            if new.index != stage.index:
                batch_size, batch_gpu, rounds = stage_batch(new)
                loader = open_loader(batch_gpu)
                dist.print0(f"Stage {new.index}: {new.resolution} px from {cur_nimg / 1000:.3f} kimg (fade-in "
                            f"over {schedule.fade_nimg / 1000:g} kimg), batch {batch_size}")
            stage = new
            set_stage(nets.values(), phases, stage)
            save["stage"] = stage_meta(G)
            at_tick = at_tick or schedule.at(tick_start_nimg).index != stage.index

        # Stop requests (a signal or a dead launcher on any rank, or too many non-finite steps in a row).
        if got[0] > 0 and not done:
            stopped = watch.reason() or stop.name or "a stop signal on another rank"
            break
        if 0 < max_nonfinite <= counters["nonfinite_streak"] and not done:
            stopped = "nonfinite"
            break

        if at_tick:
            # 1. Report: status line, stats.jsonl, wandb.
            now = time.time()
            stats = tick_stats.reduce(device)
            kimg_done = (cur_nimg - tick_start_nimg) / 1000
            stats.update({"Progress/tick": counters["cur_tick"], "Progress/kimg": cur_nimg / 1000,
                          "Timing/total_sec": now - start_time, "Timing/sec_per_tick": now - tick_start_time,
                          "Timing/sec_per_kimg": (now - tick_start_time) / kimg_done if kimg_done > 0 else 0.0,
                          "Resources/peak_mem_gb": peak_memory_gb(device),
                          "Progress/skipped_steps": counters["skipped_steps"], "Loss/pl_mean": float(loss.pl_mean)})
            if augment_pipe is not None:
                stats["Progress/augment_p"] = float(augment_pipe.p)
            if ada is not None and ada.r_t == ada.r_t:  # NaN before the first adjustment.
                stats["Progress/ada_rt"] = float(ada.r_t)
            if stage is not None:
                stats.update({"Progress/stage": stage.index, "Progress/resolution": stage.resolution,
                              "Progress/fade": stage.alpha, "Progress/batch_size": batch_size})
            if dist.is_main():
                write_report(stats, run_dir, pbar, wandb_run, first_report)

            # 2. Snapshot image grid of G_ema (fixed latents, constant noise).
            image_due = t["image_snap"] and (done or counters["cur_tick"] % t["image_snap"] == 0)
            if dist.is_main() and image_due:
                with KeepRNG():
                    images = generate_grid(G_ema, grid_z, grid_c, batch_gpu)
                if images.shape[-1] < dataset.resolution:  # A progressive stage: shown at the dataset's size.
                    images = torch.nn.functional.interpolate(images, size=dataset.resolution, mode="nearest")
                save_image_grid(images, run_dir / f"fakes{cur_nimg // 1000:06d}.png", (grid_w, grid_h))
                if wandb_run is not None:
                    import wandb
                    wandb_run.log({"fakes": wandb.Image(make_grid(to_uint8(images), grid_w, grid_h))},
                                  step=counters["cur_tick"])

            # 3. Checkpoint: snapshot (weights) and full training state (rank 0 writes, every rank contributes RNG).
            snap_due = t["snap"] and (done or counters["cur_tick"] % t["snap"] == 0) and not first_report
            every = cfg["metrics"]["every_kimg"]
            metrics_due = (snap_due if every is None else
                           cur_nimg // int(every * 1000) > counters["metrics_nimg"] // int(every * 1000)
                           or (done and cur_nimg > counters["metrics_nimg"]))
            metrics_due = bool(metric_names and metrics_due and not first_report)
            if snap_due:
                # Saved as the next tick's counters: a resumed run continues exactly where this one goes on.
                resume_counters = dict(counters, cur_tick=counters["cur_tick"] + 1, tick_start_nimg=cur_nimg,
                                       metrics_nimg=cur_nimg if metrics_due else counters["metrics_nimg"])
                save_checkpoint(run_dir, counters=resume_counters, cur_nimg=cur_nimg, **save)

            # 4. Metrics of G_ema (every rank takes a share of the images), appended to metric-<name>.jsonl; they
            # draw no numbers from the training streams.
            if metrics_due:
                with KeepRNG():
                    evaluate_metrics(G_ema, dataset, detector, metric_names, run_dir, cur_nimg, cfg, pbar, wandb_run,
                              counters["cur_tick"])
                counters["metrics_nimg"] = cur_nimg

            # 5. Stop.
            if done:
                break
            counters["cur_tick"] += 1
            first_report = False
            tick_start_nimg = cur_nimg
            tick_start_time = time.time()

        # 6. Accumulate G/D phases over rounds: reals (uint8 batches copied without blocking, normalized to [-1, 1]
        # on the device) and latents for this minibatch.
        reals, real_cs = [], []
        for _ in range(rounds):
            img, c = next(loader)
            img = img.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1
            reals.append(img if stage is None else stage_reals(img, stage.resolution, stage.alpha))
            real_cs.append(c.to(device, non_blocking=True))
            counters["sampler_pos"] += batch_gpu
        step_bad = torch.zeros([], dtype=torch.bool, device=device)
        for phase in phases:
            if counters["batch_idx"] % phase.interval != 0:
                continue
            phase.opt.zero_grad(set_to_none=True)
            phase.module.requires_grad_(True)
            for real_img, real_c in zip(reals, real_cs):
                gen_z = torch.randn([batch_gpu, G.z_dim], device=device)
                gen_c = _sample_labels(dataset, batch_gpu, device)
                tick_stats.add(loss.accumulate_gradients(phase.name, real_img, real_c, gen_z, gen_c,
                                                         gain=phase.interval / rounds))
            phase.module.requires_grad_(False)

            # 7. Step: gradients averaged over ranks; a non-finite one is made zero on every rank and counted on the
            # device (the streak and the count reach the host at the next step boundary's read).
            params = [p for p in phase.module.parameters() if p.grad is not None]
            faults.corrupt_grads(params, cur_nimg)
            bad = optimizer_step(phase.opt, params, accelerator.scaler)
            if bad is not None:
                skipped_steps += bad
                step_bad |= bad
        nonfinite_streak.add_(1).mul_(step_bad)

        # 8. EMA and counters; the buffers that training changes (w_avg) averaged over ranks first.
        dist.sync_buffers(G)
        dist.sync_buffers(D)
        counters["cur_nimg"] += batch_size
        counters["batch_idx"] += 1
        update_ema(G_ema, G, counters["cur_nimg"], batch_size, t["ema_kimg"], t["ema_rampup"])
        if pbar is not None:
            pbar.update(batch_size / 1000)
        if probe is not None:
            probe.end(counters)

    if pbar is not None:
        pbar.close()
    if stopped is not None:
        return _stop(stopped, run_dir, counters, tick_start_nimg, save, max_nonfinite, wandb_run)
    if wandb_run is not None:
        wandb_run.finish()
    if dist.is_main():
        (run_dir / "DONE").write_text(json.dumps({"kimg": counters["cur_nimg"] / 1000}))
    dist.barrier()
    return counters


# After a stop request at a step boundary: write the training state there (counters as they are, so a resumed
# run finishes the current tick) and return, or, after too many non-finite steps, keep the last good state (the
# current one when every weight is finite, else the newest checkpoint) and raise NonFiniteError.
def _stop(reason, run_dir, counters, tick_start_nimg, save, max_nonfinite, wandb_run) -> dict:
    cur_nimg = counters["cur_nimg"]
    resume_counters = dict(counters, tick_start_nimg=tick_start_nimg, nonfinite_streak=0)
    good = reason != "nonfinite" or all_finite(save["nets"].values(), [save["loss"].pl_mean])
    path = save_checkpoint(run_dir, counters=resume_counters, cur_nimg=cur_nimg, snapshot=False, **save) \
        if good else None
    if wandb_run is not None:
        wandb_run.finish()
    dist.barrier()
    if reason == "nonfinite":
        if path is None:
            states = ckpt.list_states(run_dir)
            path = states[0][1] if states else "none (no checkpoint was written yet)"
        raise NonFiniteError(f"stopped at {cur_nimg / 1000:.3f} kimg after {max_nonfinite} minibatches in a row with "
                             f"non-finite gradients (train.max_nonfinite={max_nonfinite}); the last good state is "
                             f"{path}. Lower the learning rates or raise the R1 weight, and start again from it "
                             f"(e.g. resume=<network-snapshot>.safetensors in a new run).")
    dist.print0(f"Stopped by {reason} at {cur_nimg / 1000:.3f} kimg: checkpoint {path}; rerun the same command to "
                f"resume.")
    return dict(counters, stopped=reason)


# Labels for generated samples: drawn from the dataset's label distribution (zeros [N, 0] when unconditional); on
# CUDA they travel from pinned memory without blocking.
def _sample_labels(dataset, n: int, device):
    if dataset.label_dim == 0:
        return torch.zeros([n, 0], device=device)
    idx = np.random.randint(len(dataset), size=n)
    labels = torch.from_numpy(np.stack([dataset.get_label(i) for i in idx]))
    if device.type == "cuda":
        labels = labels.pin_memory()
    return labels.to(device, non_blocking=True)
