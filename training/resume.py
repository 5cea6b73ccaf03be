"""Where a run starts from (its own newest state, resume=, or scratch; weights and their Freeze-D count), which config
changes a resume allows, and the run directory's own files (config.yaml/json, stats.jsonl) around a resume."""
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from training import dist
from training.config import ConfigError
from training.errors import ResumeError
from training.io import checkpoint as ckpt, weights
from training.io.files import atomic_write, load_strict
from training.io.records import stats_path

# Config keys that may change when a run resumes (lengths, intervals, logging, metrics, resources); a key ending
# in '.' stands for its whole group. Every other change is refused with a diff.
SAFE_KEYS = ("train.kimg", "train.tick_kimg", "train.snap", "train.image_snap", "train.cpu_threads", "train.keep",
             "train.max_nonfinite", "train.tf32", "data.num_workers", "log.", "metrics.", "health.")

# Keys that say where a run lives, not what it trains.
IGNORED_KEYS = ("run_dir", "resume", "outdir")
# The sha256 of the dataset's file list (dataset_files_sha256): compared by check_dataset, with its own message.
DATASET_KEY = "files_sha256"
# Keys that size the synthetic dataset only.
SYNTHETIC_KEYS = ("data.resolution", "data.num_images")


def flatten(cfg: dict, prefix: str = "") -> dict:
    """A nested config dict as {'group.key': value}."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_KEYS)


def config_changes(old: dict, new: dict):
    """Differences between the config a checkpoint was trained with and the current one (plain dicts), as
    'key: old → new' lines: (refused, allowed). Keys that only one side has (added or removed by a newer
    ganforge) are allowed."""
    a, b = ({k: absolute_data_path(v) if k == "data.path" else v for k, v in flatten(c).items()} for c in (old, new))
    refused, allowed = [], []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in IGNORED_KEYS or key == f"data.{DATASET_KEY}" or a.get(key, None) == b.get(key, None):
            continue
        if key in SYNTHETIC_KEYS and b.get("data.path") is not None:
            continue  # Not used by an image dataset (null in its config, or the synthetic defaults in some).
        if key not in a or key not in b:
            allowed.append(f"{key}: {a.get(key, '(absent)')!r} → {b.get(key, '(absent)')!r}")
            continue
        line = f"{key}: {a[key]!r} → {b[key]!r}"
        (allowed if _is_safe(key) else refused).append(line)
    return refused, allowed


def absolute_data_path(path):
    """data.path as an absolute path (~ expanded); the synthetic dataset's names and null as they are. A config that
    records it relative (as given) is read relative to the current folder."""
    if not isinstance(path, str) or path == "synthetic" or path.startswith("synthetic:"):
        return path
    return os.path.abspath(os.path.expanduser(path))


def dataset_files_sha256(dataset):
    """sha256 of an image dataset's file list (every image's relative name and size in bytes, in order), so that
    another dataset under the same path is noticed on resume; None for a dataset without files (synthetic)."""
    files = getattr(dataset, "file_list", None)
    if files is None:
        return None
    return hashlib.sha256("".join(f"{name}\0{size}\n" for name, size in files()).encode()).hexdigest()


def with_dataset_hash(config: dict, files_sha256) -> dict:
    """`config` (a config dict) with data.files_sha256 recorded (config.yaml, config.json and the training state)."""
    return dict(config, data=dict(config.get("data", {}), **{DATASET_KEY: files_sha256}))


def check_dataset(old: dict, new: dict, source) -> None:
    """Refuse to resume `source` on a dataset whose file list differs from the one it was trained on (both configs
    recording it)."""
    a, b = (c.get("data", {}).get(DATASET_KEY) for c in (old, new))
    if a and b and a != b:
        raise ResumeError(f"data.path={new['data'].get('path')}: not the dataset {source} was trained on: its file "
                          f"list (names and sizes) has sha256 {b[:12]}..., the run's has {a[:12]}...; put the run's "
                          f"dataset back at that path, or start a new run on this one (resume=none or another "
                          f"run_dir)")


def check_config(old: dict, new: dict, source) -> list:
    """Refuse to resume `source` under a config that changes what is trained; returns the allowed changes."""
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


def resolve_resume(resume, run_dir, log=print) -> dict:
    """Where to start (this rank decides alone): {'kind': 'fresh'}, {'kind': 'state', 'path', 'state'} (full
    resume) or {'kind': 'weights', 'path'} (G, D, G_ema only). The run directory's own newest intact checkpoint
    wins, so that rerunning the same command continues the run; `resume` (the resume= setting) is used when there
    is none. An http(s) URL is downloaded into the cache (weights.fetch) and then treated as that file; the plan
    then also holds its 'url'."""
    run_dir = Path(run_dir)
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
    extra = {"url": resume} if weights.is_url(resume) else {}
    path = Path(_fetch_resume(resume))
    expected = "a training-state-*.pt, a run directory, a network-snapshot .safetensors, an official .pkl, or none"
    if not path.exists():
        raise ResumeError(f"resume={resume}: no such file or directory (expected {expected})")
    if path.is_dir():
        found = ckpt.newest_intact_state(path, log)
        if found is None:
            raise ResumeError(f"resume={resume}: no training-state-*.pt in this directory (expected {expected})")
        return {"kind": "state", "path": str(found[0]), "state": found[1]}
    if path.suffix in (".safetensors", ".pkl"):
        return {"kind": "weights", "path": str(path), **extra}
    if path.suffix == ".pt":
        return {"kind": "state", "path": str(path), "state": ckpt.read_state_file(path), **extra}
    raise ResumeError(f"resume={resume}: unknown file type {path.suffix!r} (expected {expected})")


# resume= as a local path: a URL is fetched into the cache (a DownloadError becomes a ResumeError naming it).
def _fetch_resume(resume) -> str:
    try:
        return weights.fetch(str(resume), what="resume file")
    except weights.DownloadError as e:
        raise ResumeError(f"resume={resume}: {e}") from e


def resolve_resume_all(resume, run_dir, log=print) -> dict:
    """resolve_resume on rank 0, shared with every rank (an error on rank 0 is raised on every rank); every rank
    then loads the same file. A resume= URL is downloaded by rank 0; the other ranks of its machine find it in the
    cache, and a rank on another node without a shared file system downloads it into its own cache."""
    full = {}

    def decide():
        full.update(resolve_resume(resume, run_dir, log))
        return {k: v for k, v in full.items() if k != "state"}  # the decision, not the tensors
    shared = dist.rank0_decides(decide, ResumeError, ckpt.CheckpointError)
    if dist.is_main():
        return full
    plan = dict(shared)
    if plan.get("url") and not os.path.isfile(plan["path"]):  # another node, without rank 0's cache
        plan["path"] = _fetch_resume(plan["url"])
    if plan["kind"] == "state":
        plan["state"] = ckpt.read_state_file(plan["path"])
    return plan


def read_weights(plan: dict) -> dict:
    """`plan` (resolve_resume_all's) with the networks of a weights-only start read once: plan['snapshot'] is
    load_snapshot's dict (G, D, G_ema, config), used for its Freeze-D count and then loaded by load_weights."""
    if plan["kind"] != "weights":
        return plan
    try:
        return dict(plan, snapshot=ckpt.load_snapshot(plan["path"]))
    except (ValueError, FileNotFoundError) as e:
        raise ResumeError(f"resume={plan['path']}: {e}") from e


def source_freeze_d(snapshot: dict) -> Optional[int]:
    """The Freeze-D count a weights file (load_snapshot's dict) was trained with, or None when it records none: an
    official pickle's D block_kwargs.freeze_layers (NVIDIA's --freezed, imported as config['freeze_d']), a ganforge
    snapshot's train.freeze_d (its resolved config) or, in a snapshot converted from an official pickle
    (scripts/convert_official.py), the imported freeze_d."""
    config = snapshot.get("config") or {}
    value = config["train"].get("freeze_d") if isinstance(config.get("train"), dict) else config.get("freeze_d")
    return int(value) if value is not None else None


def resolve_freeze_d(requested: Optional[int], plan: dict) -> int:
    """The Freeze-D count of a run starting from `plan` (read_weights'): `requested` (train.freeze_d) when it is set,
    0 included; when it is null, the resumed run's own (its training state's resolved config), or the weights file's
    (source_freeze_d), else 0. The run records the result in its resolved config, so that a full resume of the run
    freezes the same layers."""
    value = requested
    if value is None and plan.get("kind") == "state":
        saved = plan["state"].get("config")
        value = (json.loads(saved) if isinstance(saved, str) else saved or {}).get("train", {}).get("freeze_d")
    elif value is None and plan.get("kind") == "weights":
        value = source_freeze_d(plan["snapshot"])
    value = 0 if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"train.freeze_d must be a non-negative integer (or null), got {value!r}")
    return value


