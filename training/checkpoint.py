"""Snapshots (G, D, G_ema as safetensors + JSON) and full training state, written atomically, loaded without code."""
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

SNAPSHOT_RE = re.compile(r"network-snapshot-(\d{6})\.safetensors$")
STATE_RE = re.compile(r"training-state-(\d{6})\.pt$")


# Write `path` through a temporary file in the same folder, flushed and fsynced, then renamed over the target, so
# that a crash leaves either the old file or the complete new one.
def atomic_write(path, write_fn) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# A network's state dict as contiguous CPU tensors (safetensors refuses shared or strided storage).
def _cpu_state(module) -> dict:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


# Save G, D and G_ema (unwrapped modules) with their constructor arguments and the resolved config as metadata.
def save_snapshot(path, G, D, G_ema, config: Optional[dict] = None, extra: Optional[dict] = None) -> None:
    from safetensors.torch import save
    tensors = {}
    for name, net in (("G", G), ("D", D), ("G_ema", G_ema)):
        if net is not None:
            tensors.update({f"{name}.{k}": v for k, v in _cpu_state(net).items()})
    meta = {"format": "ganforge-snapshot", "version": "1", "config": json.dumps(config or {})}
    for name, net in (("G", G), ("D", D), ("G_ema", G_ema)):
        if net is not None:
            meta[f"{name}_kwargs"] = json.dumps(net.init_kwargs)
    for k, v in (extra or {}).items():
        meta[k] = json.dumps(v)
    atomic_write(path, lambda f: f.write(save(tensors, metadata=meta)))


# Build G, D, G_ema from a snapshot (ganforge .safetensors, or an official .pkl through the safe importer).
# Returns dict(G, D, G_ema, config, meta); networks absent from the file are None.
def load_snapshot(path, device="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"snapshot not found: {path}")
    if path.suffix == ".pkl":
        from training import official
        return official.build_networks(path, device=device)
    from safetensors import safe_open
    from networks.discriminator import Discriminator
    from networks.generator import Generator
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: not a readable ganforge snapshot (.safetensors): {e}") from e
    if meta.get("format") != "ganforge-snapshot":
        raise ValueError(f"{path}: metadata 'format' is {meta.get('format')!r}, expected 'ganforge-snapshot'")
    out = {"config": json.loads(meta.get("config", "{}")),
           "meta": {k: json.loads(v) for k, v in meta.items() if k not in ("format", "version", "config")}}
    for name, cls in (("G", Generator), ("D", Discriminator), ("G_ema", Generator)):
        if f"{name}_kwargs" not in meta:
            out[name] = None
            continue
        net = cls(**json.loads(meta[f"{name}_kwargs"]))
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: {name} does not match its recorded architecture "
                             f"(missing keys {missing[:5]}, unexpected keys {unexpected[:5]})")
        out[name] = net.eval().requires_grad_(False).to(device)
    return out


# The RNG states of this process (Python, NumPy, torch CPU and CUDA) as tensors and plain data.
def get_rng_state() -> dict:
    py_version, py_keys, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python_version": py_version, "python": torch.tensor(py_keys, dtype=torch.int64),
             "python_gauss": py_gauss, "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
             "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# Restore RNG states saved by `get_rng_state`.
def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(int(k) for k in state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Save the full training state (a dict of tensors and plain data) for `torch.load(weights_only=True)`.
def save_state(path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


# Load a training state without executing code: weights_only refuses any pickle that carries code.
def load_state(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot load training state safely ({type(e).__name__}: {e})") from e


# Checkpoint files in a run directory, newest first, as (kimg, path).
def list_states(run_dir) -> list:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := STATE_RE.match(p.name))]
    return sorted(found, reverse=True)
