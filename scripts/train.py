"""Train a StyleGAN2: `accelerate launch scripts/train.py data=<folder|zip> model=<preset> [overrides]`."""
import json
import os
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from training import dist
from training.config import CONF_DIR, Config, config_dict, register_configs
from training.io.checkpoint import CheckpointError, CheckpointWriteError
from training.loop import training_loop
from training.preempt import NonFiniteError
from training.resume import config_changes
from training.state import ResumeError

RUN_RE = re.compile(r"^(\d{5})-(.+)$")


def rewrite_data_shorthand(argv: list) -> list:
    """`data=<path>` (anything that is not a preset in conf/data/) is shorthand for `data=images data.path=<path>`."""
    presets = {p.stem for p in (CONF_DIR / "data").glob("*.yaml")}
    out = []
    for arg in argv:
        if arg.startswith("data=") and arg[5:] not in presets:
            out += ["data=images", f"data.path={os.path.expanduser(arg[5:])}"]
        else:
            out.append(arg)
    return out


def describe(cfg: Config) -> str:
    """The run's description in its directory name: <dataset>-<preset>[-<schedule preset>]."""
    name = cfg.data.name or Path(str(cfg.data.path).rstrip("/")).stem
    suffix = f"-{cfg.schedule.name}" if cfg.schedule.enabled else ""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{cfg.model.name}{suffix}")


def choose_run_dir(cfg: Config) -> Path:
    """The run directory: `run_dir` if given; else the newest unfinished numbered run of the same description whose
    config differs at most in keys that are safe to change on resume (rerunning a command resumes it; never with
    resume=none), or an empty one left by a failed start; else the next number in `outdir`
    ("00000-<dataset>-<preset>")."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    outdir = Path(cfg.outdir)
    desc = describe(cfg)
    runs = sorted((int(m.group(1)), p) for p in outdir.glob("*") if (m := RUN_RE.match(p.name)) and p.is_dir())
    for _, p in reversed(runs):
        if p.name.endswith("-" + desc) and not any(p.iterdir()):
            return p  # Left empty by a run that failed at start-up.
        if cfg.resume == "none":
            continue
        if p.name.endswith("-" + desc) and not (p / "DONE").exists() and (p / "config.json").exists():
            try:
                saved = json.loads((p / "config.json").read_text())
            except ValueError:
                continue
            refused, _ = config_changes(saved, config_dict(cfg))
            if not refused and saved.get("resume") == cfg.resume:
                return p
    next_id = runs[-1][0] + 1 if runs else 0
    return outdir / f"{next_id:05d}-{desc}"


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(hydra_cfg: DictConfig) -> None:
    """Entry point: resolve the config, pick the run directory on rank 0, run the loop (which writes config.yaml once
    it knows the run can start). Errors that end a run cleanly (a refused resume, an unusable checkpoint, disk full,
    too many non-finite steps) print one message and exit with status 1; a stop signal exits with 0."""
    cfg: Config = OmegaConf.to_object(hydra_cfg)
    dist.init(mixed_precision=cfg.train.mixed_precision)
    run_dir = dist.rank0_decides(lambda: str(choose_run_dir(cfg)))
    if dist.is_main():
        os.makedirs(run_dir, exist_ok=True)
    dist.barrier()
    try:
        training_loop(cfg, run_dir)
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
