"""Train a StyleGAN2: `accelerate launch scripts/train.py data=<folder|zip> model=<preset> [overrides]`."""
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from training import dist  # noqa: E402
from training.config import register_configs  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
RUN_RE = re.compile(r"^(\d{5})-(.+)$")


# `data=<path>` (anything that is not a preset in conf/data/) is shorthand for `data=images data.path=<path>`.
def rewrite_data_shorthand(argv: list) -> list:
    presets = {p.stem for p in (CONF_DIR / "data").glob("*.yaml")}
    out = []
    for arg in argv:
        if arg.startswith("data=") and arg[5:] not in presets:
            out += ["data=images", f"data.path={os.path.expanduser(arg[5:])}"]
        else:
            out.append(arg)
    return out


# The run's description: <dataset>-<preset>[-<schedule preset>].
def describe(cfg: dict) -> str:
    name = cfg["data"]["name"] or Path(str(cfg["data"]["path"]).rstrip("/")).stem
    sched = cfg.get("schedule") or {}
    suffix = f"-{sched.get('name', 'prog')}" if sched.get("enabled") else ""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{cfg['model']['name']}{suffix}")


# The run directory: `run_dir` if given; else the newest unfinished numbered run of the same description whose
# config differs at most in keys that are safe to change on resume (rerunning a command resumes it; never with
# resume=none), or an empty one left by a failed start; else the next number in `outdir`
# ("00000-<dataset>-<preset>").
def choose_run_dir(cfg: dict) -> Path:
    from training.state import config_changes
    if cfg["run_dir"]:
        return Path(cfg["run_dir"])
    outdir = Path(cfg["outdir"])
    desc = describe(cfg)
    runs = sorted((int(m.group(1)), p) for p in outdir.glob("*") if (m := RUN_RE.match(p.name)) and p.is_dir())
    for _, p in reversed(runs):
        if p.name.endswith("-" + desc) and not any(p.iterdir()):
            return p  # Left empty by a run that failed at start-up.
        if cfg.get("resume") == "none":
            continue
        if p.name.endswith("-" + desc) and not (p / "DONE").exists() and (p / "config.json").exists():
            try:
                saved = json.loads((p / "config.json").read_text())
            except ValueError:
                continue
            refused, _ = config_changes(saved, cfg)
            if not refused and saved.get("resume") == cfg.get("resume"):
                return p
    next_id = runs[-1][0] + 1 if runs else 0
    return outdir / f"{next_id:05d}-{desc}"


# Entry point: resolve the config, pick the run directory on rank 0, run the loop (which writes config.yaml once
# it knows the run can start). Errors that end a run cleanly (a refused resume, an unusable checkpoint, disk
# full, too many non-finite steps) print one message and exit with status 1; a stop signal exits with 0.
@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from training.io.checkpoint import CheckpointError, CheckpointWriteError
    from training.preempt import NonFiniteError
    from training.state import ResumeError
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    dist.init(mixed_precision=cfg_dict["train"]["mixed_precision"])
    run_dir = dist.broadcast_object(str(choose_run_dir(cfg_dict)) if dist.is_main() else None)
    cfg_dict["run_dir"] = None if cfg.run_dir is None else cfg.run_dir
    if dist.is_main():
        os.makedirs(run_dir, exist_ok=True)
    dist.barrier()
    from training.loop import training_loop
    try:
        training_loop(cfg_dict, run_dir)
    except (ResumeError, CheckpointError, CheckpointWriteError, NonFiniteError) as e:
        if dist.is_main():  # The same error on every rank: said once.
            print(f"Error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    register_configs()
    sys.argv = [sys.argv[0]] + rewrite_data_shorthand(sys.argv[1:])
    try:
        main()
    except SystemExit as e:  # Hydra reports an error in main and exits with 1
        dist.end_process(e.code)
    dist.end_process(0)
