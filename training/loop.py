"""The training loop: one function, with its phases in a fixed order, progress counted in images (cur_nimg)."""
import dataclasses
import json
import time
from pathlib import Path

import torch

from ops import dispatch
from training import dist
from training.config import Config
from training.data.sampler import sample_labels
from training.io import checkpoint as ckpt
from training.io.images import save_image_grid
from training.phases import optimizer_step, update_ema
from training.preempt import NonFiniteError, ParentWatch, StopRequest, all_finite
from training.report.health import DIVERSITY_FAKE, DIVERSITY_REAL, WARNINGS_KEY, diversity
from training.report.metrics import evaluate_metrics
from training.report.tick import OPS_KEY, TickStats, peak_memory_gb, write_report
from training.report.trackers import log_grid
from training.run import Run, open_session, setup_run
from training.schedule import set_stage, stage_reals
from training.state import KeepRNG


class LoopHooks:
    """Optional callbacks into the loop, for tests and benchmarks (host-sync counting, timing windows, fault
    injection: tests/ and scripts/ define them). The loop's own work never depends on them; any may raise to end
    the run there."""

    def begin_minibatch(self, counters) -> None:
        """At the top of every iteration: before the step boundary of the minibatch `counters.batch_idx`."""

    def after_backward(self, phase, params, counters) -> None:
        """After a phase's backward passes, before its optimizer step (`params`: those with a gradient)."""

    def end_minibatch(self, counters) -> None:
        """After the minibatch's EMA update and counters."""


# What this process keeps between ticks: wall-clock and tick bookkeeping (a resumed run's timing continues from its
# training state), the tick's stats, and the non-finite streak and skipped-step count, which live on the device
# between step boundaries (no read per phase).
@dataclasses.dataclass
class Tick:
    start_time: float        # time.time() at the run's start, less the time a resumed run had already trained
    tick_start_time: float   # time.time() at the current tick's start (less its part before a stop)
    tick_start_nimg: int     # cur_nimg at the current tick's start
    first_report: bool       # the next report is the run's first (a resumed run already reported its tick)
    nonfinite_streak: torch.Tensor  # 0-dim float64 device tensors, read at step boundaries
    skipped_steps: torch.Tensor
    stats: TickStats = dataclasses.field(default_factory=TickStats)
    ops_logged: int = 0      # fused-op decisions (ops.dispatch) already in stats.jsonl


def training_loop(cfg: Config, run_dir, hooks: LoopHooks = None) -> dict:
    """Train G and D as `cfg` (the typed config) says, in `run_dir`; returns the final counters (a dict, with
    'stopped': the reason after a stop request).

    Resumes from the newest intact training state in `run_dir` (else from cfg.resume); stops at the next step
    boundary with a checkpoint on SIGTERM, SIGINT or SIGUSR1, or when its launcher dies. `hooks` (a LoopHooks)
    is called around every minibatch.
    """
    stop = StopRequest().install()
    try:
        return _train(cfg, Path(run_dir), stop, hooks or LoopHooks())
    finally:
        stop.uninstall()


