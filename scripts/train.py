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


# The run's description: <dataset>-<preset>.
def describe(cfg: dict) -> str:
    name = cfg["data"]["name"] or Path(str(cfg["data"]["path"]).rstrip("/")).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{cfg['model']['name']}")


# The run directory: `run_dir` if given; else the newest unfinished numbered run of the same description and
# config (rerunning a command resumes it); else the next number in `outdir` ("00000-<dataset>-<preset>").
def choose_run_dir(cfg: dict) -> Path:
    if cfg["run_dir"]:
        return Path(cfg["run_dir"])
    outdir = Path(cfg["outdir"])
    desc = describe(cfg)
    runs = sorted((int(m.group(1)), p) for p in outdir.glob("*") if (m := RUN_RE.match(p.name)) and p.is_dir())
    for _, p in reversed(runs):
        if p.name.endswith("-" + desc) and not (p / "DONE").exists() and (p / "config.json").exists():
            saved = json.loads((p / "config.json").read_text())
            if {k: v for k, v in saved.items() if k != "run_dir"} == {k: v for k, v in cfg.items() if k != "run_dir"}:
                return p
    next_id = runs[-1][0] + 1 if runs else 0
    return outdir / f"{next_id:05d}-{desc}"


# Entry point: resolve the config, pick the run directory on rank 0, write config.yaml, run the loop.
@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    dist.init(mixed_precision=cfg_dict["train"]["mixed_precision"])
    run_dir = dist.broadcast_object(str(choose_run_dir(cfg_dict)) if dist.is_main() else None)
    cfg_dict["run_dir"] = None if cfg.run_dir is None else cfg.run_dir
    if dist.is_main():
        os.makedirs(run_dir, exist_ok=True)
        (Path(run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        if not (Path(run_dir) / "config.json").exists():
            (Path(run_dir) / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    dist.barrier()
    from training.loop import training_loop
    training_loop(cfg_dict, run_dir)


if __name__ == "__main__":
    register_configs()
    sys.argv = [sys.argv[0]] + rewrite_data_shorthand(sys.argv[1:])
    main()
