"""Bad input, as a user meets it: one `error:` line naming the thing, exit 2 (or 1), no traceback, nothing written."""
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from helpers import PY, ROOT, script_env
from tests import official_builder as ob
from training.config import ModelConfig, compose_config
from training.errors import EXIT_BAD_INPUT, UserError, run_cli
from training.loop import training_loop

sys.path.insert(0, str(ROOT / "scripts"))
import dataset_tool  # noqa: E402
TINY = ["model=tiny", "train=test", "model.channel_base=256", "model.channel_max=32", "metrics=none",
        "train.ops_impl=ref", "aug=noaug", "train.cpu_threads=1"]


def png(path, size=(16, 16), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)).save(path)


# Every kind of broken input the scripts must refuse (empty, mixed-size, truncated and fake images, a bad dataset.json,
# a pickle carrying code, ...), made once in a folder of its own: name -> path.
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    for i in range(4):
        png(d / "good" / f"{i}.png", seed=i)
    (d / "empty").mkdir()
    png(d / "mixed/a.png")
    png(d / "mixed/b.png", size=(32, 32))
    png(d / "trunc/a.png")
    (d / "trunc/b.png").write_bytes((d / "trunc/a.png").read_bytes()[:60])
    (d / "fake").mkdir()
    (d / "fake/a.png").write_text("not an image")
    png(d / "big/a.png", size=(24, 16))  # not square: "oversized" for the power-of-two rule
    png(d / "badjson/a.png")
    (d / "badjson/dataset.json").write_text("{labels: oops")
    (d / "notes.txt").write_text("hello")
    (d / "evil.pkl").write_bytes(pickle.dumps(ob.GlobalRefCall(os.system, ("true",))))  # code: refused
    m = ModelConfig(z_dim=16, w_dim=16, map_layers=1, channel_base=64, channel_max=16, mbstd_group=2)
    from networks.factory import build_networks
    from training.io.checkpoint import save_snapshot
    torch.manual_seed(0)
    G, D, G_ema = build_networks(m, 16, 3, 2)
    save_snapshot(d / "network-snapshot-000000.safetensors", G, D, G_ema, {"data": {"path": str(d / "labeled")}})
    torch.save({"counters": torch.zeros(3)}, d / "training-state-000000.pt")
    for c, cls in enumerate(("cat", "dog")):
        png(d / "classes" / cls / "0.png", seed=c)
    dataset_tool.main(["--source", str(d / "classes"), "--dest", str(d / "labeled"), "--labels", "from-folders"])
    return d


