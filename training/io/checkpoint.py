"""Snapshots (G, D, G_ema as safetensors + JSON) and full training state, written atomically, loaded without code."""
import hashlib
import json
import random
import re
import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from networks.discriminator import Discriminator
from networks.generator import Generator
from training.errors import RunTimeFailure, UserError
from training.io import official, records, weights
# atomic_write is re-exported: training/state.py and scripts/project.py reach it as checkpoint.atomic_write.
from training.io.files import FileWriteError, atomic_write, load_dict, load_strict, temp_pattern

SNAPSHOT_RE = re.compile(r"network-snapshot-(\d{6})\.safetensors$")
STATE_RE = re.compile(r"training-state-(\d{6})\.pt$")
# Temporary files of atomic writes of checkpoints (see training.io.files.temp_pattern).
TEMP_RE = temp_pattern(r"training-state-\d{6}\.pt|network-snapshot-\d{6}\.safetensors")


class SnapshotError(UserError, ValueError):
    """A file given as a network snapshot that is not one (missing, another kind of file, unreadable): bad input."""


class CheckpointError(RunTimeFailure, ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, failing its checksum, or carrying code."""
    pass


# Writing a checkpoint failed (disk full, permissions, I/O error); the files that were there before are intact.
# It is the error of every atomic write (training.io.files.FileWriteError), under the name callers know.
CheckpointWriteError = FileWriteError


def cpu_state_dict(module, copy: bool = False) -> dict:
    """A module's state dict, detached, on the CPU (a tensor already on the CPU shares the module's storage, as
    torch.save takes it). copy=True: each tensor a contiguous copy of its own, as safetensors needs (it refuses
    shared or strided storage)."""
    if copy:
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_snapshot(path, G, D, G_ema, config: Optional[dict] = None, extra: Optional[dict] = None) -> None:
    """Save G, D and G_ema (unwrapped modules) with their constructor arguments, the resolved config and the sha256
    of every tensor (tensor_digests, metadata 'sha256') as metadata."""
    tensors = {}
    for name, net in (("G", G), ("D", D), ("G_ema", G_ema)):
        if net is not None:
            tensors.update({f"{name}.{k}": v for k, v in cpu_state_dict(net, copy=True).items()})
    meta = {"format": "ganforge-snapshot", "version": "1", "config": json.dumps(config or {}),
            "sha256": json.dumps(tensor_digests(tensors))}
    for name, net in (("G", G), ("D", D), ("G_ema", G_ema)):
        if net is not None:
            meta[f"{name}_kwargs"] = json.dumps(net.init_kwargs)
    for k, v in (extra or {}).items():
        meta[k] = json.dumps(v)
    atomic_write(path, lambda f: f.write(safetensors_bytes(tensors, metadata=meta)))


# A training state (a torch zip archive) where a snapshot was expected: safetensors would only say "header too large".
def refuse_training_state(path: Path) -> None:
    """Raise SnapshotError when `path` is a training state (training-state-*.pt) rather than a snapshot."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip or path.suffix == ".pt":
        raise SnapshotError(f"{path}: a training state (for resume=), not a network snapshot; give the run's "
                            f"network-snapshot-*.safetensors of the same kimg (or an official .pkl)")