def load_weights(plan: dict, G, D, G_ema, log=print) -> None:
    """Load G, D and G_ema from the snapshot read by read_weights (a .safetensors or official .pkl) for transfer
    learning: the networks must match the configured architecture; a network the file lacks is taken from its twin
    (G <-> G_ema) or kept fresh."""
    path, snap = plan["path"], plan["snapshot"]
    sources = {"G": snap.get("G") or snap.get("G_ema"), "D": snap.get("D"), "G_ema": snap.get("G_ema") or snap.get("G")}
    for name, net in (("G", G), ("D", D), ("G_ema", G_ema)):
        src = sources[name]
        if src is None:
            log(f"{path} holds no {name}: it starts from its random initialization")
            continue
        ours = net.state_dict()
        theirs = {k: v.to(ours[k].dtype) if k in ours else v for k, v in src.state_dict().items()}
        load_strict(net, theirs, f"resume={path}: its {name} does not match the configured model (model.*, data "
                                 f"resolution and labels)", ResumeError)


def truncate_stats(run_dir, cur_nimg: int) -> None:
    """Drop the lines of stats.jsonl that a killed run wrote after the checkpoint it resumes from (rank 0)."""
    path = stats_path(run_dir)
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
        atomic_write(path, lambda f: f.write("".join(x + "\n" for x in keep).encode()))


def write_config_files(run_dir, requested: dict) -> None:
    """Write config.yaml (this invocation's config) and config.json (the first invocation's, for run matching)."""
    run_dir = Path(run_dir)
    atomic_write(run_dir / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(requested).encode()))
    if not (run_dir / "config.json").exists():
        atomic_write(run_dir / "config.json", lambda f: f.write(json.dumps(requested, indent=2).encode()))
