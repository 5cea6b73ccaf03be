"""Train a StyleGAN2: `accelerate launch scripts/train.py data=<folder|zip> model=<preset> [overrides]`."""
import functools
import json
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nvidia_options import nvidia_message, split_nvidia_options  # scripts/ (this script's folder)
from training import dist
from training.config import CONF_DIR, Config, ConfigError, apply_auto, compose_config, config_dict, register_configs
from training.data.dataset import open_dataset
from training.errors import EXIT_BAD_INPUT, RunTimeFailure, UserError, report
from training.io import runlock
from training.loop import training_loop
from training.resume import absolute_data_path, config_changes

RUN_RE = re.compile(r"^(\d{5})-(.+)$")
AUTO_DEFAULTED = False  # Set by the command-line rewrite: model=auto was chosen for a user dataset.


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


def wants_auto_model(argv: list) -> bool:
    """True when `argv` (after `rewrite_data_shorthand`) trains on a user dataset and names no model preset: such a
    run gets `model=auto` (NVIDIA's default), while the embedded synthetic dataset keeps `tiny`."""
    if any(re.match(r"^[+~]{0,2}model(=|$)", a) for a in argv):
        return False
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("data.path=")]
    path = paths[-1] if paths else None
    return not (path is None or path in ("null", "None", "synthetic") or path.startswith("synthetic:"))


def auto_model_line(cfg: Config, world: int) -> str:
    """The start-up line that says why the preset is 'auto' and what NVIDIA's rules give for this dataset."""
    why = "Model preset: auto (no model= given for a user dataset: NVIDIA's 'auto' rules"
    try:
        resolution = open_dataset(cfg.data.path, max_size=1).resolution  # Decodes one image.
    except (OSError, ValueError):
        return f"{why}, from the dataset's resolution and the number of processes; model=<preset> picks another)"
    m, t = (c := apply_auto(cfg, resolution, world)).model, c.train
    line = (f"{why} for {resolution} px and {world} process{'es' if world > 1 else ''}: batch {t.batch_size}, "
            f"minibatch-std group {m.mbstd_group}, channel base {m.channel_base}, lr {t.glr:g}/{t.dlr:g}, "
            f"R1 gamma {t.r1_gamma:g}, EMA {t.ema_kimg:g} kimg (values given on the command line kept); "
            f"model=<preset> picks another)")
    return line + ("\n" + cpu_hint(resolution) if dist.device().type == "cpu" else "")


def cpu_hint(resolution: int) -> str:
    """The start-up warning for model=auto without a GPU: the paper-size networks take minutes per kimg on a CPU."""
    return (f"Warning: no GPU: model=auto trains paper-size networks ({resolution} px), which take minutes per kimg "
            f"on a CPU. model=tiny is the CPU preset (about 4 sec/kimg at 32 px on 2 cores, README \"Limits\"): add "
            f"model=tiny to try things out here")


def describe(cfg: Config) -> str:
    """The run's description in its directory name: <dataset>-<preset>[-<schedule preset>]."""
    name = cfg.data.name or Path(str(cfg.data.path).rstrip("/")).stem
    suffix = f"-{cfg.schedule.name}" if cfg.schedule.enabled else ""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{cfg.model.name}{suffix}")


def finished_kimg(run_dir: Path):
    """The kimg a finished run reached (its DONE file), or None when it is not finished."""
    try:
        return float(json.loads((run_dir / "DONE").read_text())["kimg"])
    except (OSError, ValueError, KeyError, TypeError):
        return None if not (run_dir / "DONE").exists() else 0.0


def finished_line(run_dir: Path, done_kimg: float, kimg: float) -> str:
    """The one line for a rerun of a finished run: where, how far, how to extend it."""
    more = 2 * done_kimg or 1
    return (f"{run_dir} is finished: trained to {done_kimg:g} kimg (train.kimg={kimg:g}); nothing to do. To extend "
            f"it, rerun this command with a larger train.kimg (e.g. train.kimg={more:g}); resume=none starts a new "
            f"run")


def live_run_error(run_dir: Path) -> RunTimeFailure:
    """The error for a start that would resume a run another process is training."""
    return RunTimeFailure(f"{run_dir} is being trained by {runlock.holder(run_dir)} (lock file "
                          f"{runlock.lock_path(run_dir)}): wait for it to finish or stop it, then rerun to continue "
                          f"it; or pass run_dir=<another dir> (with resume={run_dir} to start from its checkpoint)")


