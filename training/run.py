"""A training run's setup: data, config, networks, ADA, loss, phases and state built once, in dependency order."""
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from networks.factory import build_networks
from networks.layers import channels_at
from ops import dispatch
from training import dist
from training.augment import make_adaptive_p, make_augment_pipe
from training.config import (Config, ConfigError, apply_auto, check_batch, check_settings, config_dict,
                             drop_synthetic_keys)
from training.data.dataset import open_dataset, read_dataset_json
from training.data.loader import default_num_workers, local_process_count, make_loader
from training.data.sampler import InfiniteSampler
from training.eval import inception
from training.eval.metrics import parse_metric
from training.io import checkpoint as ckpt
from training.io.images import make_grid, save_png
from training.io.records import read_stats
from training.loss import StyleGAN2Loss
from training.phases import freeze_summary, make_phases
from training.report.health import HealthMonitor, diversity
from training.report.page import ReportPage
from training.report.trackers import open_trackers
from training.resume import (dataset_files_sha256, load_weights, read_weights, resolve_freeze_d, resolve_resume_all,
                             truncate_stats, with_dataset_hash, write_config_files)
from training.schedule import make_schedule
from training.state import TrainState


# A minibatch's shape: the total batch, the per-process batch and the accumulation rounds (total = per process x
# processes x rounds). A progressive stage brings its own.
@dataclasses.dataclass
class Batch:
    size: int    # images per minibatch, over all processes
    gpu: int     # images per process and round
    rounds: int  # accumulation rounds per minibatch


@dataclasses.dataclass
class Run:
    """Everything a training run works with, made by setup_run and open_session; the loop reads it and changes only
    the counters in `state`, `batch`, `stage` and `loader` (a progressive stage brings a new batch and loader)."""
    cfg: Config               # the resolved config ('auto' filled in, train.freeze_d resolved)
    run_dir: Path
    accelerator: Any
    device: torch.device
    dataset: Any
    schedule: Any             # the progressive schedule, or None
    total_nimg: int           # train.kimg in images
    G: torch.nn.Module
    D: torch.nn.Module
    G_ema: torch.nn.Module
    augment_pipe: Any         # None with aug=noaug
    ada: Any                  # the adaptive p (aug=ada), or None
    loss: StyleGAN2Loss
    phases: list
    state: TrainState
    resumed: bool             # a full resume (a training state), not a start from scratch or from weights
    # Made by open_session, once the run is known to have work to do:
    batch: Optional[Batch] = None
    stage: Any = None         # the progressive stage at the current step (schedule.at(cur_nimg)), or None
    num_workers: int = 0      # loader worker processes per process
    loader: Any = None
    grid: Optional[dict] = None  # the fixed grid: z, c (on the device), size (w, h), real_diversity
    metric_names: list = dataclasses.field(default_factory=list)
    detector: Any = None      # the Inception detector, or None (SWD only, or metrics off)
    monitor: Optional[HealthMonitor] = None  # run health warnings (rank 0, health.enabled)
    trackers: Any = None
    pbar: Any = None          # the progress bar (rank 0, log.progress), or None
    page: Optional[ReportPage] = None

    def open_loader(self) -> None:
        """The loader from this rank's position in the endless stream, at the current per-process batch. It draws no
        global random numbers (its own generator), so that resuming does not shift them."""
        c, t = self.state.counters, self.cfg.train
        sampler = InfiniteSampler(len(self.dataset), rank=dist.get_rank(), num_replicas=dist.get_world_size(),
                                  seed=t.seed, start=c.sampler_pos)
        self.loader = make_loader(self.dataset, sampler, self.batch.gpu, self.num_workers, self.device, t.seed)

    def set_batch(self, batch_size: int, batch_gpu) -> None:
        """A stage's batch (checked at start-up); ADA's step size follows the total batch."""
        gpu, rounds = check_batch(batch_size, batch_gpu, dist.get_world_size(), self.cfg.model.mbstd_group)
        self.batch = Batch(batch_size, gpu, rounds)
        if self.ada is not None:
            self.ada.batch_size = batch_size


# Threads, determinism, TF32 and the ops implementation for this process.
def setup_torch(train, device, world: int) -> None:
    dispatch.set_default_impl(train.ops_impl)
    if device.type == "cpu":  # Oversubscribed OpenMP threads spin against each other: split the cores.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(train.cpu_threads or max(1, (os.cpu_count() or 1) // max(local, 1)))
    torch.backends.cudnn.benchmark = not train.deterministic
    if train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # TF32 convolutions and matmuls (Ampere and newer) only when asked: faster, but ~1e-3 relative precision.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(train.tf32)


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


