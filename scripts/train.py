"""Train a StyleGAN2: `accelerate launch scripts/train.py data=<folder|zip> model=<preset> [overrides]`."""
import functools
import json
import os
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from training import dist
from training.config import (CONF_DIR, Config, ConfigError, apply_auto, compose_config, config_dict, parse_bool,
                             register_configs)
from training.data.dataset import open_dataset
from training.errors import EXIT_BAD_INPUT, RunTimeFailure, UserError, report
from training.eval.metrics import parse_metric
from training.io import runlock
from training.loop import training_loop
from training.resume import absolute_data_path, config_changes

RUN_RE = re.compile(r"^(\d{5})-(.+)$")
HYDRA_CFG_VALUES = ("job", "hydra", "all")  # Hydra's own --cfg; any other --cfg value is NVIDIA's preset name.
MODEL_PRESETS = ("auto", "stylegan2", "paper256", "paper512", "paper1024", "cifar")
AUGPIPES = ("blit", "geom", "color", "filter", "noise", "cutout", "bg", "bgc", "bgcf", "bgcfn", "bgcfnc")
# NVIDIA's transfer-learning sources of `--resume=<name>` (stylegan2-ada-pytorch), on its download server.
_NVIDIA_NETS = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/transfer-learning-source-nets/"
NVIDIA_RESUME = {
    "ffhq256": _NVIDIA_NETS + "ffhq-res256-mirror-paper256-noaug.pkl",
    "ffhq512": _NVIDIA_NETS + "ffhq-res512-mirror-stylegan2-noaug.pkl",
    "ffhq1024": _NVIDIA_NETS + "ffhq-res1024-mirror-stylegan2-noaug.pkl",
    "celebahq256": _NVIDIA_NETS + "celebahq-res256-mirror-paper256-kimg100000-ada-target0.5.pkl",
    "lsundog256": _NVIDIA_NETS + "lsundog-res256-paper256-kimg100000-noaug.pkl",
}
AUTO_DEFAULTED = False  # Set by the command-line rewrite: model=auto was chosen for a user dataset.


@dataclass
class Translation:
    """What one NVIDIA option becomes: Hydra overrides, a launcher prefix, a remark, or why it is not supported."""
    overrides: list = field(default_factory=list)
    launcher: list | None = None
    note: str = ""
    unsupported: str = ""


# Whether the token after a BOOL option is its value (else the option stands alone and means true).
def _is_bool(text: str) -> bool:
    try:
        parse_bool(text)
        return True
    except ValueError:
        return False


def _number(cast, value: str):
    try:
        return cast(value)
    except ValueError:
        raise ValueError(f"expects {'an integer' if cast is int else 'a number'}, got {value!r}") from None


def _key(key: str, cast=str, path: bool = False) -> Callable[[str], Translation]:
    def translate(value):
        if cast is not str:
            _number(cast, value)  # Checked, and passed on as typed.
        return Translation([f"{key}={os.path.expanduser(value) if path else value}"])
    return translate


def _flag(key: str) -> Callable[[str], Translation]:
    return lambda value: Translation([f"{key}={'true' if parse_bool(value) else 'false'}"])


def _choice(key: str, choices) -> Callable[[str], Translation]:
    def translate(value):
        if value not in choices:
            raise ValueError(f"expects one of {', '.join(choices)}, got {value!r}")
        return Translation([f"{key}={value}"])
    return translate


def _unsupported(reason: str) -> Callable[[str], Translation]:
    return lambda value: Translation(unsupported=reason)


def _cfg(value):
    if value in MODEL_PRESETS:
        return Translation([f"model={value}"])
    if value in ("stylegan3-t", "stylegan3-r"):
        return Translation(unsupported="ganforge has StyleGAN2 networks only (no alias-free StyleGAN3 synthesis); "
                                       "model=stylegan2 or model=auto train a StyleGAN2")
    raise ValueError(f"expects a preset ({', '.join(MODEL_PRESETS)}), got {value!r}")


def _gpus(value):
    n = _number(int, value)
    if n < 1:
        raise ValueError(f"expects at least 1, got {n}")
    if n == 1:
        return Translation(note="one process: run the script itself, no launcher")
    return Translation(launcher=["accelerate", "launch", "--multi_gpu", "--num_processes", str(n)],
                       note="the launcher starts one process per GPU")


