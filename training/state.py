"""Full training state: what a checkpoint holds, how it is saved and restored, and where a run resumes from."""
import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from training.io import checkpoint as ckpt
from training import dist

STATE_FORMAT = "ganforge-training-state"
STATE_VERSION = 2

# Config keys that may change when a run resumes (lengths, intervals, logging, metrics, resources); a key ending
# in '.' stands for its whole group. Every other change is refused with a diff.
SAFE_KEYS = ("train.kimg", "train.tick_kimg", "train.snap", "train.image_snap", "train.cpu_threads", "train.keep",
             "train.max_nonfinite", "train.tf32", "data.num_workers", "log.", "metrics.")

# Keys that say where a run lives, not what it trains.
IGNORED_KEYS = ("run_dir", "resume", "outdir")


# The run cannot start from what it was asked to resume from (and the message says why).
class ResumeError(ValueError):
    pass


# A nested config dict as {'group.key': value}.
def flatten(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_KEYS)


# Differences between the config a checkpoint was trained with and the current one, as 'key: old → new' lines:
# (refused, allowed). Keys that only one side has (added or removed by a newer ganforge) are allowed.
def config_changes(old: dict, new: dict):
    a, b = flatten(old), flatten(new)
    refused, allowed = [], []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in IGNORED_KEYS or a.get(key, None) == b.get(key, None):
            continue
        if key not in a or key not in b:
            allowed.append(f"{key}: {a.get(key, '(absent)')!r} → {b.get(key, '(absent)')!r}")
            continue
        line = f"{key}: {a[key]!r} → {b[key]!r}"
        (allowed if _is_safe(key) else refused).append(line)
    return refused, allowed


# Refuse to resume `source` under a config that changes what is trained; returns the allowed changes.
def check_config(old: dict, new: dict, source) -> list:
    refused, allowed = config_changes(old, new)
    if refused:
        raise ResumeError(
            f"{source}: the config differs from the one this checkpoint was trained with:\n  " +
            "\n  ".join(refused) +
            f"\nOnly these keys may change on resume: "
            f"{', '.join(k + '*' if k.endswith('.') else k for k in SAFE_KEYS)}."
            f"\nUndo the change to continue this run, or start a new run (another run_dir) with "
            f"resume=<network-snapshot>.safetensors to start from its weights only.")
    return allowed


# Where to start (rank 0): {'kind': 'fresh'}, {'kind': 'state', 'path', 'state'} (full resume) or
# {'kind': 'weights', 'path'} (G, D, G_ema only). The run directory's own newest intact checkpoint wins, so that
# rerunning the same command continues the run; `resume` (cfg['resume']) is used when there is none.
def resolve_resume(cfg: dict, run_dir, log=print) -> dict:
    run_dir = Path(run_dir)
    resume = cfg.get("resume")
    if resume == "none":
        existing = [p.name for _, p in ckpt.list_states(run_dir)]
        existing += sorted(p.name for p in run_dir.glob("network-snapshot-*.safetensors"))
        if existing:
            raise ResumeError(f"{run_dir} already holds checkpoints ({', '.join(existing[:3])}"
                              f"{', ...' if len(existing) > 3 else ''}); resume=none refuses to overwrite a run: "
                              f"choose another run_dir, or leave out resume=none to continue this one")
        return {"kind": "fresh"}
    own = ckpt.newest_intact_state(run_dir, log)
    if own is not None:
        if resume is not None:
            log(f"{run_dir} holds its own checkpoints: continuing from {own[0]} (resume={resume} is only used "
                f"to start a run)")
        return {"kind": "state", "path": str(own[0]), "state": own[1]}
    if resume is None:
        return {"kind": "fresh"}
    path = Path(os.path.expanduser(str(resume)))
    expected = "a training-state-*.pt, a run directory, a network-snapshot .safetensors, an official .pkl, or none"
    if not path.exists():
        raise ResumeError(f"resume={resume}: no such file or directory (expected {expected})")
    if path.is_dir():
        found = ckpt.newest_intact_state(path, log)
        if found is None:
            raise ResumeError(f"resume={resume}: no training-state-*.pt in this directory (expected {expected})")
        return {"kind": "state", "path": str(found[0]), "state": found[1]}
    if path.suffix in (".safetensors", ".pkl"):
        return {"kind": "weights", "path": str(path)}
    if path.suffix == ".pt":
        return {"kind": "state", "path": str(path), "state": ckpt.load_state(path)}
    raise ResumeError(f"resume={resume}: unknown file type {path.suffix!r} (expected {expected})")