def _numbered_runs(outdir: Path) -> list:
    """The numbered run folders in `outdir`, as sorted (number, path)."""
    return sorted((int(m.group(1)), p) for p in outdir.glob("*") if (m := RUN_RE.match(p.name)) and p.is_dir())


def _resumable(p: Path, cfg: Config, same_resume: bool = True) -> bool:
    """Whether run `p` was started by the same command: its config.json differs from `cfg` at most in keys that are
    safe to change on resume, and (with `same_resume`) it has the same resume= setting; never with resume=none."""
    try:
        saved = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False
    refused, _ = config_changes(saved, config_dict(cfg))
    return not refused and cfg.resume != "none" and (not same_resume or saved.get("resume") == cfg.resume)


def choose_run_dir(cfg: Config):
    """The run directory and its lock (rank 0), as (path, RunLock or None, message or None); a message means there is
    nothing to train (a finished run), and no lock is taken.

    `run_dir` if given. Else the newest numbered run of the same description started by the same command (see
    `_resumable`): continued when unfinished or when train.kimg is now larger than the kimg it finished at, else the
    message (also for `run_dir` with a config that may resume it). Else the next free number in `outdir`
    ("00000-<dataset>-<preset>"): a number is free when no folder has it and no other process holds its lock
    (runlock.lock_path). A directory another process holds is a RunTimeFailure naming it (pid, host). The directory
    itself is created by the training loop, once every start-up check has passed."""
    def claim(p: Path):
        done = finished_kimg(p)  # (a changed config or resume=none goes on to the loop's refusal)
        if done is not None and round(cfg.train.kimg * 1000) <= round(done * 1000) and _resumable(p, cfg, False):
            return p, None, finished_line(p, done, cfg.train.kimg)
        lock = runlock.try_lock(p)
        if lock is None:
            raise live_run_error(p)
        return p, lock, None

    if cfg.run_dir:
        return claim(Path(cfg.run_dir))
    outdir = Path(cfg.outdir)
    desc = describe(cfg)
    runs = _numbered_runs(outdir)
    for _, p in reversed(runs):
        if p.name.endswith("-" + desc) and _resumable(p, cfg):
            return claim(p)
    n = runs[-1][0] + 1 if runs else 0
    while True:
        p = outdir / f"{n:05d}-{desc}"
        if not any(outdir.glob(f"{n:05d}-*")):
            lock = runlock.try_lock(p)
            if lock is not None and not any(outdir.glob(f"{n:05d}-*")):  # (not made while this one locked)
                return p, lock, None
            if lock is not None:
                lock.release()
        n += 1