# The dataset, and the config resolved for it: 'auto' settings follow its resolution; the batch of the run and of
# every stage of a progressive schedule is checked now, not when the stage begins.
def open_data(requested: Config, world: int):
    """(requested without the synthetic-only keys, dataset, resolved config, schedule or None)."""
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
    check_batch(t.batch_size, t.batch_gpu, world, m.mbstd_group)
    if len(dataset) < t.batch_size:
        dist.print0(f"Warning: the dataset has {len(dataset)} images{' (with mirrors)' if d.xflip else ''}, fewer "
                    f"than one batch (train.batch_size={t.batch_size}): every batch repeats images, and D can learn "
                    f"them by heart within a few kimg; use more images, or a smaller train.batch_size")
    schedule = make_schedule(cfg.schedule, dataset.resolution, t)
    for start in (schedule.starts if schedule is not None else []):
        st = schedule.at(start)
        try:
            check_batch(st.batch_size, st.batch_gpu, world, m.mbstd_group)
        except ConfigError as e:
            raise ConfigError(f"schedule stage {st.index} ({st.resolution} px, schedule.batch_size/batch_gpu): "
                              f"{e}") from None
    return requested, dataset, cfg, schedule


# The metrics detector, loaded once; (names, detector). SWD needs none; when the Inception file is missing (said
# once), metrics.fallback (SWD) replaces the Inception metrics, or with no fallback they are off.
def load_metrics(metrics, device):
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


# The fixed latents, labels and dataset indices of the image grids (the same for every run with this seed).
def grid_setup(dataset, seed: int, grid_size, z_dim: int):
    grid_w, grid_h = grid_size
    gen = torch.Generator().manual_seed(seed + 12345)
    idx = torch.randperm(len(dataset), generator=gen)[: grid_w * grid_h].tolist()
    z = torch.randn([len(idx), z_dim], generator=gen)
    c = torch.from_numpy(np.stack([dataset.get_label(i) for i in idx]))
    return idx, z, c


def setup_run(requested: Config, run_dir: Path) -> Run:
    """Build a run for the config `requested` in `run_dir`, in dependency order: process, data and resolved config,
    where to start (the run directory's newest intact state, else `resume`: a training state or run directory
    resumes everything, a snapshot gives weights only), networks, ADA, loss, phases, the training state (loaded and
    checked on a resume), the run directory's files, loader, grids, metrics and logging. Nothing is changed after
    construction; every check that can fail does so before the run directory is made."""
    accelerator = dist.init(mixed_precision=requested.train.mixed_precision)
    device, world = dist.device(), dist.get_world_size()
    setup_torch(requested.train, device, world)
    requested, dataset, cfg, schedule = open_data(requested, world)

    # Where to start; Freeze-D: train.freeze_d, or when it is null the resumed run's or the weights file's own count
    # (recorded in the resolved config, so that a full resume freezes the same layers).
    if dist.is_main():
        for p in ckpt.remove_stale_temps(run_dir):
            print(f"Removed {p}, left by a checkpoint write that was interrupted", flush=True)
    plan = read_weights(resolve_resume_all(cfg.resume, run_dir, log=dist.print0))
    freeze_d = resolve_freeze_d(requested.train.freeze_d, plan)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, freeze_d=freeze_d))
    t = cfg.train

    # Networks, initialized from the same seed on every rank and then made identical by broadcast from rank 0.
    torch.manual_seed(t.seed)
    G, D, G_ema = build_networks(cfg.model, dataset.resolution, dataset.num_channels, dataset.label_dim,
                                 grow=schedule is not None)
    G, D, G_ema = G.train().requires_grad_(False).to(device), D.train().requires_grad_(False).to(device), \
        G_ema.to(device)
    for net in (G, D, G_ema):
        dist.broadcast_module(net)

    # ADA: every image D sees goes through the pipe (the loss applies it), and the sign of D on augmented reals
    # drives p (ADA, sec. 3); ada_kimg_resume (a faster p) only when starting from another run's weights.
    augment_pipe = make_augment_pipe(cfg.aug)
    if augment_pipe is not None:
        augment_pipe = augment_pipe.to(device)
    ada = make_adaptive_p(cfg.aug, augment_pipe, batch_size=t.batch_size, from_weights=plan["kind"] == "weights")
    loss = StyleGAN2Loss(G, D, augment_pipe=augment_pipe, r1_gamma=t.r1_gamma, style_mixing_prob=t.style_mixing_prob,
                         pl_weight=t.pl_weight, pl_batch_shrink=t.pl_batch_shrink, pl_decay=t.pl_decay,
                         autocast=accelerator.autocast, backward=accelerator.backward,
                         on_real_logits=ada.accumulate if ada is not None else None, loss_type=t.loss,
                         wgan_lambda=t.wgan_lambda, wgan_drift=t.wgan_drift, grad_scaler=accelerator.scaler)
    # Phases, with optimizers through Accelerate (mixed-precision loss scaling); Freeze-D's layers are in none.
    if freeze_d:
        dist.print0(freeze_summary(D, freeze_d))
    phases = make_phases(G, D, t, use_pl=t.pl_weight != 0, use_r1=loss.has_d_reg, freeze_d=freeze_d,
                         prepare=accelerator.prepare)

    # The training state, loaded (and checked against this run) on a full resume; a dataset's file list is
    # recorded with the config, so that another dataset is noticed on resume.
    files_sha256 = dataset_files_sha256(dataset)
    state = TrainState(G, D, G_ema, phases, loss, augment_pipe, ada, accelerator.scaler,
                       config=with_dataset_hash(config_dict(cfg), files_sha256),
                       requested=with_dataset_hash(config_dict(requested), files_sha256), schedule=schedule)
    resumed = plan["kind"] == "state"
    if resumed:
        state.load_state_dict(plan.pop("state"), plan["path"])
        dist.print0(f"Resuming from {plan['path']} at {state.counters.cur_nimg / 1000:.3f} kimg")
    elif plan["kind"] == "weights":
        load_weights(plan, G, D, G_ema, log=dist.print0)
        dist.print0(f"Starting from the weights of {plan['path']} (optimizers, counters and augmentation start "
                    f"fresh)")
    plan.pop("snapshot", None)
    cur_nimg = state.counters.cur_nimg

    # Every start-up check passed: the run directory is made now, never by a failed start (rank 0). stats.jsonl keeps
    # the lines up to the resume point (none when starting afresh).
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config_files(run_dir, state.requested)
        truncate_stats(run_dir, cur_nimg if resumed else -1)
    return Run(cfg=cfg, run_dir=run_dir, accelerator=accelerator, device=device, dataset=dataset, schedule=schedule,
               total_nimg=int(t.kimg * 1000), G=G, D=D, G_ema=G_ema, augment_pipe=augment_pipe, ada=ada, loss=loss,
               phases=phases, state=state, resumed=resumed)