def _train(requested: Config, run_dir: Path, stop: StopRequest, hooks: LoopHooks) -> dict:
    run = setup_run(requested, run_dir)
    state, t, world = run.state, run.cfg.train, dist.get_world_size()
    c = state.counters
    if run.resumed and c.cur_nimg >= run.total_nimg:
        dist.print0(f"Already trained to {c.cur_nimg / 1000:.3f} kimg (train.kimg={t.kimg}): nothing to do; raise "
                    f"train.kimg to continue")
        return finish(run)
    if dist.is_main():  # A finished run extended by a larger train.kimg is unfinished until it gets there.
        (run_dir / "DONE").unlink(missing_ok=True)
    open_session(run)
    zero = torch.zeros([], dtype=torch.float64, device=run.device)
    tick = Tick(start_time=time.time() - state.timing["total_sec"],
                tick_start_time=time.time() - state.timing["tick_sec"], tick_start_nimg=c.tick_start_nimg,
                first_report=c.cur_tick == 0, nonfinite_streak=zero + c.nonfinite_streak,
                skipped_steps=zero + c.skipped_steps)

    # The random streams start here, from the seed or from the checkpoint: nothing above draws from them.
    state.start_rng(t.seed, run.resumed)
    watch, stopped = ParentWatch(), None

    while True:
        hooks.begin_minibatch(c)
        done = c.cur_nimg >= run.total_nimg
        at_tick = done or tick.first_report or c.cur_nimg >= tick.tick_start_nimg + t.tick_kimg * 1000

        # 0. Step boundary: one host read, summed over ranks, of what the host decides on: stop signals, the
        # non-finite streak and count, and ADA's statistic when p is due an update (ADA, Karras et al. 2020, sec. 3;
        # p moves before the next minibatch, as after the one that completed the interval). Every rank agrees.
        ada_due = run.ada is not None and c.batch_idx > 0 and run.ada.due(c.batch_idx - 1)
        local_stop = stop.signum is not None or watch.gone()
        got = dist.sum_to_host([float(local_stop), tick.nonfinite_streak, tick.skipped_steps] +
                               (run.ada.pending() if ada_due else []))
        c.nonfinite_streak, c.skipped_steps = round(got[1] / world), round(got[2] / world)
        if ada_due:
            run.ada.update(got[3], got[4])

        # Progressive schedule: the stage and fade at cur_nimg; a new stage ends the tick (so that stats.jsonl has a
        # line where it starts) and brings its batch, learning rates and loader.
        if run.schedule is not None:
            enter_stage(run, run.schedule.at(c.cur_nimg))
            at_tick = at_tick or run.schedule.at(tick.tick_start_nimg).index != run.stage.index

        # Stop requests (a signal or a dead launcher on any rank, or too many non-finite steps in a row).
        if got[0] > 0 and not done:
            stopped = watch.reason() or stop.name or "a stop signal on another rank"
            break
        if 0 < t.max_nonfinite <= c.nonfinite_streak and not done:
            stopped = "nonfinite"
            break

        # 1-5. At a tick: report, image snapshot, checkpoint, metrics, and the end of training.
        if at_tick and end_of_tick(run, tick, done):
            break

        # 6-7. G/D phases over the accumulation rounds, each ending with its optimizer step.
        step_bad = train_minibatch(run, tick, hooks)
        tick.nonfinite_streak.add_(1).mul_(step_bad)

        # 8. EMA and counters; the buffers that training changes (w_avg) averaged over ranks first.
        dist.sync_buffers(run.G)
        dist.sync_buffers(run.D)
        c.cur_nimg += run.batch.size
        c.batch_idx += 1
        update_ema(run.G_ema, run.G, c.cur_nimg, run.batch.size, t.ema_kimg, t.ema_rampup)
        if run.pbar is not None:
            run.pbar.update(c.cur_nimg / 1000 - run.pbar.n)  # (from the count: float increments overshoot the total)
        hooks.end_minibatch(c)

    if run.pbar is not None:
        run.pbar.close()
    if stopped is not None:
        state.timing = {"total_sec": time.time() - tick.start_time, "tick_sec": time.time() - tick.tick_start_time}
        return _stop(stopped, run, tick.tick_start_nimg)
    return finish(run)


# A new progressive stage (batch, loader, printed once) and the current fade, given to the networks and optimizers.
def enter_stage(run: Run, new) -> None:
    if new.index != run.stage.index:
        run.set_batch(new.batch_size, new.batch_gpu)
        run.open_loader()
        dist.print0(f"Stage {new.index}: {new.resolution} px from {run.state.counters.cur_nimg / 1000:.3f} kimg "
                    f"(fade-in over {run.schedule.fade_nimg / 1000:g} kimg), batch {run.batch.size}")
    run.stage = new
    set_stage(run.state.nets.values(), run.phases, new)


