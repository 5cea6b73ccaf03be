"""The training loop: one function, with its phases in a fixed order, progress counted in images (cur_nimg)."""
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from networks.factory import build_networks
from networks.layers import channels_at
from ops import dispatch
from training import dist
from training.config import Config, ConfigError, apply_auto, check_settings, config_dict, drop_synthetic_keys
from training.data.augment import make_adaptive_p, make_augment_pipe
from training.data.dataset import open_dataset, read_dataset_json
from training.data.loader import default_num_workers, local_process_count, make_loader
from training.data.sampler import InfiniteSampler
from training.eval import inception
from training.eval.metrics import parse_metric
from training.io import checkpoint as ckpt
from training.io.images import make_grid, save_image_grid, save_png
from training.loss import StyleGAN2Loss
from training.phases import (check_batch, freeze_summary, make_phases, optimizer_step, resolve_freeze_d,
                             sample_labels, update_ema)
from training.preempt import Faults, NonFiniteError, ParentWatch, StopRequest, all_finite
from training.io.records import read_stats
from training.report.health import DIVERSITY_FAKE, DIVERSITY_REAL, WARNINGS_KEY, HealthMonitor, diversity
from training.report.metrics import evaluate_metrics
from training.report.page import ReportPage
from training.report.tick import OPS_KEY, TickStats, peak_memory_gb, write_report
from training.report.trackers import log_grid, open_trackers
from training.resume import (check_config, check_dataset, dataset_files_sha256, load_weights, resolve_resume_all,
                             truncate_stats, with_dataset_hash, write_config_files)
from training.schedule import check_stage_state, make_schedule, set_stage, stage_meta, stage_reals
from training.state import KeepRNG, TrainState


def grid_setup(dataset, seed: int, grid_size, z_dim: int):
    """The fixed latents, labels and dataset indices of the image grids (the same for every run with this seed)."""
    grid_w, grid_h = grid_size
    gen = torch.Generator().manual_seed(seed + 12345)
    idx = torch.randperm(len(dataset), generator=gen)[: grid_w * grid_h].tolist()
    z = torch.randn([len(idx), z_dim], generator=gen)
    c = torch.from_numpy(np.stack([dataset.get_label(i) for i in idx]))
    return idx, z, c


@torch.no_grad()
def generate_grid(G_ema, grid_z, grid_c, batch: int):
    """G_ema's images for the fixed grid latents (constant noise), in batches."""
    out = [G_ema(z, c, noise_mode="const") for z, c in zip(grid_z.split(batch), grid_c.split(batch))]
    return torch.cat(out)


def training_loop(cfg: Config, run_dir, probe=None) -> dict:
    """Train G and D as `cfg` (the typed config) says, in `run_dir`; returns the final counters (a dict, with
    'stopped': the reason after a stop request).

    Resumes from the newest intact training state in `run_dir` (else from cfg.resume); stops at the next step
    boundary with a checkpoint on SIGTERM, SIGINT or SIGUSR1, or when its launcher dies. `probe` (benchmarks,
    tests, gpu_check) is called as probe.begin(counters) / probe.end(counters) around every minibatch (its step
    boundary included) and may raise to end the run there.
    """
    stop = StopRequest().install()
    try:
        return _train(cfg, Path(run_dir), stop, probe)
    finally:
        stop.uninstall()


# Threads, determinism, TF32 and the ops implementation for this process.
def _setup_torch(train, device, world: int) -> None:
    dispatch.set_default_impl(train.ops_impl)
    if device.type == "cpu":  # Oversubscribed OpenMP threads spin against each other: split the cores.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(train.cpu_threads or max(1, (os.cpu_count() or 1) // max(local, 1)))
    torch.backends.cudnn.benchmark = not train.deterministic
    if train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # TF32 convolutions and matmuls (Ampere and newer) only when asked: faster, but ~1e-3 relative precision.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(train.tf32)


