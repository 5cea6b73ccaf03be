"""The training state: one object that saves and loads everything a run resumes from, symmetrically."""
import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from training import dist
from training.errors import RunTimeFailure
from training.io import checkpoint as ckpt
from training.io.files import load_strict

STATE_FORMAT = "ganforge-training-state"
STATE_VERSION = 2


class ResumeError(RunTimeFailure, ValueError):
    """The run cannot start from what it was asked to resume from (and the message says why)."""


@dataclasses.dataclass
class Counters:
    """Where a run is: progress in images and minibatches, the tick, the data stream, skipped steps."""
    cur_nimg: int = 0          # real images shown to D so far
    cur_tick: int = 0          # ticks reported so far
    batch_idx: int = 0         # minibatches done so far (lazy regularization and ADA count them)
    tick_start_nimg: int = 0   # cur_nimg at the start of the current tick
    skipped_steps: int = 0     # phases stepped with a zeroed non-finite gradient
    sampler_pos: int = 0       # items this rank's sampler has handed out
    metrics_nimg: int = 0      # cur_nimg of the last metrics evaluation
    nonfinite_streak: int = 0  # minibatches in a row with a non-finite gradient

    def next_tick(self, cur_nimg: int, metrics_due: bool) -> "Counters":
        """The counters a checkpoint at a tick saves: the next tick's, so that a resumed run neither repeats nor
        skips a report (and does not recompute the metrics point just taken)."""
        return dataclasses.replace(self, cur_tick=self.cur_tick + 1, tick_start_nimg=cur_nimg,
                                   metrics_nimg=cur_nimg if metrics_due else self.metrics_nimg)

    def at_stop(self, tick_start_nimg: int) -> "Counters":
        """The counters a stop saves: as they are, in the current tick (a resumed run finishes it)."""
        return dataclasses.replace(self, tick_start_nimg=tick_start_nimg, nonfinite_streak=0)