def _metrics(value):
    names = [n for n in value.split(",") if n and n.lower() != "none"]
    known, unknown = [], []
    for name in names:
        try:
            parse_metric(name)
            known.append(name)
        except ValueError:
            unknown.append(name)
    note = (f"{', '.join(unknown)}: not supported, because ganforge computes FID, KID and SWD only "
            f"((fid|kid|swd)<N>[k][_full])" if unknown else "")
    return Translation([f"metrics.names=[{','.join(known)}]"] if known else ["metrics=none"], note=note)


def _resume(value):
    if value == "noresume":
        return Translation(["resume=none"])
    url = NVIDIA_RESUME.get(value)
    if url is not None:
        return Translation([f"resume={url}"], note=f"NVIDIA's {value} transfer-learning source")
    return Translation([f"resume={os.path.expanduser(value)}"])


def _snap(value):
    n = _number(int, value)
    return Translation([f"train.snap={n}", f"train.image_snap={n}"])


def _fp32(value):
    if not parse_bool(value):
        return Translation(note="the default: nothing to change")
    return Translation(["model.num_fp16_res=0", "model.conv_clamp=null"])


def _nhwc(value):
    parse_bool(value)
    return Translation(note="nothing to change: ganforge's float16 layers are always channels-last (NHWC)")


def _nobench(value):
    if not parse_bool(value):
        return Translation(note="the default: nothing to change")
    return Translation(["train.deterministic=true"], note="the closest: ganforge turns cuDNN benchmarking off "
                                                          "together with deterministic algorithms (slower)")


@dataclass(frozen=True)
class NvidiaOption:
    """One option of NVIDIA's train.py: its spellings, repositories, argument, ganforge equivalent (for the
    docs/nvidia-flags.md) and translation (for the message)."""
    names: tuple
    repos: str                              # "2-ADA", "3" or "2-ADA, 3"
    arg: str                                # metavar; "BOOL" takes an optional boolean, "" no value
    ganforge: str                           # the equivalent, as docs/nvidia-flags.md says it
    translate: Callable[[str], Translation]


