"""NVIDIA's train.py options (stylegan2-ada-pytorch, stylegan3) and what each becomes in scripts/train.py."""
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

from training.config import parse_bool
from training.eval.metrics import parse_metric

# Hydra's own --cfg values, the model presets NVIDIA's --cfg names, and the augmentation pipes of --augpipe.
HYDRA_CFG_VALUES = ("job", "hydra", "all")  # any other --cfg value is NVIDIA's preset name
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


