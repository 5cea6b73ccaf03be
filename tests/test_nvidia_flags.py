"""NVIDIA's train.py options answered with ganforge overrides, and the 'auto' model for user datasets."""
import argparse
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from helpers import script_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts/train.py")
# Every option of NVIDIA's train.py: stylegan2-ada-pytorch, then what stylegan3 adds.
SG2_ADA = ["--outdir", "--gpus", "--snap", "--metrics", "--seed", "-n", "--dry-run", "--data", "--cond", "--subset",
           "--mirror", "--cfg", "--gamma", "--kimg", "--batch", "--aug", "--p", "--target", "--augpipe", "--resume",
           "--freezed", "--fp32", "--nhwc", "--nobench", "--allow-tf32", "--workers"]
SG3 = ["--batch-gpu", "--cbase", "--cmax", "--glr", "--dlr", "--map-depth", "--mbstd-group", "--desc", "--tick"]
FAST = ["train.kimg=0", "metrics=none", "log.progress=false", "train.cpu_threads=1", "aug=noaug", "train.ops_impl=ref",
        "train.image_snap=0"]


def run(args, cwd, timeout=120):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=script_env(cwd), capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def train():
    """The functions of scripts/train.py (its __main__ block does not run) and of scripts/nvidia_options.py, which
    holds NVIDIA's option table and the translation (train.py imports it from its own folder)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    return {**runpy.run_path(str(ROOT / "scripts/nvidia_options.py")), **runpy.run_path(SCRIPT)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A user dataset: 16 random 16x16 PNGs."""
    root = tmp_path_factory.mktemp("data") / "pngs"
    root.mkdir()
    rng = np.random.RandomState(0)
    for i in range(16):
        PIL.Image.fromarray(rng.randint(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def test_example_command_is_answered_and_nothing_is_written(tmp_path):
    proc = run(["--data=x.zip", "--cfg=paper256", "--gpus=8", "--mirror=1"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"{SCRIPT} takes Hydra overrides (key=value), not the options of NVIDIA's train.py:",
        "  --data=x.zip    ->  data=x.zip",
        "  --cfg=paper256  ->  model=paper256",
        (f"  --gpus=8        ->  accelerate launch --multi_gpu --num_processes 8 {SCRIPT} ... (the launcher starts one "
         "process per GPU)"),
        "  --mirror=1      ->  data.xflip=true",
        "Run instead:",
        f"  accelerate launch --multi_gpu --num_processes 8 {SCRIPT} data=x.zip model=paper256 data.xflip=true",
        "Nothing was started or written. Every NVIDIA option and its ganforge equivalent: docs/nvidia-flags.md.",
    ]
    assert list(tmp_path.iterdir()) == []


def test_flag_value_spelling_gives_the_same_answer(train):
    def message(argv):
        return train["nvidia_message"]("train.py", train["split_nvidia_options"](argv))
    assert message(["--data", "x.zip", "--cfg", "paper256", "--gpus", "8", "--mirror", "1"]) == \
        message(["--data=x.zip", "--cfg=paper256", "--gpus=8", "--mirror=1"])
    # A boolean option without a value means true; the next token stays an argument of its own.
    assert message(["--mirror", "--kimg", "100", "train.seed=3"]) == \
        message(["--mirror=1", "--kimg=100", "train.seed=3"])
    assert "  python train.py data.xflip=true train.kimg=100 train.seed=3" in \
        message(["--mirror", "--kimg", "100", "train.seed=3"]).splitlines()


def test_each_option_translates(train):
    def lines(argv):
        return train["nvidia_message"]("train.py", train["split_nvidia_options"](argv)).splitlines()
    out = lines(["--data=~/d.zip", "--outdir", "out", "--gamma=10", "--kimg=500", "--snap=10", "--seed=3",
                 "--metrics=fid50k_full,kid50k_full", "--cond=1", "--subset=100", "--aug=fixed", "--p=0.3",
                 "--augpipe=bgcf", "--freezed=4", "--fp32=1", "--allow-tf32=1", "--workers=2", "--batch-gpu=8",
                 "--cbase=16384", "--cmax=256", "--map-depth=2", "--tick=8", "--dlr=0.002", "--cfg=paper512",
                 "--resume=lsundog256"])
    command = out[-2]
    for override in [f"data={os.path.expanduser('~/d.zip')}", "outdir=out", "train.r1_gamma=10", "train.kimg=500",
                     "train.snap=10 train.image_snap=10", "train.seed=3", "'metrics.names=[fid50k_full,kid50k_full]'",
                     "data.use_labels=true", "data.max_size=100", "aug=fixed", "aug.p=0.3", "aug.preset=bgcf",
                     "train.freeze_d=4", "model.num_fp16_res=0 model.conv_clamp=null", "train.tf32=true",
                     "data.num_workers=2", "train.batch_gpu=8", "model.channel_base=16384", "model.channel_max=256",
                     "model.map_layers=2", "train.tick_kimg=8", "train.dlr=0.002", "model=paper512",
                     ("resume=https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/transfer-learning-"
                      "source-nets/lsundog-res256-paper256-kimg100000-noaug.pkl")]:
        assert f" {override}" in command, override
    assert "  --metrics=none  ->  metrics=none" in lines(["--metrics=none"])
    # Under 'auto' (NVIDIA's default preset, and ganforge's for a user dataset) --gamma is kept, as in NVIDIA's.
    assert lines(["--data=x.zip", "--gamma=10"])[2] == "  --gamma=10    ->  train.r1_gamma=10"


def test_unsupported_and_invalid_options_say_why(tmp_path):
    proc = run(["--desc=try", "-n", "--cfg=stylegan3-t", "--metrics=pr50k3_full", "--aug=bad", "train.kimg=1"],
               tmp_path)
    assert proc.returncode == 2 and list(tmp_path.iterdir()) == []
    lines = proc.stderr.splitlines()
    assert lines[1].startswith("  --desc=try") and "->  not supported, because run folders are named" in lines[1]
    assert lines[2].startswith("  --dry-run") and "->  not supported, because there is no dry-run mode" in lines[2]
    assert "->  not supported, because ganforge has StyleGAN2 networks only" in lines[3]
    assert lines[4].endswith("->  metrics=none (pr50k3_full: not supported, because ganforge computes FID, KID and "
                             "SWD only ((fid|kid|swd)<N>[k][_full]))")
    assert "->  invalid: --aug expects one of ada, noaug, fixed, got 'bad'" in lines[5]
    assert lines[6] == "Run instead (with the invalid options above corrected):"
    assert lines[7] == f"  python {SCRIPT} metrics=none train.kimg=1"


def test_hydra_cfg_job_still_prints_the_config(tmp_path, folder):
    proc = run(["--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "model:\n  name: tiny\n" in proc.stdout and "data:\n  name: synthetic\n" in proc.stdout
    proc = run(["--cfg=job", f"data={folder}"], tmp_path)  # A user dataset: the preset becomes auto.
    assert proc.returncode == 0, proc.stderr
    assert "model:\n  name: auto\n" in proc.stdout and "  auto: true\n" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_user_dataset_without_model_trains_auto_and_says_why(tmp_path, folder):
    proc = run([f"data={folder}", "model.channel_max=32", "train.r1_gamma=3"] + FAST, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("Model preset: auto (no model= given for a user dataset: NVIDIA's 'auto' rules for 16 px and 1 process: "
            "batch 32, minibatch-std group 4, channel base 16384, lr 0.0025/0.0025, R1 gamma 3, EMA 10 kimg (values "
            "given on the command line kept); model=<preset> picks another)") in proc.stdout.splitlines()
    assert ("Warning: no GPU: model=auto trains paper-size networks (16 px), which take minutes per kimg on a CPU. "
            "model=tiny is the CPU preset (about 4 sec/kimg at 32 px on 2 cores, README \"Limits\"): add model=tiny "
            "to try things out here") in proc.stdout.splitlines()
    config = (tmp_path / "runs/00000-pngs-auto/config.yaml").read_text()
    assert "model:\n  name: auto\n" in config and "  auto: true\n" in config
    # As NVIDIA's --cfg=auto --gamma=3: the value given is kept, the other derived keys follow the resolution.
    assert "  r1_gamma: 3.0\n" in config and "  batch_size: null\n" in config


def test_explicit_model_and_the_synthetic_dataset_keep_their_preset(tmp_path, folder, train):
    proc = run([f"data={folder}", "model=tiny", "train.r1_gamma=0.5"] + FAST, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Model preset" not in proc.stdout
    config = (tmp_path / "runs/00000-pngs-tiny/config.yaml").read_text()
    assert "model:\n  name: tiny\n" in config and "  auto: false\n" in config
    wants = train["wants_auto_model"]
    shorthand = train["rewrite_data_shorthand"]
    assert wants(shorthand(["data=/d.zip"])) and wants(["data=images", "data.path=/d"])
    for argv in (["data=/d.zip", "model=paper256"], ["data=/d.zip", "+model=tiny"], [], ["data=synthetic"],
                 ["data=synthetic:64"], ["train.kimg=1"]):
        assert not wants(shorthand(argv)), argv


# The table of NVIDIA's train.py options in docs/nvidia-flags.md is the one that NVIDIA_OPTIONS generates.
def test_docs_table_comes_from_the_one_table(train):
    names = [n for opt in train["NVIDIA_OPTIONS"] for n in opt.names]
    assert sorted(names) == sorted(SG2_ADA + SG3) and len(set(names)) == len(names)
    table = train["nvidia_markdown"]()
    assert len(table.splitlines()) == 2 + len(train["NVIDIA_OPTIONS"])
    assert all(line.count(" | ") == 2 for line in table.splitlines()[2:])  # Pipes inside cells are escaped.
    assert table in (ROOT / "docs/nvidia-flags.md").read_text()


# One boolean parser for every script: each spelling of click's BOOL and of the true/false words (any case, spaces
# around) is accepted; anything else is refused with a message naming the value and the spellings, by argparse (not
# its generic "invalid value") and in the NVIDIA option message alike.
def test_boolean_spellings_and_refusal(train, capsys):
    from training.config import parse_bool
    for word in ("1", "true", "True", "t", "YES", "y", "on", " On "):
        assert parse_bool(word) is True, word
    for word in ("0", "false", "FALSE", "f", "no", "N", "off"):
        assert parse_bool(word) is False, word
    expected = "expects a boolean (1/0, true/false, yes/no, on/off), got 'maybe'"
    with pytest.raises(ValueError) as e:
        parse_bool("maybe")
    assert str(e.value) == expected
    parser = argparse.ArgumentParser(prog="calc_metrics.py")
    parser.add_argument("--mirror", type=parse_bool)
    assert parser.parse_args(["--mirror", "y"]).mirror is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--mirror", "maybe"])
    assert capsys.readouterr().err.splitlines()[-1] == f"calc_metrics.py: error: argument --mirror: {expected}"
    lines = train["nvidia_message"]("train.py", train["split_nvidia_options"](["--mirror=maybe", "--cond", "n"]))
    assert f"  --mirror=maybe  ->  invalid: --mirror {expected}" in lines.splitlines()
    assert "  --cond=n        ->  data.use_labels=false" in lines.splitlines()


# apply_auto fills only the derived keys left null (conf/model/auto.yaml), keeps values given, returns a new config;
# a null derived key without model.auto is an error naming it.
def test_apply_auto_keeps_given_values():
    from training.config import Config, ModelConfig, TrainConfig, apply_auto, auto_settings
    cfg = Config(model=ModelConfig(auto=True, channel_base=None, mbstd_group=None),
                 train=TrainConfig(batch_size=None, glr=None, dlr=None, r1_gamma=3.0, ema_kimg=None))
    out = apply_auto(cfg, 256, 2)
    s = auto_settings(256, 2)
    assert (out.train.batch_size, out.train.glr, out.train.dlr, out.train.ema_kimg) == \
        (s["batch_size"], s["lr"], s["lr"], s["ema_kimg"])
    assert out.train.r1_gamma == 3.0 and out.model.channel_base == s["channel_base"]
    assert cfg.train.batch_size is None  # the given config is unchanged
    with pytest.raises(ValueError, match=r"train.glr is null, which only model.auto fills in"):
        apply_auto(Config(train=TrainConfig(glr=None)), 256, 1)