def reported(fn):
    """Run `fn`; a UserError (bad input, exit 2) or RunTimeFailure (a refused resume, an unusable checkpoint, disk
    full, too many non-finite steps: exit 1) ends the process with one `error:` line from rank 0 and no traceback
    (GANFORGE_DEBUG=1 shows it)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            dist.end_process(report(e))
    return wrapper


@hydra.main(version_base=None, config_path="../conf", config_name="config")
@reported
def main(hydra_cfg: DictConfig) -> None:
    """Entry point: resolve the config, pick and lock the run directory on rank 0 (rank 0 holds the lock for the
    job), run the loop (which creates the directory and writes config.yaml once it knows the run can start). A
    finished run says so and exits with 0. Errors end the run with one line (see `reported`); a stop signal exits
    with 0."""
    cfg: Config = OmegaConf.to_object(hydra_cfg)
    cfg.data.path = absolute_data_path(cfg.data.path)  # recorded absolute: found from any folder later
    dist.init(mixed_precision=cfg.train.mixed_precision)
    if AUTO_DEFAULTED and dist.is_main():
        dist.print0(auto_model_line(cfg, dist.get_world_size()))
    held = []

    def decide():
        path, lock, message = choose_run_dir(cfg)
        held.append(lock)
        return str(path), message
    run_dir, finished = dist.rank0_decides(decide, UserError)
    if finished is not None:
        dist.print0(finished)
        return
    try:
        training_loop(cfg, run_dir)
    finally:
        for lock in held:
            if lock is not None:
                lock.release()


HELP = """\
Train a StyleGAN2 (StyleGAN2-ADA's training, ADA augmentation, optional progressive growing) on a folder or zip of
images, or on the embedded synthetic dataset when no data is given.

usage: python scripts/train.py [key=value ...]              (one process: CPU or one GPU)
       accelerate launch --multi_gpu --num_processes N scripts/train.py [key=value ...]

Every option is a Hydra override, key=value:
  data=<folder|zip>   shorthand for data=images data.path=<folder|zip> (convert images first with
                      scripts/dataset_tool.py); data=synthetic (the default) needs no download
  model=<preset>      auto (the default for a dataset of yours: NVIDIA's 'auto' rules from its resolution),
                      stylegan2, paper256, paper512, paper1024, cifar, tiny (small: the one for CPU runs)
  train=<preset>      default, quick, test; then train.kimg=<length>, train.batch_size=<total>, ...
  aug=ada|noaug|fixed, metrics=<preset>|none, schedule=none|prog32..prog1024, log.progress=true|false
  outdir=<dir>        where runs go (runs/<NNNNN>-<dataset>-<preset>); run_dir=<dir> names the folder yourself

Resume: rerunning the same command resumes the newest unfinished run of the same config from its newest training
state (only keys such as train.kimg, train.snap, log.*, metrics.* may change); resume=<run dir|training-state-*.pt>
resumes elsewhere, resume=<snapshot.safetensors|official .pkl> starts from weights only, resume=none starts afresh.

  --cfg job           print the composed config without training (then exit)
  --hydra-help        Hydra's own flags
  GANFORGE_DEBUG=1    show tracebacks behind `error:` lines

Every key with its default: docs/configuration.md (and conf/, training/config.py).
README.md and docs/ explain the rest: docs/datasets.md (your own images), docs/training.md, docs/long-runs.md
(outputs of a run, resume, preemption), docs/nvidia-flags.md (NVIDIA's --options and what they become here)."""


# The command line as Hydra gets it: data=<path> shorthand expanded, model=auto added when chosen for a user dataset,
# and every override before Hydra's own flags (Hydra's parser takes overrides only before a flag such as `--cfg job`).
def hydra_argv(argv: list) -> tuple:
    """(args for Hydra, whether model=auto was added)."""
    args = rewrite_data_shorthand(argv)
    auto = wants_auto_model(args)
    overrides = [a for a in args if "=" in a and not a.startswith("-")] + (["model=auto"] if auto else [])
    return overrides + [a for a in args if not ("=" in a and not a.startswith("-"))], auto


# Hydra reports a bad override (unknown key, wrong type, missing preset) in several lines: composing the config once
# here first turns it into one line with the key, the reason and, for a preset, the choices.
def check_overrides(args: list) -> None:
    """Raise ConfigError when `args` (overrides only; with Hydra's own flags Hydra decides) do not compose."""
    if any(a.startswith("-") for a in args):
        return
    try:
        compose_config(args)
    except (HydraException, OmegaConfBaseException) as e:
        text = str(e).split("Config search path:")[0]
        cause = str(e.__cause__).splitlines()[0] if e.__cause__ is not None else ""
        parts = []  # one per line of the message
        for line in (text + "\n" + cause).splitlines():
            line = line.strip().rstrip(".")
            if not line or line.startswith("See https://") or line in parts:
                continue
            if parts and f"\n\t{line}" in text:  # an item of Hydra's tab-indented list (e.g. a group's presets)
                parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
            else:
                parts.append(line)
        raise ConfigError("; ".join(parts) + " (every key with its default: conf/ and training/config.py; python "
                          "scripts/train.py --help)") from e



if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(HELP)
        sys.exit(0)
    items = split_nvidia_options(sys.argv[1:])
    if any(kind == "nvidia" for kind, *_ in items):  # NVIDIA's options: say what to type instead, start nothing.
        if os.environ.get("RANK", "0") == "0":
            print(nvidia_message(sys.argv[0], items), file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    register_configs()
    args, AUTO_DEFAULTED = hydra_argv(sys.argv[1:])
    try:
        check_overrides(args)
    except UserError as e:
        sys.exit(report(e))
    sys.argv = [sys.argv[0]] + args
    try:
        main()
    except SystemExit as e:  # Hydra reports an error in composing the config and exits with 1
        dist.end_process(e.code)
    dist.end_process(0)