# The metrics detector, loaded once; (names, detector). SWD needs none; when the Inception file is missing (said
# once), metrics.fallback (SWD) replaces the Inception metrics, or with no fallback they are off.
def _load_metrics(metrics, device):
    names = list(metrics.names)
    for name in names + ([metrics.fallback] if metrics.fallback else []):
        parse_metric(name)  # An unknown metric name is an error now, not after hours of training.
    if all(parse_metric(name)[0] == "swd" for name in names):
        return names, None
    try:
        return names, inception.load_detector(metrics.detector, device=device)
    except inception.DetectorNotFound as e:
        inception_names = [n for n in names if parse_metric(n)[0] != "swd"]
        names = list(dict.fromkeys([n for n in names if n not in inception_names] +
                                   ([metrics.fallback] if metrics.fallback else [])))
        instead = f"; {', '.join(names)} instead (needs no weights)" if names else ""
        dist.print0(f"Metrics {', '.join(inception_names)} are off{instead}: {e}")
        return names, None


# Start-up lines about the data that would otherwise go unnoticed (rank 0).
def dataset_notes(dataset, path, use_labels: bool) -> None:
    """Refuse data.use_labels=true for a dataset without labels; say how many zip members were left out as unsafe,
    and that labels in dataset.json go unused without data.use_labels=true."""
    if use_labels and not dataset.has_labels:
        raise ConfigError(f"data.use_labels=true, but {path if path is not None else 'the synthetic dataset'} has no "
                          f"labels (no dataset.json, or its 'labels' is null); write them with scripts/dataset_tool.py "
                          f"--labels from-folders, or leave data.use_labels out for an unconditional model")
    outside = getattr(dataset, "outside", [])
    if outside:
        dist.print0(f"Warning: {path}: {len(outside)} zip member(s) left out because their path leaves the archive "
                    f"(../ or absolute), e.g. {outside[0]}")
    if path is not None and not use_labels and hasattr(dataset, "outside"):
        labels = (read_dataset_json(path) or {}).get("labels")
        if labels:
            names = (read_dataset_json(path) or {}).get("class_names")
            classes = f"{len(names)} classes" if isinstance(names, dict) else "labels"
            dist.print0(f"Note: {path} has {classes} in its dataset.json, unused: training an unconditional model; "
                        f"data.use_labels=true trains a class-conditional one")