def train_minibatch(run: Run, tick: Tick, hooks: LoopHooks) -> torch.Tensor:
    """One minibatch: reals (uint8 batches copied without blocking, normalized to [-1, 1] on the device) and latents
    for every accumulation round, then each phase due at this minibatch (lazy regularization) accumulates its
    gradients over the rounds and steps: gradients averaged over ranks; a non-finite one is made zero on every rank
    and counted on the device in tick.skipped_steps (no host read); the loss's stats go into tick.stats. Returns a
    0-dim device bool: a step was skipped."""
    c, batch, device = run.state.counters, run.batch, run.device
    reals, real_cs = [], []
    for _ in range(batch.rounds):
        img, real_c = next(run.loader)
        img = img.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1
        reals.append(img if run.stage is None else stage_reals(img, run.stage.resolution, run.stage.alpha))
        real_cs.append(real_c.to(device, non_blocking=True))
        c.sampler_pos += batch.gpu
    step_bad = torch.zeros([], dtype=torch.bool, device=device)
    for phase in run.phases:
        if c.batch_idx % phase.interval != 0:
            continue
        phase.opt.zero_grad(set_to_none=True)
        phase.set_trainable(True)
        for real_img, real_c in zip(reals, real_cs):
            gen_z = torch.randn([batch.gpu, run.G.z_dim], device=device)
            gen_c = sample_labels(run.dataset, batch.gpu, device)
            tick.stats.add(run.loss.accumulate_gradients(phase.name, real_img, real_c, gen_z, gen_c,
                                                         gain=phase.interval / batch.rounds))
        phase.set_trainable(False)
        params = [p for p in phase.params if p.grad is not None]
        hooks.after_backward(phase, params, c)
        bad = optimizer_step(phase.opt, params, run.accelerator.scaler)
        if bad is not None:
            tick.skipped_steps += bad
            step_bad |= bad
    return step_bad


def end_of_tick(run: Run, tick: Tick, done: bool) -> bool:
    """The work at a tick, in order: 1. report (status line, stats.jsonl, trackers), 2. image snapshot, 3. checkpoint
    (snapshot and training state), 4. metrics, the report page, 5. the end of training (True) or the next tick."""
    c, t, state, cur_nimg = run.state.counters, run.cfg.train, run.state, run.state.counters.cur_nimg

    # 1. Report: status line, stats.jsonl, trackers.
    now = time.time()
    stats = tick.stats.reduce(run.device)
    kimg_done = (cur_nimg - tick.tick_start_nimg) / 1000
    stats.update({"Progress/tick": c.cur_tick, "Progress/kimg": cur_nimg / 1000,
                  "Timing/total_sec": now - tick.start_time, "Timing/sec_per_tick": now - tick.tick_start_time,
                  "Timing/sec_per_kimg": (now - tick.tick_start_time) / kimg_done if kimg_done > 0 else 0.0,
                  "Resources/peak_mem_gb": peak_memory_gb(run.device),
                  "Progress/skipped_steps": c.skipped_steps, "Loss/pl_mean": float(run.loss.pl_mean)})
    if run.augment_pipe is not None:
        stats["Progress/augment_p"] = float(run.augment_pipe.p)
    if run.ada is not None and run.ada.r_t == run.ada.r_t:  # NaN before the first adjustment.
        stats["Progress/ada_rt"] = float(run.ada.r_t)
    if run.stage is not None:
        stats.update({"Progress/stage": run.stage.index, "Progress/resolution": run.stage.resolution,
                      "Progress/fade": run.stage.alpha, "Progress/batch_size": run.batch.size})
    # G_ema's grid (fixed latents, constant noise) when an image snapshot is due: its diversity joins the stats, and
    # the health monitor reads them (rank 0).
    images = None
    if dist.is_main() and t.image_snap and (done or c.cur_tick % t.image_snap == 0):
        with KeepRNG():
            images = generate_grid(run.G_ema, run.grid["z"], run.grid["c"], run.batch.gpu)
        if images.shape[-1] < run.dataset.resolution:  # A progressive stage: shown at the dataset's size.
            images = torch.nn.functional.interpolate(images, size=run.dataset.resolution, mode="nearest")
    if run.monitor is not None:
        if images is not None and run.grid["real_diversity"] is not None:
            stats.update({DIVERSITY_FAKE: diversity(images), DIVERSITY_REAL: run.grid["real_diversity"]})
        stats[WARNINGS_KEY] = [w.as_dict() for w in run.monitor.feed(stats)]
    ops_new = dispatch.decisions()[tick.ops_logged:]  # each self-check decision once, when made
    if ops_new:
        stats[OPS_KEY], tick.ops_logged = ops_new, tick.ops_logged + len(ops_new)
    if dist.is_main():
        write_report(stats, run.run_dir, run.pbar, run.trackers, cur_nimg)

    # 2. Snapshot image grid.
    if images is not None:
        save_image_grid(images, run.run_dir / f"fakes{cur_nimg // 1000:06d}.png", run.grid["size"])
        log_grid(run.trackers, images, run.grid["size"], cur_nimg)

    # 3. Checkpoint: snapshot (weights) and full training state (rank 0 writes, every rank contributes RNG), saved
    # with the next tick's counters: a resumed run continues exactly where this one goes on.
    snap_due = t.snap and (done or c.cur_tick % t.snap == 0) and not tick.first_report
    every = run.cfg.metrics.every_kimg
    metrics_due = (snap_due if every is None else
                   cur_nimg // int(every * 1000) > c.metrics_nimg // int(every * 1000)
                   or (done and cur_nimg > c.metrics_nimg))
    metrics_due = bool(run.metric_names and metrics_due and not tick.first_report)
    if snap_due:
        state.timing = {"total_sec": time.time() - tick.start_time, "tick_sec": 0.0}
        state.save(run.run_dir, cur_nimg, counters=c.next_tick(cur_nimg, metrics_due), keep=t.keep)

    # 4. Metrics of G_ema (every rank takes a share of the images), appended to metric-<name>.jsonl; they draw no
    # numbers from the training streams. The run report page, rewritten at every snapshot (rank 0).
    if metrics_due:
        with KeepRNG():
            evaluate_metrics(run.G_ema, run.dataset, run.detector, run.metric_names, run.run_dir, cur_nimg,
                             run.cfg.metrics, run.pbar, run.trackers, cur_nimg, final=done)
        c.metrics_nimg = cur_nimg
    if dist.is_main() and (images is not None or snap_due or metrics_due):
        run.page.update()

    # 5. Stop, or the next tick.
    if done:
        return True
    c.cur_tick += 1
    tick.first_report = False
    tick.tick_start_nimg = cur_nimg
    tick.tick_start_time = time.time()
    return False


