"""Experiment trackers (wandb, TensorBoard) through Accelerate's tracker classes, written by rank 0."""
import secrets
import string
from pathlib import Path

import numpy as np
from accelerate.tracking import TensorBoardTracker, WandBTracker

from training import dist
from training.io.files import atomic_write
from training.io.images import make_grid, to_uint8

# The trackers `log.trackers` may name, and the modes of `log.wandb`.
KNOWN_TRACKERS = ("wandb", "tensorboard")
WANDB_MODES = ("disabled", "offline", "online")
# In the run directory: the wandb run id (random, kept for the run's life) and the TensorBoard event files.
WANDB_ID_FILE = "wandb-id.txt"
TENSORBOARD_DIR = "tensorboard"
# The wandb mode when log.trackers lists wandb and log.wandb is 'disabled' (its default): local files, no network.
DEFAULT_WANDB_MODE = "offline"
# stats.jsonl keys that are not logged as scalars (the trackers record their own wall time).
NOT_SCALARS = ("timestamp",)


def resolve(log) -> tuple:
    """(wandb mode or None, tensorboard on) from `log` (the LogConfig), validated.

    wandb is on when log.trackers lists it or log.wandb is 'offline' or 'online'; its mode is log.wandb, or
    'offline' when only log.trackers asks for it. TensorBoard is on when log.trackers lists it.
    """
    names = [str(n).lower() for n in (log.trackers or [])]
    unknown = [n for n in names if n not in KNOWN_TRACKERS]
    if unknown:
        raise ValueError(f"log.trackers: unknown tracker(s) {unknown}; known: {list(KNOWN_TRACKERS)}")
    if log.wandb not in WANDB_MODES:
        raise ValueError(f"log.wandb must be one of {', '.join(WANDB_MODES)}, got {log.wandb!r}")
    mode = log.wandb if log.wandb != "disabled" else (DEFAULT_WANDB_MODE if "wandb" in names else None)
    return mode, "tensorboard" in names


def wandb_run_id(run_dir) -> str:
    """The wandb run id of `run_dir`: read from wandb-id.txt, or drawn at random and written there (atomically) the
    first time, so that a resumed run continues its wandb run and two runs never share one."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(12))
    atomic_write(path, lambda f: f.write(run_id + "\n"), mode="w")
    return run_id


def _start(tracker):
    # Accelerate >= 1.3 opens a tracker in start() (earlier versions in the constructor).
    start = getattr(tracker, "start", None)
    if start is not None:
        start()
    return tracker


class Trackers:
    """The trackers of a run, logged to together (a no-op object when it holds none: other ranks, none asked for).

    Every call takes `step`, the number of real images shown so far (cur_nimg): the same x-axis for every tracker,
    distinct for every tick whatever train.tick_kimg is, and equal to round(Progress/kimg * 1000) of stats.jsonl.
    """

    def __init__(self, trackers=()):
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    @property
    def names(self) -> list:
        """The names of the open trackers ('wandb', 'tensorboard')."""
        return [t.name for t in self.trackers]

    def log(self, values: dict, step: int) -> None:
        """Log a dict of scalars at `step` to every tracker."""
        for t in self.trackers:
            t.log(values, step=int(step))

    def log_scalars(self, stats: dict, step: int) -> None:
        """Log every numeric value of a stats.jsonl line (all but its timestamp) at `step`."""
        values = {k: v for k, v in stats.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_SCALARS}
        if values:
            self.log(values, step)

    def log_metric(self, name: str, value: float, step: int) -> None:
        """Log one metric value (e.g. 'Metrics/fid50k_full') at `step`."""
        self.log({name: float(value)}, step)

    def log_images(self, name: str, grid: np.ndarray, step: int) -> None:
        """Log one image (uint8, height x width x channels, e.g. a grid of fakes) under `name` at `step`."""
        grid = np.asarray(grid)
        if grid.ndim == 2:
            grid = grid[:, :, None]
        for t in self.trackers:
            if t.name == "tensorboard":
                t.log_images({name: grid[None]}, step=int(step), dataformats="NHWC")
                t.tracker.flush()  # (scalars are flushed by every log; images would wait for flush_secs)
            else:
                t.log_images({name: [grid]}, step=int(step))

    def finish(self) -> None:
        """Close every tracker (flush TensorBoard's events, end the wandb run); later calls do nothing."""
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.finish()


def open_trackers(log, config: dict, run_dir, purge_step: int) -> Trackers:
    """The run's trackers as `log` (the LogConfig) asks (see `resolve`), opened on rank 0; a no-op Trackers on the
    other ranks and when none is asked for. `config` (the config as plain data) is recorded with the wandb run.

    TensorBoard writes to <run_dir>/tensorboard/ and hides the events that an earlier session of this run logged at
    `purge_step` or later (TensorBoard's purge_step: the ticks after the checkpoint a killed run resumes from, the
    ticks that stats.jsonl drops too). wandb writes to <run_dir>/wandb/ with the run id of `wandb_run_id`, resumed
    when it exists ('allow'); a step it has already seen is not logged again.
    """
    wandb_mode, tensorboard = resolve(log)
    if not dist.is_main() or (wandb_mode is None and not tensorboard):
        return Trackers()
    run_dir = Path(run_dir)
    if wandb_mode is not None:
        try:
            import wandb  # noqa: F401  (optional and heavy: only when asked for)
        except ImportError as e:
            raise ImportError(f"wandb logging was asked for (log.trackers={list(log.trackers)}, log.wandb={log.wandb}) "
                              f"but wandb cannot be imported ({e}): pip install wandb, or remove wandb from "
                              f"log.trackers and set log.wandb=disabled") from e
    opened = []
    try:
        if tensorboard:
            opened.append(_start(TensorBoardTracker(TENSORBOARD_DIR, run_dir, purge_step=int(purge_step))))
        if wandb_mode is not None:
            opened.append(_start(WandBTracker(log.wandb_project, dir=str(run_dir), mode=wandb_mode, config=config,
                                              name=run_dir.name, id=wandb_run_id(run_dir), resume="allow")))
    except BaseException:
        Trackers(opened).finish()
        raise
    return Trackers(opened)


def log_grid(trackers, images, grid_size, step: int) -> None:
    """Log an image grid (float images in [-1, 1]) as 'fakes' to the trackers at `step` (nothing without any)."""
    if trackers:
        trackers.log_images("fakes", make_grid(to_uint8(images), *grid_size), step)