def _train(requested: Config, run_dir: Path, stop: StopRequest, probe) -> dict:
    accelerator = dist.init(mixed_precision=requested.train.mixed_precision)
    device = dist.device()
    rank, world = dist.get_rank(), dist.get_world_size()
    _setup_torch(requested.train, device, world)

    # Data: every rank reads its own shard of an endless seeded stream; 'auto' settings follow its resolution.
    check_settings(requested)
    requested, note = drop_synthetic_keys(requested)
    if note:
        dist.print0(note)
    d = requested.data
    dataset = open_dataset(d.path, use_labels=d.use_labels, xflip=d.xflip, max_size=d.max_size,
                           random_seed=requested.train.seed,
                           **(dict(resolution=d.resolution, num_images=d.num_images) if d.path is None else {}))
    dataset_notes(dataset, d.path, d.use_labels)
    cfg = apply_auto(requested, dataset.resolution, world)
    t, m = cfg.train, cfg.model
    if channels_at(dataset.resolution, m.channel_base, m.channel_max) < 1:
        raise ConfigError(f"{d.path}: images are {dataset.resolution} px, too large for model.channel_base="
                          f"{m.channel_base} (min(channel_base / resolution, channel_max) channels: none at "
                          f"{dataset.resolution} px); resize them with scripts/dataset_tool.py --resolution, or raise "
                          f"model.channel_base to at least {dataset.resolution}")
    batch_size = t.batch_size
    batch_gpu, rounds = check_batch(batch_size, t.batch_gpu, world, m.mbstd_group)
    if len(dataset) < batch_size:
        dist.print0(f"Warning: the dataset has {len(dataset)} images{' (with mirrors)' if d.xflip else ''}, fewer "
                    f"than one batch (train.batch_size={batch_size}): every batch repeats images, and D can learn "
                    f"them by heart within a few kimg; use more images, or a smaller train.batch_size")
    # Progressive schedule (None when off): every stage's batches are checked now, not when the stage begins.
    schedule = make_schedule(cfg.schedule, dataset.resolution, t)
    for start in (schedule.starts if schedule is not None else []):
        st = schedule.at(start)
        try:
            check_batch(st.batch_size, st.batch_gpu, world, m.mbstd_group)
        except ConfigError as e:
            raise ConfigError(f"schedule stage {st.index} ({st.resolution} px, schedule.batch_size/batch_gpu): "
                             f"{e}") from None
    total_nimg = int(t.kimg * 1000)

    # Networks, initialized from the same seed on every rank and then made identical by broadcast from rank 0.
    torch.manual_seed(t.seed)
    G, D, G_ema = build_networks(m, dataset.resolution, dataset.num_channels, dataset.label_dim,
                                 grow=schedule is not None)
    G, D, G_ema = G.train().requires_grad_(False).to(device), D.train().requires_grad_(False).to(device), \
        G_ema.to(device)
    for net in (G, D, G_ema):
        dist.broadcast_module(net)

    # Loss, phases (optimizers through Accelerate, for mixed-precision loss scaling) and ADA: every image D sees goes
    # through the pipe (the loss applies it), and the sign of D on augmented reals drives p (ADA, sec. 3).
    tick_stats = TickStats()
    ops_logged = 0  # fused-op decisions (ops.dispatch) already in stats.jsonl
    loss = StyleGAN2Loss(G, D, r1_gamma=t.r1_gamma, style_mixing_prob=t.style_mixing_prob, pl_weight=t.pl_weight,
                         pl_batch_shrink=t.pl_batch_shrink, pl_decay=t.pl_decay, autocast=accelerator.autocast,
                         backward=accelerator.backward, loss_type=t.loss, wgan_lambda=t.wgan_lambda,
                         wgan_drift=t.wgan_drift, grad_scaler=accelerator.scaler)
    # Where to start: the run directory's newest intact training state, else cfg.resume (a training state or run
    # directory: everything; a snapshot: weights only, for transfer learning), else from scratch.
    if dist.is_main():
        for p in ckpt.remove_stale_temps(run_dir):
            print(f"Removed {p}, left by a checkpoint write that was interrupted", flush=True)
    plan = resolve_resume_all(cfg.resume, run_dir, log=dist.print0)
    # Freeze-D: train.freeze_d, or when it is null the resumed run's or the weights file's own count (recorded in the
    # resolved config, so that a full resume freezes the same layers); those layers are in no optimizer.
    freeze_d = resolve_freeze_d(requested.train.freeze_d, plan)
    if freeze_d != t.freeze_d:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, freeze_d=freeze_d))
        t = cfg.train
    if freeze_d:
        dist.print0(freeze_summary(D, freeze_d))
    phases = make_phases(G, D, t, use_pl=t.pl_weight != 0, use_r1=loss.has_d_reg, freeze_d=freeze_d)
    unique = list({id(ph.opt): ph.opt for ph in phases}.values())
    wrapped = accelerator.prepare(*unique)
    by_id = {id(o): w for o, w in zip(unique, wrapped if isinstance(wrapped, (list, tuple)) else [wrapped])}
    for ph in phases:
        ph.opt = by_id[id(ph.opt)]
    augment_pipe = make_augment_pipe(cfg.aug)
    if augment_pipe is not None:
        augment_pipe = augment_pipe.to(device)
    loss.augment_pipe = augment_pipe

    # ada_kimg_resume (a faster p) only when starting from another run's weights; a full resume continues exactly.
    resumed = plan["kind"] == "state"
    ada = make_adaptive_p(cfg.aug, augment_pipe, batch_size=batch_size, resumed=plan["kind"] == "weights")
    files_sha256 = dataset_files_sha256(dataset)  # recorded with the config: another dataset is noticed on resume
    state = TrainState(G, D, G_ema, phases, loss, augment_pipe, ada, accelerator.scaler,
                       config=with_dataset_hash(config_dict(cfg), files_sha256),
                       requested=with_dataset_hash(config_dict(requested), files_sha256))
    c = state.counters
    if resumed:
        saved = plan.pop("state")
        old = saved.get("config_requested", saved["config"])  # before 'config_requested' existed: the resolved
        check_dataset(json.loads(old), state.requested, plan["path"])
        for line in check_config(json.loads(old), state.requested if "config_requested" in saved else state.config,
                                 plan["path"]):
            dist.print0(f"Config change on resume (allowed): {line}")
        state.load_state_dict(saved, plan["path"])
        c = state.counters
        if state.saved_world is not None and state.saved_world != world:
            dist.print0(f"Warning: {plan['path']} was written by {state.saved_world} processes, this run has {world}: "
                        f"it continues, but not bit-for-bit as the original run would have")
        check_stage_state(saved, schedule, c.cur_nimg, plan["path"])
        del saved
        dist.print0(f"Resuming from {plan['path']} at {c.cur_nimg / 1000:.3f} kimg")
    elif plan["kind"] == "weights":
        load_weights(plan["path"], G, D, G_ema, log=dist.print0)
        dist.print0(f"Starting from the weights of {plan['path']} (optimizers, counters and augmentation start "
                    f"fresh)")
    if ada is not None:
        loss.on_real_logits = ada.accumulate
    if dist.is_main():  # Every start-up check passed: the run directory is made now, never by a failed start.
        run_dir.mkdir(parents=True, exist_ok=True)
        # stats.jsonl keeps the lines up to the resume point (none when starting afresh).
        write_config_files(run_dir, state.requested)
        truncate_stats(run_dir, c.cur_nimg if resumed else -1)
    if resumed and c.cur_nimg >= total_nimg:
        dist.print0(f"Already trained to {c.cur_nimg / 1000:.3f} kimg (train.kimg={t.kimg}): nothing to do; raise "
                    f"train.kimg to continue")
        if dist.is_main():
            (run_dir / "DONE").write_text(json.dumps({"kimg": c.cur_nimg / 1000}))
        dist.barrier()
        return dataclasses.asdict(c)
    if dist.is_main():  # A finished run extended by a larger train.kimg is unfinished until it gets there.
        (run_dir / "DONE").unlink(missing_ok=True)

    # A stage's total batch, per-process batch and accumulation rounds (ADA's step size follows the batch); the
    # stage at the start (or resume) point sets them now, its resolution and learning rates at the first step.
    def stage_batch(st):
        if ada is not None:
            ada.batch_size = st.batch_size
        return (st.batch_size, *check_batch(st.batch_size, st.batch_gpu, world, m.mbstd_group))
    stage = schedule.at(c.cur_nimg) if schedule is not None else None
    if stage is not None:
        batch_size, batch_gpu, rounds = stage_batch(stage)

    # The loader draws no global random numbers (its own generator), so that resuming does not shift them; it starts
    # at the stream position consumed so far (also when a stage changes the per-process batch). Worker processes load
    # (and pin, on CUDA) uint8 batches off the critical path (data.num_workers=null: cores per process less one, at
    # most 8, on an accelerator; none on the CPU, where training uses every core).
    num_workers = d.num_workers if d.num_workers is not None else default_num_workers(device.type,
                                                                                       local_process_count())

    def open_loader(batch_gpu):
        sampler = InfiniteSampler(len(dataset), rank=rank, num_replicas=world, seed=t.seed, start=c.sampler_pos)
        return make_loader(dataset, sampler, batch_gpu, num_workers, device, t.seed)
    loader = open_loader(batch_gpu)

    # Fixed grid latents and labels; reals.png once; metrics detector; logging (stats.jsonl, progress bar, trackers
    # live on rank 0).
    grid_w, grid_h = t.grid_size
    grid_idx, grid_z, grid_c = grid_setup(dataset, t.seed, t.grid_size, G.z_dim)
    grid_z, grid_c = grid_z.to(device), grid_c.to(device)
    if dist.is_main():
        grid_reals = np.stack([dataset[i][0] for i in grid_idx])
        if not (run_dir / "reals.png").exists():
            save_png(make_grid(grid_reals.transpose(0, 2, 3, 1), grid_w, grid_h), run_dir / "reals.png")
    metric_names, detector = _load_metrics(cfg.metrics, device)
    # Health warnings (rank 0): the reals' grid diversity once; after a resume, the streaks from stats.jsonl.
    monitor = None
    if dist.is_main() and cfg.health.enabled:
        monitor = HealthMonitor(cfg.health, t.loss)
        real_diversity = diversity(torch.from_numpy(grid_reals)) if len(grid_idx) > 1 else None
        for row in (read_stats(run_dir) if resumed else []):
            monitor.feed(row)
    # Trackers (log.trackers, log.wandb) log against cur_nimg; TensorBoard hides what an earlier session logged after
    # the resume point, as stats.jsonl dropped it (a no-op object on other ranks).
    trackers = open_trackers(cfg.log, config_dict(cfg), run_dir, purge_step=c.cur_nimg + 1 if resumed else 0)
    pbar = None
    if dist.is_main() and (cfg.log.progress if cfg.log.progress is not None else sys.stdout.isatty()):
        pbar = tqdm(total=total_nimg / 1000, initial=c.cur_nimg / 1000, unit="kimg", dynamic_ncols=True,
                    bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}]")
    page = ReportPage(run_dir, pbar)  # report.html, rewritten at every snapshot (rank 0)
    dist.print0(f"Training for {t.kimg} kimg: batch {batch_size} = {batch_gpu} per process x {world} processes x "
                f"{rounds} rounds; {len(dataset)} images at {dataset.resolution} px; {num_workers} loader workers "
                f"per process; run dir {run_dir}")
    if schedule is not None:
        dist.print0("Progressive schedule: " + ", ".join(f"{r} px from {n / 1000:g} kimg" for r, n in
                                                       zip(schedule.resolutions, schedule.starts)) +
                    f"; each new stage fades in over {schedule.fade_nimg / 1000:g} kimg")
    # Timing continues a resumed run's: its total, and the part of the current tick done before a stop.
    start_time = time.time() - state.timing["total_sec"]
    tick_start_time = time.time() - state.timing["tick_sec"]
    tick_start_nimg = c.tick_start_nimg
    first_report = c.cur_tick == 0  # A resumed run already reported the tick it resumes in.

    # The random streams start here, from the seed or from the checkpoint: nothing above draws from them.
    state.start_rng(t.seed, resumed)
    faults, watch, stopped = Faults(rank), ParentWatch(), None
    # The non-finite streak and count live on the device between step boundaries (no read per phase).
    nonfinite_streak = torch.zeros([], dtype=torch.float64, device=device) + c.nonfinite_streak
    skipped_steps = torch.zeros([], dtype=torch.float64, device=device) + c.skipped_steps

    while True:
        if probe is not None:
            probe.begin(c)
        cur_nimg = c.cur_nimg
        done = cur_nimg >= total_nimg
        at_tick = done or first_report or cur_nimg >= tick_start_nimg + t.tick_kimg * 1000

        # 0. Step boundary: one host read, summed over ranks, of what the host decides on: stop signals, the
        # non-finite streak and count, and ADA's statistic when p is due an update (ADA, Karras et al. 2020, sec. 3;
        # p moves before the next minibatch, as after the one that completed the interval). Every rank agrees.
        faults.at_step(cur_nimg)
        ada_due = ada is not None and c.batch_idx > 0 and ada.due(c.batch_idx - 1)
        local_stop = stop.signum is not None or watch.gone()
        got = dist.sum_to_host([float(local_stop), nonfinite_streak, skipped_steps] +
                               (ada.pending() if ada_due else []))
        c.nonfinite_streak, c.skipped_steps = round(got[1] / world), round(got[2] / world)
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
            set_stage(state.nets.values(), phases, stage)
            state.stage = stage_meta(G)
            at_tick = at_tick or schedule.at(tick_start_nimg).index != stage.index

        # Stop requests (a signal or a dead launcher on any rank, or too many non-finite steps in a row).
        if got[0] > 0 and not done:
            stopped = watch.reason() or stop.name or "a stop signal on another rank"
            break
        if 0 < t.max_nonfinite <= c.nonfinite_streak and not done:
            stopped = "nonfinite"
            break

        if at_tick:
            # 1. Report: status line, stats.jsonl, trackers.
            now = time.time()
            stats = tick_stats.reduce(device)
            kimg_done = (cur_nimg - tick_start_nimg) / 1000
            stats.update({"Progress/tick": c.cur_tick, "Progress/kimg": cur_nimg / 1000,
                          "Timing/total_sec": now - start_time, "Timing/sec_per_tick": now - tick_start_time,
                          "Timing/sec_per_kimg": (now - tick_start_time) / kimg_done if kimg_done > 0 else 0.0,
                          "Resources/peak_mem_gb": peak_memory_gb(device),
                          "Progress/skipped_steps": c.skipped_steps, "Loss/pl_mean": float(loss.pl_mean)})
            if augment_pipe is not None:
                stats["Progress/augment_p"] = float(augment_pipe.p)
            if ada is not None and ada.r_t == ada.r_t:  # NaN before the first adjustment.
                stats["Progress/ada_rt"] = float(ada.r_t)
            if stage is not None:
                stats.update({"Progress/stage": stage.index, "Progress/resolution": stage.resolution,
                              "Progress/fade": stage.alpha, "Progress/batch_size": batch_size})
            # G_ema's grid (fixed latents, constant noise) when an image snapshot is due: its diversity joins the
            # stats, and the health monitor reads them (rank 0).
            images = None
            if dist.is_main() and t.image_snap and (done or c.cur_tick % t.image_snap == 0):
                with KeepRNG():
                    images = generate_grid(G_ema, grid_z, grid_c, batch_gpu)
                if images.shape[-1] < dataset.resolution:  # A progressive stage: shown at the dataset's size.
                    images = torch.nn.functional.interpolate(images, size=dataset.resolution, mode="nearest")
            if monitor is not None:
                if images is not None and real_diversity is not None:
                    stats.update({DIVERSITY_FAKE: diversity(images), DIVERSITY_REAL: real_diversity})
                stats[WARNINGS_KEY] = [w.as_dict() for w in monitor.feed(stats)]
            ops_new = dispatch.decisions()[ops_logged:]  # each self-check decision once, when made
            if ops_new:
                stats[OPS_KEY], ops_logged = ops_new, ops_logged + len(ops_new)
            if dist.is_main():
                write_report(stats, run_dir, pbar, trackers, cur_nimg)

            # 2. Snapshot image grid.
            if images is not None:
                save_image_grid(images, run_dir / f"fakes{cur_nimg // 1000:06d}.png", (grid_w, grid_h))
                log_grid(trackers, images, (grid_w, grid_h), cur_nimg)

            # 3. Checkpoint: snapshot (weights) and full training state (rank 0 writes, every rank contributes RNG),
            # saved with the next tick's counters: a resumed run continues exactly where this one goes on.
            snap_due = t.snap and (done or c.cur_tick % t.snap == 0) and not first_report
            every = cfg.metrics.every_kimg
            metrics_due = (snap_due if every is None else
                           cur_nimg // int(every * 1000) > c.metrics_nimg // int(every * 1000)
                           or (done and cur_nimg > c.metrics_nimg))
            metrics_due = bool(metric_names and metrics_due and not first_report)
            if snap_due:
                state.timing = {"total_sec": time.time() - start_time, "tick_sec": 0.0}
                state.save(run_dir, cur_nimg, counters=c.next_tick(cur_nimg, metrics_due), keep=t.keep)

            # 4. Metrics of G_ema (every rank takes a share of the images), appended to metric-<name>.jsonl; they
            # draw no numbers from the training streams.
            if metrics_due:
                with KeepRNG():
                    evaluate_metrics(G_ema, dataset, detector, metric_names, run_dir, cur_nimg, cfg.metrics, pbar,
                                     trackers, cur_nimg, final=done)
                c.metrics_nimg = cur_nimg

            # The run report page, rewritten at every snapshot (rank 0).
            if dist.is_main() and (images is not None or snap_due or metrics_due):
                page.update()

            # 5. Stop.
            if done:
                break
            c.cur_tick += 1
            first_report = False
            tick_start_nimg = cur_nimg
            tick_start_time = time.time()

        # 6. Accumulate G/D phases over rounds: reals (uint8 batches copied without blocking, normalized to [-1, 1]
        # on the device) and latents for this minibatch.
        reals, real_cs = [], []
        for _ in range(rounds):
            img, real_c = next(loader)
            img = img.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1
            reals.append(img if stage is None else stage_reals(img, stage.resolution, stage.alpha))
            real_cs.append(real_c.to(device, non_blocking=True))
            c.sampler_pos += batch_gpu
        step_bad = torch.zeros([], dtype=torch.bool, device=device)
        for phase in phases:
            if c.batch_idx % phase.interval != 0:
                continue
            phase.opt.zero_grad(set_to_none=True)
            phase.set_trainable(True)
            for real_img, real_c in zip(reals, real_cs):
                gen_z = torch.randn([batch_gpu, G.z_dim], device=device)
                gen_c = sample_labels(dataset, batch_gpu, device)
                tick_stats.add(loss.accumulate_gradients(phase.name, real_img, real_c, gen_z, gen_c,
                                                         gain=phase.interval / rounds))
            phase.set_trainable(False)

            # 7. Step: gradients averaged over ranks; a non-finite one is made zero on every rank and counted on the
            # device (the streak and the count reach the host at the next step boundary's read).
            params = [p for p in phase.params if p.grad is not None]
            faults.corrupt_grads(params, cur_nimg)
            bad = optimizer_step(phase.opt, params, accelerator.scaler)
            if bad is not None:
                skipped_steps += bad
                step_bad |= bad
        nonfinite_streak.add_(1).mul_(step_bad)

        # 8. EMA and counters; the buffers that training changes (w_avg) averaged over ranks first.
        dist.sync_buffers(G)
        dist.sync_buffers(D)
        c.cur_nimg += batch_size
        c.batch_idx += 1
        update_ema(G_ema, G, c.cur_nimg, batch_size, t.ema_kimg, t.ema_rampup)
        if pbar is not None:
            pbar.update(c.cur_nimg / 1000 - pbar.n)  # (from the count: float increments overshoot the total)
        if probe is not None:
            probe.end(c)

    if pbar is not None:
        pbar.close()
    if stopped is not None:
        state.timing = {"total_sec": time.time() - start_time, "tick_sec": time.time() - tick_start_time}
        return _stop(stopped, state, run_dir, tick_start_nimg, t.max_nonfinite, trackers)
    trackers.finish()
    if dist.is_main():
        (run_dir / "DONE").write_text(json.dumps({"kimg": c.cur_nimg / 1000}))
    dist.barrier()
    return dataclasses.asdict(c)


# After a stop request at a step boundary: write the training state there (counters as they are, so a resumed
# run finishes the current tick) and return, or, after too many non-finite steps, keep the last good state (the
# current one when every weight is finite, else the newest checkpoint) and raise NonFiniteError.
def _stop(reason, state: TrainState, run_dir, tick_start_nimg, max_nonfinite, trackers) -> dict:
    cur_nimg = state.counters.cur_nimg
    good = reason != "nonfinite" or all_finite(state.nets.values(), [state.loss.pl_mean])
    path = state.save(run_dir, cur_nimg, counters=state.counters.at_stop(tick_start_nimg), snapshot=False) \
        if good else None
    trackers.finish()
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
    return dict(dataclasses.asdict(state.counters), stopped=reason)