@torch.no_grad()
def generate_grid(G_ema, grid_z, grid_c, batch: int):
    """G_ema's images for the fixed grid latents (constant noise), in batches."""
    out = [G_ema(z, c, noise_mode="const") for z, c in zip(grid_z.split(batch), grid_c.split(batch))]
    return torch.cat(out)


# The end of a run that trained to train.kimg: DONE (with the kimg reached) written by rank 0, every rank past it.
def finish(run: Run) -> dict:
    if run.trackers is not None:
        run.trackers.finish()
    if dist.is_main():
        (run.run_dir / "DONE").write_text(json.dumps({"kimg": run.state.counters.cur_nimg / 1000}))
    dist.barrier()
    return dataclasses.asdict(run.state.counters)


# After a stop request at a step boundary: write the training state there (counters as they are, so a resumed
# run finishes the current tick) and return, or, after too many non-finite steps, keep the last good state (the
# current one when every weight is finite, else the newest checkpoint) and raise NonFiniteError.
def _stop(reason, run: Run, tick_start_nimg: int) -> dict:
    state, max_nonfinite = run.state, run.cfg.train.max_nonfinite
    cur_nimg = state.counters.cur_nimg
    good = reason != "nonfinite" or all_finite(state.nets.values(), [state.loss.pl_mean])
    path = state.save(run.run_dir, cur_nimg, counters=state.counters.at_stop(tick_start_nimg), snapshot=False) \
        if good else None
    run.trackers.finish()
    dist.barrier()
    if reason == "nonfinite":
        if path is None:
            states = ckpt.list_states(run.run_dir)
            path = states[0][1] if states else "none (no checkpoint was written yet)"
        raise NonFiniteError(f"stopped at {cur_nimg / 1000:.3f} kimg after {max_nonfinite} minibatches in a row with "
                             f"non-finite gradients (train.max_nonfinite={max_nonfinite}); the last good state is "
                             f"{path}. Lower the learning rates or raise the R1 weight, and start again from it "
                             f"(e.g. resume=<network-snapshot>.safetensors in a new run).")
    dist.print0(f"Stopped by {reason} at {cur_nimg / 1000:.3f} kimg: checkpoint {path}; rerun the same command to "
                f"resume.")
    return dict(dataclasses.asdict(state.counters), stopped=reason)