# The one table of NVIDIA's train.py options (stylegan2-ada-pytorch and stylegan3): the message of
# `nvidia_message` and the table in docs/nvidia-flags.md (`nvidia_markdown`) both come from it.
NVIDIA_OPTIONS = [
    NvidiaOption(("--outdir",), "2-ADA, 3", "DIR", "`outdir=DIR` (runs go to `DIR/<NNNNN>-<dataset>-<preset>`)",
                 _key("outdir", path=True)),
    NvidiaOption(("--cfg",), "2-ADA, 3", "PRESET",
                 "`model=PRESET` (auto, stylegan2, paper256, paper512, paper1024, cifar); `stylegan3-t`/`stylegan3-r`:"
                 " not supported, because ganforge has StyleGAN2 networks only. Hydra's own `--cfg job|hydra|all` "
                 "still prints the config", _cfg),
    NvidiaOption(("--data",), "2-ADA, 3", "PATH", "`data=PATH` (a folder or zip)", _key("data", path=True)),
    NvidiaOption(("--gpus",), "2-ADA, 3", "INT", "`accelerate launch --multi_gpu --num_processes INT scripts/train.py "
                 "...` (one process per GPU; see \"Several GPUs, several nodes\")", _gpus),
    NvidiaOption(("--batch",), "2-ADA, 3", "INT", "`train.batch_size=INT` (total over all processes)",
                 _key("train.batch_size", int)),
    NvidiaOption(("--batch-gpu",), "3", "INT", "`train.batch_gpu=INT`", _key("train.batch_gpu", int)),
    NvidiaOption(("--gamma",), "2-ADA, 3", "FLOAT", "`train.r1_gamma=FLOAT`", _key("train.r1_gamma", float)),
    NvidiaOption(("--kimg",), "2-ADA, 3", "INT", "`train.kimg=INT`", _key("train.kimg", float)),
    NvidiaOption(("--tick",), "3", "KIMG", "`train.tick_kimg=KIMG`", _key("train.tick_kimg", float)),
    NvidiaOption(("--snap",), "2-ADA, 3", "TICKS", "`train.snap=TICKS train.image_snap=TICKS`", _snap),
    NvidiaOption(("--seed",), "2-ADA, 3", "INT", "`train.seed=INT`", _key("train.seed", int)),
    NvidiaOption(("--metrics",), "2-ADA, 3", "A,B|none",
                 "`metrics.names=[A,B]`; `none`: `metrics=none`. FID, KID and SWD only (`fid50k_full`, "
                 "`kid50k_full`, `swd16k`, `fid10k`, ...): `pr50k3*`, `is50k`, `ppl*` and StyleGAN3's `eqt*`/`eqr*` "
                 "are not supported, because ganforge implements FID, KID and SWD only", _metrics),
    NvidiaOption(("--cond",), "2-ADA, 3", "BOOL", "`data.use_labels=true`", _flag("data.use_labels")),
    NvidiaOption(("--subset",), "2-ADA", "INT", "`data.max_size=INT`", _key("data.max_size", int)),
    NvidiaOption(("--mirror",), "2-ADA, 3", "BOOL", "`data.xflip=true`", _flag("data.xflip")),
    NvidiaOption(("--aug",), "2-ADA, 3", "MODE", "`aug=ada|noaug|fixed`", _choice("aug", ("ada", "noaug", "fixed"))),
    NvidiaOption(("--p",), "2-ADA, 3", "FLOAT", "`aug.p=FLOAT` (`aug=fixed` defaults to 0.2, as StyleGAN3's --p)",
                 _key("aug.p", float)),
    NvidiaOption(("--target",), "2-ADA, 3", "FLOAT", "`aug.ada_target=FLOAT`", _key("aug.ada_target", float)),
    NvidiaOption(("--augpipe",), "2-ADA", "PIPE", "`aug.preset=PIPE` (the same names: blit ... bgcfnc)",
                 _choice("aug.preset", AUGPIPES)),
    NvidiaOption(("--resume",), "2-ADA, 3", "PKL",
                 "`resume=PATH|URL` (an official `.pkl` or a ganforge snapshot: weights only; a training state or "
                 "run directory: everything); `ffhq256`, `ffhq512`, `ffhq1024`, `celebahq256`, `lsundog256`: "
                 "`resume=<NVIDIA's URL for it>`; `noresume`: `resume=none`", _resume),
    NvidiaOption(("--freezed",), "2-ADA, 3", "INT", "`train.freeze_d=INT`", _key("train.freeze_d", int)),
    NvidiaOption(("--cbase",), "3", "INT", "`model.channel_base=INT`", _key("model.channel_base", int)),
    NvidiaOption(("--cmax",), "3", "INT", "`model.channel_max=INT`", _key("model.channel_max", int)),
    NvidiaOption(("--glr",), "3", "FLOAT", "`train.glr=FLOAT`", _key("train.glr", float)),
    NvidiaOption(("--dlr",), "3", "FLOAT", "`train.dlr=FLOAT`", _key("train.dlr", float)),
    NvidiaOption(("--map-depth",), "3", "INT", "`model.map_layers=INT`", _key("model.map_layers", int)),
    NvidiaOption(("--mbstd-group",), "3", "INT", "`model.mbstd_group=INT`", _key("model.mbstd_group", int)),
    NvidiaOption(("--desc",), "3", "STR",
                 "not supported, because run folders are named `<NNNNN>-<dataset>-<preset>`; `run_dir=DIR` names the "
                 "folder yourself", _unsupported("run folders are named <NNNNN>-<dataset>-<preset>; run_dir=<dir> "
                                                 "names the folder yourself")),
    NvidiaOption(("--fp32",), "2-ADA, 3", "BOOL", "`model.num_fp16_res=0 model.conv_clamp=null`", _fp32),
    NvidiaOption(("--nhwc",), "2-ADA", "BOOL", "nothing: float16 layers are always channels-last", _nhwc),
    NvidiaOption(("--nobench",), "2-ADA, 3", "BOOL",
                 "`train.deterministic=true`, the closest (it turns cuDNN benchmarking off together with "
                 "deterministic algorithms)", _nobench),
    NvidiaOption(("--allow-tf32",), "2-ADA", "BOOL", "`train.tf32=true`", _flag("train.tf32")),
    NvidiaOption(("--workers",), "2-ADA, 3", "INT", "`data.num_workers=INT`", _key("data.num_workers", int)),
    NvidiaOption(("-n", "--dry-run"), "2-ADA, 3", "",
                 "not supported, because there is no dry-run mode; Hydra's `--cfg job` prints the composed config "
                 "without training ('auto' settings are derived at start-up)",
                 _unsupported("there is no dry-run mode; Hydra's --cfg job prints the composed config without "
                              "training ('auto' settings are derived at start-up)")),
]
_BY_NAME = {name: opt for opt in NVIDIA_OPTIONS for name in opt.names}