# Resolve on rank 0 and share the decision: every rank then loads the same file. An error on rank 0 is raised on
# every rank (no rank is left waiting for the others).
def resolve_resume_all(cfg: dict, run_dir, log=print) -> dict:
    plan, error = None, None
    if dist.is_main():
        try:
            plan = resolve_resume(cfg, run_dir, log)
        except (ResumeError, ckpt.CheckpointError) as e:
            error = e
    shared = dist.broadcast_object(None if plan is None else {k: v for k, v in plan.items() if k != "state"})
    failed = dist.broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if failed is not None:
        raise ResumeError(failed)
    if not dist.is_main():
        plan = dict(shared)
        if plan["kind"] == "state":
            plan["state"] = ckpt.load_state(plan["path"])
    return plan


# Load G, D and G_ema from a snapshot (.safetensors or official .pkl) for transfer learning: the networks must
# match the configured architecture; a network the file lacks is taken from its twin (G <-> G_ema) or kept fresh.
def load_weights(path, G, D, G_ema, log=print) -> None:
    try:
        snap = ckpt.load_snapshot(path)
    except (ValueError, FileNotFoundError) as e:
        raise ResumeError(f"resume={path}: {e}") from e
    sources = {"G": snap.get("G") or snap.get("G_ema"), "D": snap.get("D"), "G_ema": snap.get("G_ema") or snap.get("G")}
    for name, net in (("G", G), ("D", D), ("G_ema", G_ema)):
        src = sources[name]
        if src is None:
            log(f"{path} holds no {name}: it starts from its random initialization")
            continue
        ours, theirs = net.state_dict(), src.state_dict()
        problems = [f"{k} missing" for k in ours if k not in theirs]
        problems += [f"{k} unexpected" for k in theirs if k not in ours]
        problems += [f"{k} is {tuple(theirs[k].shape)}, the model wants {tuple(v.shape)}"
                     for k, v in ours.items() if k in theirs and theirs[k].shape != v.shape]
        if problems:
            raise ResumeError(f"resume={path}: its {name} does not match the configured model (model.*, data "
                              f"resolution and labels): {'; '.join(problems[:4])}"
                              f"{'; ...' if len(problems) > 4 else ''}")
        net.load_state_dict({k: v.to(ours[k].dtype) for k, v in theirs.items()})


# sha256 of a module's parameters and buffers, to prove that all ranks hold the same weights.
def fingerprint(module) -> str:
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# Gather every rank's RNG state and check that the ranks hold the same weights; rank 0 writes the snapshot
# (`snapshot`) and the full training state, then deletes old states beyond `keep` (best ones stay). A write
# error (disk full, ...) stops every rank with CheckpointWriteError. Returns the training state's path.
def save_checkpoint(run_dir, cfg: dict, requested: dict, nets: dict, phases, counters: dict, loss,
                    cur_nimg: int, augment_pipe=None, ada=None, scaler=None, snapshot: bool = True,
                    keep: int = 0, stage=None) -> Path:
    run_dir = Path(run_dir)
    rng = dist.all_gather_object(ckpt.get_rng_state())
    prints = dist.all_gather_object({name: fingerprint(net) for name, net in nets.items()})
    if any(p != prints[0] for p in prints):
        raise RuntimeError(f"ranks hold different weights at {cur_nimg / 1000:.3f} kimg: {prints}")
    kimg = cur_nimg // 1000
    path = run_dir / f"training-state-{kimg:06d}.pt"
    error = None
    if dist.is_main():
        try:
            if snapshot:
                ckpt.save_snapshot(run_dir / f"network-snapshot-{kimg:06d}.safetensors", nets["G"], nets["D"],
                                   nets["G_ema"], config=cfg,
                                   extra={"cur_nimg": cur_nimg, **({"stage": stage} if stage else {})})
            opt_phases = [ph for ph in phases if ph.name.endswith(("main", "both"))]
            state = {"format": STATE_FORMAT, "version": STATE_VERSION,
                     **{name: ckpt._cpu_state(net) for name, net in nets.items()},
                     "opt": [ph.opt.state_dict() for ph in opt_phases],
                     "phases": [[ph.name, ph.interval] for ph in phases],
                     "counters": dict(counters), "pl_mean": loss.pl_mean.detach().cpu(), "rng": rng,
                     "world_size": dist.get_world_size(), "fingerprints": prints,
                     "config": json.dumps(cfg), "config_requested": json.dumps(requested),
                     "best_metrics": json.dumps(ckpt.best_metrics(run_dir))}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            if augment_pipe is not None:
                state["augment_pipe"] = {k: v.detach().cpu() for k, v in augment_pipe.state_dict().items()}
            if ada is not None:
                state["ada"] = ada.state_dict()
            if stage is not None:  # The progressive stage and fade (a function of cur_nimg; checked on resume).
                state["stage"] = dict(stage)
            ckpt.save_state(path, state)
            ckpt.prune_states(run_dir, keep, protect=ckpt.best_kimgs(run_dir))
        except Exception as e:  # Shared below, so that no rank waits for a checkpoint that will not come.
            error = e
    failed = dist.broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if failed is not None:
        raise ckpt.CheckpointWriteError(f"rank 0 could not write the checkpoint: {failed}")
    return path