def open_session(run: Run) -> None:
    """What a run with work to do needs besides its networks and state: the batch and loader at the start (or resume)
    point, the fixed image grids, the metrics detector, health warnings, trackers, progress bar and report page."""
    cfg, t, device, run_dir, dataset = run.cfg, run.cfg.train, run.device, run.run_dir, run.dataset
    cur_nimg = run.state.counters.cur_nimg
    # The stage at the start (or resume) point sets the batch now, its resolution and learning rates at the first
    # step. Worker processes load (and pin, on CUDA) uint8 batches off the critical path (data.num_workers=null:
    # cores per process less one, at most 8, on an accelerator; none on the CPU, where training uses every core).
    run.stage = run.schedule.at(cur_nimg) if run.schedule is not None else None
    run.set_batch(*((run.stage.batch_size, run.stage.batch_gpu) if run.stage else (t.batch_size, t.batch_gpu)))
    run.num_workers = cfg.data.num_workers if cfg.data.num_workers is not None else \
        default_num_workers(device.type, local_process_count())
    run.open_loader()

    # Fixed grid latents and labels; reals.png once; the reals' grid diversity for the health warnings.
    grid_idx, grid_z, grid_c = grid_setup(dataset, t.seed, t.grid_size, run.G.z_dim)
    run.grid = dict(z=grid_z.to(device), c=grid_c.to(device), size=tuple(t.grid_size), real_diversity=None)
    if dist.is_main():
        grid_reals = np.stack([dataset[i][0] for i in grid_idx])
        if not (run_dir / "reals.png").exists():
            save_png(make_grid(grid_reals.transpose(0, 2, 3, 1), *t.grid_size), run_dir / "reals.png")
        # Health warnings (rank 0): after a resume, the streaks from stats.jsonl.
        if cfg.health.enabled:
            run.monitor = HealthMonitor(cfg.health, t.loss)
            run.grid["real_diversity"] = diversity(torch.from_numpy(grid_reals)) if len(grid_idx) > 1 else None
            for row in (read_stats(run_dir) if run.resumed else []):
                run.monitor.feed(row)
    run.metric_names, run.detector = load_metrics(cfg.metrics, device)

    # Trackers (log.trackers, log.wandb) log against cur_nimg; TensorBoard hides what an earlier session logged after
    # the resume point, as stats.jsonl dropped it (a no-op object on other ranks). Progress bar and report.html
    # (rewritten at every snapshot) on rank 0.
    run.trackers = open_trackers(cfg.log, config_dict(cfg), run_dir, purge_step=cur_nimg + 1 if run.resumed else 0)
    if dist.is_main() and (cfg.log.progress if cfg.log.progress is not None else sys.stdout.isatty()):
        run.pbar = tqdm(total=run.total_nimg / 1000, initial=cur_nimg / 1000, unit="kimg", dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}]")
    run.page = ReportPage(run_dir, run.pbar)
    dist.print0(f"Training for {t.kimg} kimg: batch {run.batch.size} = {run.batch.gpu} per process x "
                f"{dist.get_world_size()} processes x {run.batch.rounds} rounds; {len(dataset)} images at "
                f"{dataset.resolution} px; {run.num_workers} loader workers per process; run dir {run_dir}")
    if run.schedule is not None:
        dist.print0("Progressive schedule: " + ", ".join(f"{r} px from {n / 1000:g} kimg" for r, n in
                                                       zip(run.schedule.resolutions, run.schedule.starts)) +
                    f"; each new stage fades in over {run.schedule.fade_nimg / 1000:g} kimg")