def split_nvidia_options(argv: list) -> list:
    """Split `argv` into items: ("nvidia", option, value or None) for NVIDIA's train.py options (`--flag=value` or
    `--flag value`) and ("arg", token) for everything else (Hydra overrides and Hydra's flags, including
    `--cfg job|hydra|all`)."""
    items, i = [], 0
    while i < len(argv):
        token = argv[i]
        name, eq, inline = token.partition("=")
        opt = _BY_NAME.get(name) if token.startswith("-") else None
        if opt is None:
            items.append(("arg", token))
            i += 1
            continue
        value, used = (inline if eq else None), 1
        if not eq and opt.arg == "BOOL":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            value, used = (nxt, 2) if nxt is not None and _is_bool(nxt) else ("1", 1)
        elif not eq and opt.arg:
            value, used = (argv[i + 1], 2) if i + 1 < len(argv) else (None, 1)
        if name == "--cfg" and value in HYDRA_CFG_VALUES + (None,):
            items += [("arg", t) for t in argv[i:i + used]]  # Hydra's --cfg job|hydra|all.
        else:
            items.append(("nvidia", opt, value))
        i += used
    return items


def nvidia_message(script: str, items: list) -> str:
    """The message for a command line with NVIDIA options: each option's overrides (or why it is not supported) and
    the whole command to run instead."""
    rows, command, launcher = [], [], None
    for kind, *x in items:
        if kind == "arg":
            command.append(x[0])
            continue
        opt, value = x
        shown = opt.names[-1] + ("" if not opt.arg else f"={value}" if value is not None else "")
        if opt.arg and value is None:
            rows.append((shown, f"invalid: {opt.names[-1]} needs a value ({opt.arg})"))
            continue
        try:
            t = opt.translate(value)
        except ValueError as e:
            rows.append((shown, f"invalid: {opt.names[-1]} {e}"))
            continue
        if t.unsupported:
            rows.append((shown, f"not supported, because {t.unsupported}"))
            continue
        launcher = t.launcher or launcher
        command += t.overrides
        text = " ".join(shlex.quote(o) for o in t.overrides)
        if t.launcher:
            text = " ".join(t.launcher) + " " + script + " ..."
        notes = [t.note] if t.note else []
        rows.append((shown, text + (f" ({'; '.join(notes)})" if notes else "") if text else "; ".join(notes)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{script} takes Hydra overrides (key=value), not the options of NVIDIA's train.py:"]
    lines += [f"  {flag.ljust(width)}  ->  {text}" for flag, text in rows]
    invalid = any(text.startswith("invalid: ") for _, text in rows)
    lines += [f"Run instead{' (with the invalid options above corrected)' if invalid else ''}:",
              "  " + " ".join([*(launcher or ["python"]), script, *(shlex.quote(c) for c in command)])]
    lines.append("Nothing was started or written. Every NVIDIA option and its ganforge equivalent: "
                 "docs/nvidia-flags.md.")
    return "\n".join(lines)


def nvidia_markdown() -> str:
    """The table of NVIDIA's train.py options in docs/nvidia-flags.md (from NVIDIA_OPTIONS)."""
    lines = ["| NVIDIA `train.py` | in | ganforge `scripts/train.py` |", "| --- | --- | --- |"]
    for opt in NVIDIA_OPTIONS:
        spelled = ", ".join(f"`{n}`" for n in opt.names[:-1]) + (", " if len(opt.names) > 1 else "") + \
            f"`{opt.names[-1]}{'=' + opt.arg if opt.arg else ''}`"
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in (spelled, opt.repos, opt.ganforge)) + " |")
    return "\n".join(lines)


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