def load_snapshot(path, device="cpu") -> dict:
    """Build G, D, G_ema from a snapshot: a ganforge .safetensors, or an official .pkl through the safe importer.

    `path` may be an http(s) URL: it is downloaded once into the cache (training.io.weights.fetch; a failure is a
    weights.DownloadError naming the URL and the cache path). Returns dict(G, D, G_ema, config, meta); networks
    absent from the file are None. A network whose tensors do not fit the architecture recorded with it is a
    ValueError naming the file and the keys.
    """
    path = Path(weights.fetch(path, what="network"))
    if not path.is_file():
        raise SnapshotError(f"snapshot not found: {path} (expected a network-snapshot-*.safetensors, an official "
                            f".pkl or an http(s) URL)")
    if path.suffix == ".pkl":
        return official.build_networks(path, device=device)
    refuse_training_state(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise SnapshotError(f"{path}: not a readable ganforge snapshot (.safetensors): {e}") from e
    if meta.get("format") != "ganforge-snapshot":
        raise SnapshotError(f"{path}: metadata 'format' is {meta.get('format')!r}, expected 'ganforge-snapshot'")
    verify_snapshot(path, tensors, meta)
    out = {"config": json.loads(meta.get("config", "{}")),
           "meta": {k: json.loads(v) for k, v in meta.items() if k not in ("format", "version", "config", "sha256")}}
    for name, cls in (("G", Generator), ("D", Discriminator), ("G_ema", Generator)):
        if f"{name}_kwargs" not in meta:
            out[name] = None
            continue
        net = cls(**json.loads(meta[f"{name}_kwargs"]))
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        load_strict(net, state, f"{path}: {name} (built from its recorded architecture)")
        out[name] = net.eval().requires_grad_(False).to(device)
        stage = out["meta"].get("stage")
        if stage is not None:  # Taken during a progressive stage: generate (and judge) at that stage.
            net.set_stage(stage["resolution"], stage["alpha"])
    return out


def get_rng_state() -> dict:
    """The RNG states of this process (Python, NumPy, torch CPU and CUDA) as tensors and plain data."""
    py_version, py_keys, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python_version": py_version, "python": torch.tensor(py_keys, dtype=torch.int64),
             "python_gauss": py_gauss, "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
             "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore RNG states saved by `get_rng_state`."""
    random.setstate((state["python_version"], tuple(int(k) for k in state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def hash_tensor(h, t: torch.Tensor, layout: bool = True) -> None:
    """Feed tensor `t` into the hash `h`: with `layout`, "T<dtype><shape>:" first; then its raw bytes (a contiguous
    CPU copy, row-major), so that the same values in another memory layout or on another device hash the same."""
    t = t.detach().to("cpu").contiguous()
    if layout:
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of one tensor's dtype, shape and bytes (hash_tensor): a snapshot's record of each tensor."""
    h = hashlib.sha256()
    hash_tensor(h, t)
    return h.hexdigest()


def tensors_sha256(named) -> str:
    """sha256 of (name, tensor) pairs in their order: each name's UTF-8 bytes, then the tensor's raw bytes (no dtype
    or shape). The weight fingerprint that ranks compare is
    tensors_sha256(list(m.named_parameters()) + list(m.named_buffers()))."""
    h = hashlib.sha256()
    for name, t in named:
        h.update(name.encode())
        hash_tensor(h, t, layout=False)
    return h.hexdigest()


# Feed a nested structure of tensors and plain data into a hash in a canonical order (dict keys sorted, tensors
# by dtype, shape and raw bytes), so that the same content always gives the same digest.
def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        hash_tensor(h, obj)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def tensor_digests(tensors: dict) -> dict:
    """sha256 of each tensor (its dtype, shape and bytes: tensor_sha256), by name."""
    return {name: tensor_sha256(t) for name, t in tensors.items()}


def verify_snapshot(path, tensors: dict, meta: dict) -> None:
    """Check a snapshot's tensors against the sha256 recorded when it was written (metadata 'sha256'); a mismatch or
    a missing tensor is a CheckpointError naming the file and the tensor. A snapshot without the record (an older
    ganforge, or an official pickle converted by one) loads with a note."""
    if "sha256" not in meta:
        print(f"note: {path}: no sha256 of its tensors inside (written by an older ganforge); loaded unverified",
              file=sys.stderr, flush=True)
        return
    try:
        recorded = json.loads(meta["sha256"])
    except ValueError as e:
        raise CheckpointError(f"{path}: its recorded sha256 (metadata 'sha256') is unreadable ({e}): the file is "
                              f"corrupt") from e
    missing = sorted(set(recorded) - set(tensors)) + sorted(set(tensors) - set(recorded))
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]} is missing or unexpected against the sha256 recorded "
                              f"when the snapshot was written: the file is corrupt")
    ours = tensor_digests(tensors)
    for name in tensors:
        if ours[name] != recorded[name]:
            raise CheckpointError(f"{path}: tensor {name} does not match the sha256 recorded when the snapshot was "
                                  f"written (damaged or overwritten on disk): the file is corrupt; use another "
                                  f"snapshot")


def state_digest(state: dict) -> str:
    """sha256 of a training state's content (every tensor and value), stored in the state as 'sha256'."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


def write_state_file(path, state: dict) -> None:
    """Save the full training state (a dict of tensors and plain data) for `torch.load(weights_only=True)`, with the
    sha256 of its content inside."""
    state = dict(state, sha256=state_digest(state))
    atomic_write(path, lambda f: torch.save(state, f))


def read_state_file(path) -> dict:
    """Load a training state without executing code (weights_only refuses any pickle that carries code) and verify its
    checksum; raises CheckpointError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: training state not found")
    state = load_dict(path, "unreadable, truncated or corrupt training state", "a dict of training state",
                      CheckpointError, refuse_code=True)
    if "sha256" not in state:
        warnings.warn(f"{path}: no checksum inside (written by an older ganforge); loading it unverified")
    elif state_digest(state) != state["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch (the content does not match the sha256 stored at save "
                              f"time): the file is corrupt")
    return state


def list_states(run_dir) -> list:
    """Checkpoint files in a run directory, newest first, as (kimg, path)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := STATE_RE.match(p.name))]
    return sorted(found, reverse=True)


def newest_intact_state(run_dir, log=print):
    """The newest training state in `run_dir` that loads and passes its checksum, as (path, state), or None when there
    is no training state. Unusable newer ones are skipped with a warning naming them; when every one is unusable the
    run is not silently restarted: CheckpointError lists them."""
    bad = []
    for _, path in list_states(run_dir):
        try:
            state = read_state_file(path)
        except CheckpointError as e:
            log(f"Warning: skipping {path}: {e}")
            bad.append(str(e))
            continue
        if bad:
            log(f"Warning: resuming from the previous intact checkpoint {path}")
        return path, state
    if bad:
        raise CheckpointError(f"{run_dir}: no intact training state to resume from:\n  " + "\n  ".join(bad) +
                              "\nMove the broken files away to start this run over, or pass resume=<file>.")
    return None


def remove_stale_temps(run_dir) -> list:
    """Delete temporary files left by a write that was killed before its rename (they are never valid checkpoints)."""
    run_dir = Path(run_dir)
    removed = [p for p in run_dir.iterdir() if TEMP_RE.match(p.name)] if run_dir.is_dir() else []
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def best_metrics(run_dir) -> dict:
    """The best record of each metric (metric-<name>-best.json), as {name: record}; unreadable files are left out."""
    out = {}
    for name, p in records.best_files(run_dir):
        try:
            record = json.loads(p.read_text())
            out[record.get("metric", name)] = record
        except (OSError, ValueError):
            continue
    return out


def prune_states(run_dir, keep: int, protect=()) -> list:
    """Delete all but the newest `keep` training states (keep <= 0: keep all) and the ones at the kimg of a best
    metric's snapshot. Returns the deleted paths."""
    if keep is None or keep <= 0:
        return []
    states = list_states(run_dir)
    protected = {int(k) for k in protect}
    doomed = [p for i, (kimg, p) in enumerate(states) if i >= keep and kimg not in protected]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def best_kimgs(run_dir) -> set:
    """The kimg of each best metric's snapshot (network-snapshot-<kimg>.safetensors), for prune_states."""
    out = set()
    for record in best_metrics(run_dir).values():
        m = SNAPSHOT_RE.match(str(record.get("snapshot") or ""))
        if m:
            out.add(int(m.group(1)))
    return out
