"""The training state: one object that saves and loads everything a run resumes from, symmetrically."""
import dataclasses
import json
import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from training import dist
from training.errors import ResumeError
from training.io import checkpoint as ckpt
from training.io.files import load_strict
from training.resume import check_config, check_dataset
from training.schedule import check_stage_state, stage_meta

STATE_FORMAT = "ganforge-training-state"
STATE_VERSION = 2


# One entry of the training state's table: how the field is saved and loaded. `present`: this run has the part (no
# scaler, ADA or schedule otherwise; an absent part is neither saved nor loaded). `required`: a file without it is
# not a training state (optional: fields that earlier ganforge versions did not write). `load` None: the field is
# written for reference or checked elsewhere in load_state_dict, not loaded.
@dataclasses.dataclass
class Field:
    save: Callable
    load: Optional[Callable]
    present: bool = True
    required: bool = True


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
    return ckpt.tensors_sha256(list(module.named_parameters()) + list(module.named_buffers()))


class TrainState:
    """Everything a training run resumes from: G, D, G_ema, the optimizers of the phases, the grad scaler, the
    counters, the loss's path-length mean, ADA (pipe and heuristic), the progressive stage, every rank's RNG
    state, the number of processes and the config.

    `state_dict()` and `load_state_dict()` are symmetric and walk one table (`_fields`): adding a field to the
    training state is one entry there. load_state_dict is the only reader of a loaded state and makes every check
    of it (the config diff and the dataset, the schedule's stage, the weights' fingerprints, the number of
    processes). `state_dict` and `save` are collective (every rank must call them: the RNG states and weight
    fingerprints of all ranks are gathered); only rank 0 writes. The file's own checksum ('sha256') belongs to the
    file format (training.io.checkpoint.write_state_file / read_state_file), not to the table.
    """

    def __init__(self, G, D, G_ema, phases, loss, augment_pipe=None, ada=None, scaler=None, config=None,
                 requested=None, schedule=None):
        self.G, self.D, self.G_ema = G, D, G_ema
        self.phases, self.loss, self.augment_pipe, self.ada, self.scaler = phases, loss, augment_pipe, ada, scaler
        self.config = config or {}        # the resolved config (plain data)
        self.requested = requested or {}  # the config as asked for, before 'auto' (compared on resume)
        self.schedule = schedule          # the progressive schedule (None when off): the stage follows from it
        self.counters = Counters()
        self.rng = None                   # this rank's RNG state from a loaded state (see start_rng)
        self.saved_world = None           # the number of processes that wrote the loaded state
        # Wall-clock seconds of the run so far and of its current tick at the last save (or load): a resumed run's
        # Timing/total_sec continues, and a tick cut by a stop is timed whole. Not part of what is trained.
        self.timing = {"total_sec": 0.0, "tick_sec": 0.0}

    @property
    def nets(self) -> dict:
        return {"G": self.G, "D": self.D, "G_ema": self.G_ema}

    @property
    def stage(self) -> Optional[dict]:
        """The progressive stage the networks are at ({'resolution', 'alpha'}), or None without a schedule."""
        return stage_meta(self.G) if self.schedule is not None else None

    def _fields(self, source="the training state", state: Optional[dict] = None,
                counters: Optional[Counters] = None, run_dir=None) -> dict:
        """The table of fields, in load order: the configs first (a refused change is reported before anything
        loads), then world_size (counters and RNG depend on it). `state`: the state being loaded, if any;
        `counters`, `run_dir`: what state_dict saves (see there)."""
        opts = [ph for ph in self.phases if ph.owns_opt]
        has_requested = state is not None and "config_requested" in state
        return {
            # Older states hold only the resolved config: it is compared with this run's resolved one.
            "config": Field(lambda: json.dumps(self.config),
                            None if has_requested else lambda v: self._check_config(json.loads(v), self.config, source),
                            required=False),
            "config_requested": Field(lambda: json.dumps(self.requested),
                                      lambda v: self._check_config(json.loads(v), self.requested, source),
                                      required=False),
            "world_size": Field(dist.get_world_size, lambda v: self._load_world(v, source), required=False),
            **{name: Field(lambda net=net: ckpt.cpu_state_dict(net),
                           lambda v, net=net, name=name: load_strict(net, v, f"{source}: {name}", ResumeError))
               for name, net in self.nets.items()},
            "opt": Field(lambda: [ph.opt.state_dict() for ph in opts], lambda v: self._load_opts(v, opts, source)),
            "phases": Field(lambda: [[ph.name, ph.interval] for ph in self.phases],
                            lambda v: self._check_phases(v, source), required=False),
            "counters": Field(lambda: dataclasses.asdict(counters or self.counters), self._load_counters),
            "pl_mean": Field(lambda: self.loss.pl_mean.detach().cpu(), lambda v: self.loss.pl_mean.copy_(v)),
            "rng": Field(lambda: dist.all_gather_object(ckpt.get_rng_state()), self._load_rng),
            "fingerprints": Field(self._fingerprints, lambda v: self._check_fingerprints(v, source), required=False),
            "scaler": Field(lambda: self.scaler.state_dict(), lambda v: self.scaler.load_state_dict(v),
                            self.scaler is not None),
            "augment_pipe": Field(lambda: ckpt.cpu_state_dict(self.augment_pipe),
                                  lambda v: self.augment_pipe.load_state_dict(v), self.augment_pipe is not None),
            "ada": Field(lambda: self.ada.state_dict(), lambda v: self.ada.load_state_dict(v), self.ada is not None),
            "timing": Field(lambda: dict(self.timing), lambda v: setattr(self, "timing", dict(v)), required=False),
            # The stage follows from cur_nimg and the schedule: load_state_dict checks it, then sets the networks to it.
            "stage": Field(lambda: self.stage, None, self.schedule is not None, required=False),
            # The best metric records when the state was written, for reference (the run directory's own
            # metric-*-best.json files are what a resumed run reads); read by rank 0, the one that writes.
            "best_metrics": Field(lambda: json.dumps(ckpt.best_metrics(run_dir)), None,
                                  run_dir is not None and dist.is_main(), required=False),
        }

    def state_dict(self, counters: Optional[Counters] = None, run_dir=None) -> dict:
        """The training state as tensors and plain data (collective). `counters` replace the current ones in it
        (a checkpoint at a tick saves the next tick's); with `run_dir`, rank 0's also holds its best metric records."""
        state = {"format": STATE_FORMAT, "version": STATE_VERSION}
        fields = self._fields(counters=counters, run_dir=run_dir)
        state.update({k: f.save() for k, f in fields.items() if f.present})
        return state

    def load_state_dict(self, state: dict, source="the training state") -> None:
        """Load a training state written by state_dict (also by earlier ganforge versions) and check it against this
        run: its config (only the keys training.resume allows may differ; the allowed changes are printed) and
        dataset, its progressive stage, its weights' fingerprints. Raises ResumeError naming `source` and what does
        not match."""
        fields = self._fields(source, state)
        missing = [k for k, f in fields.items() if f.present and f.required and k not in state]
        if missing:
            raise ResumeError(f"{source}: not a ganforge training state (no {', '.join(missing)})")
        for key, f in fields.items():
            if f.present and f.load is not None and key in state:
                f.load(state[key])
        check_stage_state(state, self.schedule, self.counters.cur_nimg, source)
        if self.schedule is not None:
            for net in self.nets.values():
                net.set_stage(int(state["stage"]["resolution"]), float(state["stage"]["alpha"]))

    def save(self, run_dir, cur_nimg: int, counters: Optional[Counters] = None, snapshot: bool = True,
             keep: int = 0) -> Path:
        """Write training-state-<kimg>.pt (and, with `snapshot`, network-snapshot-<kimg>.safetensors) into
        `run_dir` (collective; rank 0 writes, then keeps the newest `keep` states plus the best metrics'). A write
        error stops every rank with CheckpointWriteError. Returns the state's path."""
        run_dir = Path(run_dir)
        state = self.state_dict(counters, run_dir)
        kimg = cur_nimg // 1000
        path = run_dir / f"training-state-{kimg:06d}.pt"

        def write():
            if snapshot:
                ckpt.save_snapshot(run_dir / f"network-snapshot-{kimg:06d}.safetensors", self.G, self.D,
                                   self.G_ema, config=self.config,
                                   extra={"cur_nimg": cur_nimg, **({"stage": self.stage} if self.stage else {})})
            ckpt.write_state_file(path, state)
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

    def _load_world(self, world, source) -> None:
        self.saved_world = int(world)
        if self.saved_world != dist.get_world_size():
            dist.print0(f"Warning: {source} was written by {self.saved_world} processes, this run has "
                        f"{dist.get_world_size()}: it continues, but not bit-for-bit as the original run would have")

    def _check_config(self, saved: dict, ours: dict, source) -> None:
        """Refuse another dataset or a change of what is trained (ResumeError with the diff); print the allowed
        changes."""
        check_dataset(saved, self.requested, source)
        for line in check_config(saved, ours, source):
            dist.print0(f"Config change on resume (allowed): {line}")

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