def fingerprint(module) -> str:
    """sha256 of a module's parameters and buffers, to prove that all ranks hold the same weights."""
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TrainState:
    """Everything a training run resumes from: G, D, G_ema, the optimizers of the phases, the grad scaler, the
    counters, the loss's path-length mean, ADA (pipe and heuristic), the progressive stage, every rank's RNG
    state, the number of processes and the config.

    `state_dict()` and `load_state_dict()` are symmetric and walk one table (`_fields`): adding a field to the
    training state is one entry there. `state_dict` and `save` are collective (every rank must call them: the
    RNG states and weight fingerprints of all ranks are gathered); only rank 0 writes.
    """

    def __init__(self, G, D, G_ema, phases, loss, augment_pipe=None, ada=None, scaler=None, config=None,
                 requested=None):
        self.G, self.D, self.G_ema = G, D, G_ema
        self.phases, self.loss, self.augment_pipe, self.ada, self.scaler = phases, loss, augment_pipe, ada, scaler
        self.config = config or {}        # the resolved config (plain data)
        self.requested = requested or {}  # the config as asked for, before 'auto' (compared on resume)
        self.counters = Counters()
        self.stage = None                 # {'resolution', 'alpha'} during a progressive schedule, else None
        self.rng = None                   # this rank's RNG state from a loaded state (see start_rng)
        self.saved_world = None           # the number of processes that wrote the loaded state
        self.saved_config = self.saved_requested = None  # the loaded state's configs (plain data)
        # Wall-clock seconds of the run so far and of its current tick at the last save (or load): a resumed run's
        # Timing/total_sec continues, and a tick cut by a stop is timed whole. Not part of what is trained.
        self.timing = {"total_sec": 0.0, "tick_sec": 0.0}

    @property
    def nets(self) -> dict:
        return {"G": self.G, "D": self.D, "G_ema": self.G_ema}

    def _fields(self, source="the training state", counters: Optional[Counters] = None) -> dict:
        """The table of fields: key -> (save, load, present). `present` is False for a part this run does not
        have (no scaler, ADA or stage); a required field missing from a file is an error, an absent optional
        one is skipped. Fields load in this order (world_size first: counters and RNG depend on it)."""
        opts = [ph for ph in self.phases if ph.owns_opt]
        return {
            "world_size": (dist.get_world_size, self._load_world, True),
            **{name: (lambda net=net: {k: v.detach().cpu() for k, v in net.state_dict().items()},
                      lambda v, net=net, name=name: load_strict(net, v, f"{source}: {name}", ResumeError), True)
               for name, net in self.nets.items()},
            "opt": (lambda: [ph.opt.state_dict() for ph in opts], lambda v: self._load_opts(v, opts, source), True),
            "phases": (lambda: [[ph.name, ph.interval] for ph in self.phases],
                       lambda v: self._check_phases(v, source), True),
            "counters": (lambda: dataclasses.asdict(counters or self.counters), self._load_counters, True),
            "pl_mean": (lambda: self.loss.pl_mean.detach().cpu(), lambda v: self.loss.pl_mean.copy_(v), True),
            "rng": (lambda: dist.all_gather_object(ckpt.get_rng_state()), self._load_rng, True),
            "fingerprints": (lambda: self._fingerprints(), lambda v: self._check_fingerprints(v, source), True),
            "config": (lambda: json.dumps(self.config), lambda v: setattr(self, "saved_config", json.loads(v)), True),
            "config_requested": (lambda: json.dumps(self.requested),
                                 lambda v: setattr(self, "saved_requested", json.loads(v)), True),
            "scaler": (lambda: self.scaler.state_dict(), lambda v: self.scaler.load_state_dict(v),
                       self.scaler is not None),
            "augment_pipe": (lambda: {k: v.detach().cpu() for k, v in self.augment_pipe.state_dict().items()},
                             lambda v: self.augment_pipe.load_state_dict(v), self.augment_pipe is not None),
            "ada": (lambda: self.ada.state_dict(), lambda v: self.ada.load_state_dict(v), self.ada is not None),
            "timing": (lambda: dict(self.timing), lambda v: setattr(self, "timing", dict(v)), True),
            "stage": (lambda: dict(self.stage), lambda v: setattr(self, "stage", dict(v)), self.stage is not None),
        }

    def state_dict(self, counters: Optional[Counters] = None) -> dict:
        """The training state as tensors and plain data (collective). `counters` replace the current ones in it
        (a checkpoint at a tick saves the next tick's)."""
        state = {"format": STATE_FORMAT, "version": STATE_VERSION}
        state.update({k: save() for k, (save, _, present) in self._fields(counters=counters).items() if present})
        return state

    def load_state_dict(self, state: dict, source="the training state") -> None:
        """Load a training state written by state_dict (also by earlier ganforge versions); raises ResumeError
        naming `source` and what does not match."""
        fields = self._fields(source)
        missing = [k for k, (_, _, present) in fields.items() if present and k not in state
                   and k not in ("fingerprints", "config_requested", "world_size", "phases", "config", "timing")]
        if missing:
            raise ResumeError(f"{source}: not a ganforge training state (no {', '.join(missing)})")
        for key, (_, load, present) in fields.items():
            if present and key in state:
                load(state[key])

    def save(self, run_dir, cur_nimg: int, counters: Optional[Counters] = None, snapshot: bool = True,
             keep: int = 0) -> Path:
        """Write training-state-<kimg>.pt (and, with `snapshot`, network-snapshot-<kimg>.safetensors) into
        `run_dir` (collective; rank 0 writes, then keeps the newest `keep` states plus the best metrics'). A write
        error stops every rank with CheckpointWriteError. Returns the state's path."""
        run_dir = Path(run_dir)
        state = self.state_dict(counters)
        kimg = cur_nimg // 1000
        path = run_dir / f"training-state-{kimg:06d}.pt"

        def write():
            if snapshot:
                ckpt.save_snapshot(run_dir / f"network-snapshot-{kimg:06d}.safetensors", self.G, self.D,
                                   self.G_ema, config=self.config,
                                   extra={"cur_nimg": cur_nimg, **({"stage": self.stage} if self.stage else {})})
            ckpt.write_state_file(path, dict(state, best_metrics=json.dumps(ckpt.best_metrics(run_dir))))
            ckpt.prune_states(run_dir, keep, protect=ckpt.best_kimgs(run_dir))
        try:
            dist.rank0_decides(write, Exception)
        except ckpt.CheckpointWriteError:
            raise
        except Exception as e:
            raise ckpt.CheckpointWriteError(f"rank 0 could not write the checkpoint: {e}") from e
        return path

    def start_rng(self, seed: int, resumed: bool) -> None:
        """Start the random streams before the first step: the loaded state's (exact resume), else from the seed
        (a resume with another number of processes gets fresh per-rank streams)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        if self.rng is not None:
            ckpt.set_rng_state(self.rng)
            return
        s = (seed * 1_000_003 + self.counters.cur_nimg * 131 + rank) % (2 ** 31) if resumed else seed * world + rank
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    # -- field helpers ------------------------------------------------------------------------------------------

    def _load_world(self, world) -> None:
        self.saved_world = int(world)

    def _load_opts(self, opts_state, opts, source) -> None:
        if len(opts_state) != len(opts):
            raise ResumeError(f"{source}: holds {len(opts_state)} optimizers, this config has {len(opts)}")
        for ph, s in zip(opts, opts_state):
            ph.opt.load_state_dict(s)

    def _check_phases(self, saved, source) -> None:
        ours = [[ph.name, ph.interval] for ph in self.phases]
        if [[str(n), int(i)] for n, i in saved] != ours:
            raise ResumeError(f"{source}: written with the phases {saved}, this config has {ours}")

    def _load_counters(self, saved: dict) -> None:
        names = {f.name for f in dataclasses.fields(Counters)}
        self.counters = Counters(**{k: int(v) for k, v in saved.items() if k in names})
        world = dist.get_world_size()
        if self.saved_world is not None and self.saved_world != world:
            # The data stream continues at the same global position; the per-rank random streams start anew.
            self.counters.sampler_pos = self.counters.sampler_pos * self.saved_world // world

    def _load_rng(self, rng: list) -> None:
        world = dist.get_world_size()
        saved = self.saved_world if self.saved_world is not None else len(rng)
        self.rng = rng[dist.get_rank()] if saved == world else None

    def _fingerprints(self) -> list:
        prints = dist.all_gather_object({name: fingerprint(net) for name, net in self.nets.items()})
        if any(p != prints[0] for p in prints):
            raise RuntimeError(f"ranks hold different weights at {self.counters.cur_nimg / 1000:.3f} kimg: {prints}")
        return prints

    def _check_fingerprints(self, saved: list, source) -> None:
        ours = {name: fingerprint(net) for name, net in self.nets.items()}
        if saved and saved[0] != ours:
            changed = sorted(k for k in ours if saved[0].get(k) != ours[k])
            raise ResumeError(f"{source}: the loaded {', '.join(changed)} do not reproduce the weights it was saved "
                              f"with (fingerprint mismatch)")


class KeepRNG:
    """The RNG states of torch, NumPy and Python, saved and restored around work that must not change the training
    streams (metrics, image grids): a resumed run then draws exactly what the uninterrupted run draws."""

    def __enter__(self):
        self.state = ckpt.get_rng_state()
        return self

    def __exit__(self, *exc):
        ckpt.set_rng_state(self.state)
        return False