def launch(argv, cwd):
    """Start a script as a user would (its own process, cwd `cwd`, no tracebacks asked for)."""
    env = script_env(cwd, PYTHONPATH=str(ROOT))
    env.pop("GANFORGE_DEBUG", None)
    return subprocess.Popen([PY] + argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


SNAP = "network-snapshot-000000.safetensors"
# (name, script and arguments ({d}: the inputs folder), exit status, what the one error line must contain)
CASES = [
    ("train-empty", ["train.py", "data={d}/empty"], 2, ["{d}/empty: no images found"]),
    ("train-batch", ["train.py", "data={d}/good", "train.batch_size=8", "train.batch_gpu=3"], 2,
     ["train.batch_size=8 must be a multiple of train.batch_gpu=3"]),
    ("train-unknown-key", ["train.py", "train.no_such_key=1"], 2,
     ["Could not override 'train.no_such_key'; To append to your config use +train.no_such_key=1"]),
    ("train-unknown-preset", ["train.py", "schedule=nonexistent"], 2,
     ["Could not find 'schedule/nonexistent'; Available options in 'schedule': none, prog1024"]),
    ("generate-seeds", ["generate.py", "--network", "{d}/" + SNAP, "--seeds=a-b"], 2, ["--seeds=a-b: 'a-b'"]),
    ("project-text", ["project.py", "--network", "{d}/" + SNAP, "--target", "{d}/notes.txt"], 2,
     ["--target {d}/notes.txt: not a readable image"]),
    ("convert-pkl", ["convert_official.py", "{d}/evil.pkl", "{d}/out/evil.safetensors"], 2,
     ["evil.pkl", "posix.system"]),
    ("dataset-tool-missing", ["dataset_tool.py", "--source", "{d}/missing", "--dest", "{d}/out/x.zip"], 2,
     ["'{d}/missing' does not exist"]),
    ("calc-metrics-name", ["calc_metrics.py", "--network", "{d}/" + SNAP, "--metrics", "pr50k3"], 2,
     ["--metrics pr50k3: unknown metric"]),
    ("report-missing", ["report.py", "{d}/missing"], 2, ["{d}/missing: no such run directory"]),
]


# All the script runs at once (each spends seconds importing torch), in folders of their own.
@pytest.fixture(scope="module")
def results(inputs, tmp_path_factory):
    procs = {}
    for name, argv, _, _ in CASES:
        cwd = tmp_path_factory.mktemp(name)
        args = [str(ROOT / "scripts" / argv[0])] + [a.format(d=inputs) for a in argv[1:]]
        if argv[0] == "train.py":
            args += TINY
        if argv[0] in ("generate.py", "project.py"):
            args += ["--outdir", str(cwd / "out")]
        procs[name] = (launch(args, cwd), cwd)
    out = {}
    for name, (proc, cwd) in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        out[name] = (proc.returncode, stdout, stderr, cwd)
    return out


@pytest.mark.parametrize("name,argv,code,parts", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(results, inputs, name, argv, code, parts):
    rc, stdout, stderr, cwd = results[name]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == code, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr + stdout
    for part in parts:
        assert part.format(d=inputs) in lines[0], lines[0]
    written = [p for p in cwd.rglob("*") if p.is_file()]
    assert written == [], written  # (the run directory itself: created after the start-up checks, branch runs)
    assert not (inputs / "out").exists()


# generate.py in-process through its entry point (run_cli, as `python scripts/generate.py` runs it): the exit
# status and the one line; GANFORGE_DEBUG=1 adds the traceback.
GENERATE_CASES = [
    (["--seeds=5-4"], "--seeds=5-4: the range 5-4 is empty (ranges count up: 4-5)"),
    (["--seeds="], "--seeds='' names no numbers (expected e.g. 0-7,42)"),
    (["--mix-rows", "0-1", "--mix-styles", "0-50"], "--mix-styles: ws index 6 out of range: this generator has 6 ws, "
                                                    "indices 0-5"),
    (["--network", "{d}/training-state-000000.pt"], "{d}/training-state-000000.pt: a training state (for resume=), "
                                                    "not a network snapshot"),
    (["--network", "{d}/evil.pkl"], "posix.system"),
    (["--class", "cow"], "--class cow: no such class in {d}/labeled (classes: cat=0, dog=1)"),
    (["--class", "7"], "--class 7 out of range [0, 2)"),
]


@pytest.mark.parametrize("args,message", GENERATE_CASES, ids=[" ".join(c[0]) for c in GENERATE_CASES])
def test_generate_bad_input(inputs, tmp_path, capsys, monkeypatch, ref_ops_one_thread, args, message):
    import generate
    monkeypatch.delenv("GANFORGE_DEBUG", raising=False)
    argv = ["--network", str(inputs / SNAP), "--outdir", str(tmp_path / "out")] + [a.format(d=inputs) for a in args]
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: generate.main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert message.format(d=inputs) in err[0]
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("GANFORGE_DEBUG", "1")
    with pytest.raises(SystemExit):
        run_cli(lambda: generate.main(argv))
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.strip().splitlines()[-1].startswith("error: ")


# dataset_tool.py --labels from-folders: the class map is printed and stored in dataset.json, and generate.py --class
# takes a name from it (the image is the one --class <index> gives).
def test_class_names_stored_printed_and_used(inputs, tmp_path, capsys, ref_ops_one_thread):
    import generate
    labeled = tmp_path / "labeled"
    dataset_tool.main(["--source", str(inputs / "classes"), "--dest", str(labeled), "--labels", "from-folders"])
    out = capsys.readouterr().out
    assert "classes: cat=0, dog=1" in out and "data.use_labels=true" in out
    assert json.loads((labeled / "dataset.json").read_text())["class_names"] == {"cat": 0, "dog": 1}
    assert (labeled / "dataset.json").read_text() == (inputs / "labeled/dataset.json").read_text()
    snap = inputs / SNAP  # records data.path = inputs/labeled, made by the same command
    generate.main(["--network", str(snap), "--outdir", str(tmp_path / "by-name"), "--class", "dog", "--seeds", "3"])
    generate.main(["--network", str(snap), "--outdir", str(tmp_path / "by-index"), "--class", "1", "--seeds", "3"])
    generate.main(["--network", str(snap), "--outdir", str(tmp_path / "other"), "--class", "0", "--seeds", "3"])
    named = np.asarray(PIL.Image.open(tmp_path / "by-name/seed0003.png"))
    assert np.array_equal(named, np.asarray(PIL.Image.open(tmp_path / "by-index/seed0003.png")))
    assert not np.array_equal(named, np.asarray(PIL.Image.open(tmp_path / "other/seed0003.png")))


# dataset_tool.py without --resolution says which size it took and how many images it resized.
def test_dataset_tool_says_it_resizes(inputs, tmp_path, capsys):
    src = tmp_path / "src"
    png(src / "a.png")
    png(src / "b.png", size=(40, 30))
    dataset_tool.main(["--source", str(src), "--dest", str(tmp_path / "out.zip")])
    out = capsys.readouterr().out
    assert "--resolution not given: 16 px, the first image's size; images of other sizes are resized to it" in out
    assert "wrote 2 images (0 classes)" in out and "resized 1 to 16x16" in out


# The start-up checks of the loop, in-process (the same exceptions train.py turns into its line): each is a
# UserError whose message names the key or file, raised before anything is written.
LOOP_CASES = [
    ("missing", [], "dataset path '{d}/missing' does not exist"),
    ("mixed", [], "mixed/b.png: image is 32x32, but the first image"),
    ("trunc", [], "trunc/b.png: unreadable, corrupt or truncated image"),
    ("fake", [], "fake/a.png: not an image"),
    ("big", [], "big/a.png: image is 24x16"),
    ("good", ["model.channel_base=8"], "good: images are 16 px, too large for model.channel_base=8"),
    ("badjson", ["data.use_labels=true"], "badjson/dataset.json: not valid JSON"),
    ("good", ["data.use_labels=true"], "data.use_labels=true, but {d}/good has no labels"),
    ("good", ["model.mbstd_group=3", "train.batch_size=4"],
     "train.batch_gpu=4 must be divisible by model.mbstd_group=3 (the minibatch-std group); pick a group that "
     "divides it, e.g. model.mbstd_group=2"),
    ("good", ["train.batch_size=-8"], "train.batch_size=-8 must be a positive number of images"),
    ("good", ["train.batch_size=0"], "train.batch_size=0 must be a positive number of images"),
    ("good", ["train.batch_size=8", "train.batch_gpu=-8"], "train.batch_gpu=-8 must be a positive number"),
    ("good", ["train.kimg=-1"], "train.kimg=-1 must be positive"),
    ("good", ["train.tick_kimg=0"], "train.tick_kimg=0 must be positive"),
]


@pytest.mark.parametrize("data,overrides,message", LOOP_CASES, ids=[f"{c[0]}-{'-'.join(c[1])}" for c in LOOP_CASES])
def test_loop_refuses_at_start_up(inputs, tmp_path, ref_ops_one_thread, data, overrides, message):
    cfg = compose_config(TINY + ["log.progress=false", "data=images", f"data.path={inputs / data}"] + overrides)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(UserError) as e:
        training_loop(cfg, run)
    assert e.value.exit_code == EXIT_BAD_INPUT
    assert message.format(d=inputs) in str(e.value)
    assert list(run.iterdir()) == []


# Silent no more: a tiny dataset, keys that do not apply, labels left unused, zip members outside the archive, the
# progress bar in a redirected log. One short run (two ticks' worth of nothing: train.kimg below one batch).
def test_start_up_says_what_it_would_have_hidden(inputs, tmp_path):
    z = tmp_path / "data.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(3):
            zf.write(inputs / "good" / f"{i}.png", f"{i}.png")
        zf.writestr("../escape.png", (inputs / "good/3.png").read_bytes())
        zf.writestr("dataset.json", json.dumps({"labels": [[f"{i}.png", i % 2] for i in range(3)],
                                                "class_names": {"a": 0, "b": 1}}))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", GANFORGE_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([PY, str(ROOT / "scripts/train.py"), f"data={z}", "data.num_images=256", "train.kimg=0.004",
                           "train.batch_size=4", "train.snap=1000", "train.image_snap=1000"] + TINY,
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Warning: the dataset has 3 images, fewer than one batch (train.batch_size=4)" in out
    assert f"Note: data.num_images=256 ignored: data.resolution and data.num_images size the synthetic dataset " \
           f"only; {z} has its files'" in out
    assert f"Warning: {z}: 1 zip member(s) left out because their path leaves the archive (../ or absolute), " \
           f"e.g. ../escape.png" in out
    assert f"Note: {z} has 2 classes in its dataset.json, unused" in out and "data.use_labels=true" in out
    assert "kimg [" not in proc.stderr  # no progress bar: stdout is not a terminal
    run = next((tmp_path / "runs").iterdir())
    config = (run / "config.yaml").read_text()
    assert "  resolution: null\n  num_images: null\n" in config  # what is true for an image dataset


# `train.py --help` is ganforge's page; `data=<path> --cfg job` composes (the automatic model=auto goes before
# Hydra's flag) and writes nothing.
def test_train_help_and_cfg_job(inputs, tmp_path):
    helped = launch([str(ROOT / "scripts/train.py"), "--help"], tmp_path)
    job = launch([str(ROOT / "scripts/train.py"), f"data={inputs / 'good'}", "--cfg", "job"], tmp_path)
    out, err = helped.communicate(timeout=600)
    assert helped.returncode == 0, err
    for part in ("data=<folder|zip>   shorthand for data=images data.path=<folder|zip>", "model=<preset>",
                 "Resume: rerunning the same command resumes", "README.md and docs/ explain the rest"):
        assert part in out
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err
    assert "model:\n  name: auto\n" in out and f"  path: {inputs / 'good'}\n" in out
    assert list(tmp_path.iterdir()) == []


# Every option of every benchmark script says what it is (--help).
def test_bench_options_have_help():
    import ast
    for path in sorted((ROOT / "scripts").glob("bench*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                assert any(k.arg == "help" for k in node.keywords), f"{path.name}:{node.lineno} has no help"


# Two processes under `accelerate launch`: the error line once (rank 0) and no traceback from a worker; the launcher's
# own failure summary (torchrun's, in the launcher process) follows it and is not ours to silence.
@pytest.mark.slow
def test_two_processes_say_it_once(inputs, tmp_path):
    launcher = [str(Path(PY).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", GANFORGE_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("GANFORGE_DEBUG", None)
    proc = subprocess.run(launcher + [str(ROOT / "scripts/train.py"), f"data={inputs / 'mixed'}"] + TINY,
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "mixed/b.png: image is 32x32" in lines[0], proc.stderr
    assert proc.stderr.lstrip().startswith("error:")  # before anything the launcher prints
    assert "scripts/train.py\", line" not in proc.stderr  # no worker traceback
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