# Load a full training state into the networks, optimizers, loss, ADA and grad scaler of this rank. Returns
# (counters, rng): rng is this rank's saved RNG state (None when the number of processes changed), to be set
# just before the first step.
def restore_state(state: dict, source, G, D, G_ema, phases, loss, augment_pipe=None, ada=None, scaler=None,
                  log=print):
    missing = [k for k in ("G", "D", "G_ema", "opt", "counters", "pl_mean", "rng") if k not in state]
    if missing:
        raise ResumeError(f"{source}: not a ganforge training state (no {', '.join(missing)})")
    for name, net in (("G", G), ("D", D), ("G_ema", G_ema)):
        try:
            net.load_state_dict(state[name])
        except (KeyError, RuntimeError) as e:
            raise ResumeError(f"{source}: {name} does not match the configured model: {e}") from e
    opt_phases = [ph for ph in phases if ph.name.endswith(("main", "both"))]
    if len(state["opt"]) != len(opt_phases):
        raise ResumeError(f"{source}: holds {len(state['opt'])} optimizers, this config has {len(opt_phases)}")
    for ph, opt_state in zip(opt_phases, state["opt"]):
        ph.opt.load_state_dict(opt_state)
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    loss.pl_mean.copy_(state["pl_mean"])
    if augment_pipe is not None and "augment_pipe" in state:
        augment_pipe.load_state_dict(state["augment_pipe"])
    if ada is not None and "ada" in state:
        ada.load_state_dict(state["ada"])
    counters = dict(state["counters"])
    rank, world = dist.get_rank(), dist.get_world_size()
    saved_world = int(state.get("world_size", len(state["rng"])))
    rng = state["rng"][rank] if saved_world == world else None
    if saved_world != world:
        # The data stream continues at the same global position; the random streams of the ranks start anew.
        counters["sampler_pos"] = counters["sampler_pos"] * saved_world // world
        log(f"Warning: {source} was written by {saved_world} processes, this run has {world}: it continues, but "
            f"not bit-for-bit as the original run would have")
    return counters, rng


# Drop the lines of stats.jsonl that a killed run wrote after the checkpoint it resumes from (rank 0).
def truncate_stats(run_dir, cur_nimg: int) -> None:
    path = Path(run_dir) / "stats.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if round(json.loads(line)["Progress/kimg"] * 1000) > cur_nimg:
                continue
        except (ValueError, KeyError, TypeError):
            continue  # A line cut short by the kill.
        keep.append(line)
    if len(keep) != len(lines):
        ckpt.atomic_write(path, lambda f: f.write("".join(x + "\n" for x in keep).encode()))


# Write config.yaml (this invocation's config) and config.json (the first invocation's, for run matching).
def write_config_files(run_dir, requested: dict) -> None:
    from omegaconf import OmegaConf
    run_dir = Path(run_dir)
    ckpt.atomic_write(run_dir / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(requested).encode()))
    if not (run_dir / "config.json").exists():
        ckpt.atomic_write(run_dir / "config.json", lambda f: f.write(json.dumps(requested, indent=2).encode()))


# The RNG state of `torch`, NumPy and Python, saved and restored around work that must not change the training
# streams (metrics, image grids): a resumed run then draws exactly what the uninterrupted run draws.
class KeepRNG:
    def __enter__(self):
        self.state = ckpt.get_rng_state()
        return self

    def __exit__(self, *exc):
        ckpt.set_rng_state(self.state)
        return False


# A seed for ranks whose saved RNG state cannot be used (the number of processes changed).
def reseed(seed: int, cur_nimg: int, rank: int) -> None:
    s = (seed * 1_000_003 + cur_nimg * 131 + rank) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
