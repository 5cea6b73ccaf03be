"""Run directories as real processes meet them: one owner per run, finished runs, failed starts, checked snapshots,
the recorded dataset, the report page after calc_metrics and the timing of a resumed tick."""
import json
import shutil
import signal
import socket
import struct
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import _metrics_dist_worker as W
from helpers import PY, ROOT, script_env
from training.io import checkpoint as ckpt
from training.report.page import format_value


# A tiny CPU run: ticks of 16 images (2 minibatches of 8), a checkpoint at every tick.
TINY = ["model=tiny", "train=test", "log.progress=false", "model.channel_base=256", "model.channel_max=32",
        "data.num_images=256", "metrics=none", "train.ops_impl=ref", "aug=noaug", "train.cpu_threads=1",
        "train.tick_kimg=0.016", "outdir=out"]


# Scripts run with the reference ops and the repository on the import path.
def env_for(cwd):
    return script_env(cwd, GANFORGE_OPS_IMPL="ref", PYTHONPATH=str(ROOT))


def script(name, args, cwd, timeout=300):
    return subprocess.run([PY, str(ROOT / "scripts" / name)] + args, cwd=cwd, env=env_for(cwd), capture_output=True,
                          text=True, timeout=timeout)


def train(args, cwd, check=True):
    proc = script("train.py", TINY + args, cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def ticks(run_dir):
    return [json.loads(line)["Progress/tick"] for line in (Path(run_dir) / "stats.jsonl").read_text().splitlines()]


def numbered(outdir):
    return sorted(p.name for p in Path(outdir).iterdir() if p.is_dir() and p.name[:5].isdigit())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run trained to 0.032 kimg (ticks 0, 1, 2): out/00000-synthetic-tiny."""
    cwd = tmp_path_factory.mktemp("finished")
    train(["train.kimg=0.032"], cwd)
    return cwd / "out" / "00000-synthetic-tiny"


def copy_run(run_dir, cwd):
    dst = Path(cwd) / "out" / run_dir.name
    shutil.copytree(run_dir, dst)
    return dst


# ---- 1. one owner per run directory ----

@pytest.mark.slow
def test_two_processes_started_together_train_in_two_directories(tmp_path):
    procs = [subprocess.Popen([PY, str(ROOT / "scripts/train.py")] + TINY + ["train.kimg=0.032"], cwd=tmp_path,
                              env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert numbered(tmp_path / "out") == ["00000-synthetic-tiny", "00001-synthetic-tiny"]
    for run in numbered(tmp_path / "out"):
        assert ticks(tmp_path / "out" / run) == [0, 1, 2]  # each tick once: no two writers in one directory
    said = sorted(next(w for w in o.split() if w.startswith("out/")) for o, _ in outs if "run dir " in o)
    assert said == ["out/00000-synthetic-tiny", "out/00001-synthetic-tiny"]  # one process in each


@pytest.mark.slow
def test_a_start_that_would_resume_a_live_run_stops_naming_its_holder(tmp_path):
    run = tmp_path / "out" / "00000-synthetic-tiny"
    with open(tmp_path / "a.out", "w") as out:
        a = subprocess.Popen([PY, str(ROOT / "scripts/train.py")] + TINY + ["train.kimg=1000"], cwd=tmp_path,
                             env=env_for(tmp_path), stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while a.poll() is None and time.monotonic() < deadline and \
                    not ((run / "stats.jsonl").is_file() and len(ticks(run)) >= 2):
                time.sleep(0.05)
            assert a.poll() is None, (tmp_path / "a.out").read_text()
            b = train(["train.kimg=1000"], tmp_path, check=False)  # the same command: it would resume A's run
        finally:
            a.send_signal(signal.SIGTERM)
            rc = a.wait(timeout=120)
    assert rc == 0
    assert b.returncode == 1
    lines = b.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in b.stderr
    assert f"error: out/{run.name} is being trained by pid {a.pid} on {socket.gethostname()} since " in lines[0]
    assert numbered(tmp_path / "out") == ["00000-synthetic-tiny"]  # B made nothing
    t = ticks(run)
    assert t == list(range(len(t)))  # each tick once


# ---- 3. a finished run: said in one line; a larger train.kimg extends it ----

def test_finished_run_rerun_says_so_and_a_larger_kimg_extends_it(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    again = train(["train.kimg=0.032"], tmp_path)
    assert again.stdout.strip().splitlines() == [
        f"{Path('out') / run.name} is finished: trained to 0.032 kimg (train.kimg=0.032); nothing to do. To extend "
        f"it, rerun this command with a larger train.kimg (e.g. train.kimg=0.064); resume=none starts a new run"]
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    assert numbered(tmp_path / "out") == [run.name]

    longer = train(["train.kimg=0.048"], tmp_path)
    assert numbered(tmp_path / "out") == [run.name]
    assert ticks(run) == [0, 1, 2, 3]
    assert json.loads((run / "DONE").read_text())["kimg"] == 0.048
    assert "Resuming from" in longer.stdout

    # A run whose state is at train.kimg but that has no DONE (killed just after its last checkpoint): said once.
    (run / "DONE").unlink()
    proc = train(["train.kimg=0.048", f"run_dir={run}"], tmp_path)
    assert (proc.stdout + proc.stderr).count("Already trained") == 1
    assert ticks(run) == [0, 1, 2, 3]


# ---- 4. a failed start leaves no directory ----

def test_failed_starts_leave_no_run_directory(tmp_path):
    missing = train(["data=nowhere.zip", "train.kimg=0.032"], tmp_path, check=False)
    bad_batch = train(["train.batch_size=10", "train.kimg=0.032"], tmp_path, check=False)
    assert missing.returncode != 0 and "nowhere.zip" in missing.stdout + missing.stderr
    assert bad_batch.returncode != 0 and "10" in bad_batch.stdout + bad_batch.stderr
    assert not (tmp_path / "out").exists() or numbered(tmp_path / "out") == []
    train(["train.kimg=0.016"], tmp_path)
    assert numbered(tmp_path / "out") == ["00000-synthetic-tiny"]  # the number a failed start did not keep


# ---- 2. snapshots carry the sha256 of their tensors ----

def corrupt_inside_a_tensor(path: Path) -> str:
    """Overwrite 4 KB in the middle of the snapshot's largest tensor; returns its name."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name, info = max(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
    start, end = info["data_offsets"]
    assert end - start >= 8192
    at = 8 + n + start + (end - start - 4096) // 2
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(noise)
    return name


def test_corrupt_snapshot_is_refused_by_every_loader(finished, tmp_path):
    snap = tmp_path / "network-snapshot-000000.safetensors"
    shutil.copy(finished / snap.name, snap)
    assert ckpt.load_snapshot(snap)["G_ema"] is not None  # intact: verified and loaded
    tensor = corrupt_inside_a_tensor(snap)
    with pytest.raises(ckpt.CheckpointError, match=f"{snap}: tensor {tensor} does not match the sha256"):
        ckpt.load_snapshot(snap)
    PIL.Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "target.png")
    runs = {
        "generate.py": ["--network", str(snap), "--outdir", "gen", "--seeds", "0-1", "--device", "cpu"],
        "project.py": ["--network", str(snap), "--target", "target.png", "--outdir", "proj", "--steps", "1",
                       "--loss", "fallback", "--device", "cpu"],
        "calc_metrics.py": ["--network", str(snap), "--metrics", "swd64", "--run-dir", "metrics"],
        "train.py": TINY + [f"resume={snap}", "run_dir=fresh", "train.kimg=0.016"],
    }
    for name, args in runs.items():
        proc = script(name, args, tmp_path)
        assert proc.returncode != 0, name
        assert f"{snap}: tensor {tensor} does not match the sha256" in proc.stderr, (name, proc.stderr[-2000:])
    assert not any((tmp_path / d).exists() for d in ("gen", "proj", "metrics", "fresh"))


def test_snapshot_without_digests_loads_with_a_note(finished, tmp_path, capfd):
    old = tmp_path / "old.safetensors"
    with safe_open(str(finished / "network-snapshot-000000.safetensors"), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "sha256"}
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(old), metadata=meta)
    assert ckpt.load_snapshot(old)["G_ema"] is not None
    assert f"note: {old}: no sha256 of its tensors inside" in capfd.readouterr().err


# ---- 10. the dataset: an absolute path and the sha256 of its file list ----

def images(folder: Path, n: int):
    folder.mkdir()
    for i in range(n):
        PIL.Image.fromarray(np.full((32, 32, 3), 8 * i, np.uint8)).save(folder / f"img{i:02d}.png")


def test_dataset_recorded_absolute_and_another_dataset_is_noticed(tmp_path):
    images(tmp_path / "faces", 16)
    train(["data=faces", "model=tiny", "train.kimg=0.016"], tmp_path)
    run = tmp_path / "out" / "00000-faces-tiny"
    for name in ("config.json", "config.yaml"):
        assert str(tmp_path / "faces") in (run / name).read_text()
    sha = json.loads((run / "config.json").read_text())["data"]["files_sha256"]
    assert len(sha) == 64
    shutil.rmtree(tmp_path / "faces")
    images(tmp_path / "faces", 17)  # another dataset under the same name
    proc = train(["data=faces", "model=tiny", "train.kimg=0.032"], tmp_path, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"data.path={tmp_path / 'faces'}: not the dataset" in lines[0]
    assert f"the run's has {sha[:12]}..." in lines[0]
    assert ticks(run) == [0, 1]  # nothing trained on the other dataset


# ---- 12. the report page after calc_metrics; timing across a mid-tick resume ----

def test_calc_metrics_rewrites_the_report_page(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    detector = tmp_path / "tiny-detector.pt"  # a stand-in Inception (tests/_metrics_dist_worker.py)
    torch.jit.save(torch.jit.script(W.TinyDetector(dim=2048)), str(detector))
    assert "fid32" not in (run / "report.html").read_text()
    proc = script("calc_metrics.py", ["--network", str(run / "network-snapshot-000000.safetensors"), "--metrics",
                                      "fid32", "--detector", str(detector), "--no-cache", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    value = json.loads((run / "metric-fid32.jsonl").read_text().splitlines()[-1])["value"]
    page = (run / "report.html").read_text()
    assert f"fid32: <b>{format_value(value)}</b>" in page  # the header's newest value of each metric


# Train with every minibatch slowed by SLEEP seconds (training.loop.update_ema wrapped) and, when STOP is set,
# SIGTERM at that many images (a stop mid-tick).
SLOW = textwrap.dedent("""
    import os, signal, sys, time
    import training.loop as loop
    SLEEP, STOP = float(os.environ["SLEEP"]), int(os.environ.get("STOP", "0"))
    ema = loop.update_ema
    def slow(G_ema, G, cur_nimg, *args, **kwargs):
        time.sleep(SLEEP)
        if cur_nimg == STOP:
            os.kill(os.getpid(), signal.SIGTERM)
        return ema(G_ema, G, cur_nimg, *args, **kwargs)
    loop.update_ema = slow
    sys.argv = [{train!r}] + sys.argv[1:]
    sys.path[0] = os.path.dirname({train!r})
    exec(compile(open({train!r}).read(), {train!r}, "exec"), {{"__name__": "__main__"}})
""")


def test_timing_continues_across_a_mid_tick_resume(tmp_path):
    wrapper = tmp_path / "slow_train.py"
    wrapper.write_text(SLOW.format(train=str(ROOT / "scripts/train.py")))
    sleep = 0.4
    args = TINY + ["train.tick_kimg=0.032", "train.kimg=0.064", "run_dir=run"]  # ticks of 4 minibatches of 8
    outs = []
    for stop in ("48", "0"):  # stopped 2 minibatches into tick 2, then rerun to the end
        proc = subprocess.run([PY, str(wrapper)] + args, cwd=tmp_path, env=dict(env_for(tmp_path), SLEEP=str(sleep),
                              STOP=stop), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(proc.stdout)
    assert "Stopped by SIGTERM at 0.048 kimg" in outs[0] and "Resuming from" in outs[1]
    rows = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [r["Progress/tick"] for r in rows] == [0, 1, 2]
    tick2 = rows[2]
    # Tick 2 is 4 minibatches, 2 before the stop and 2 after: at least 4 sleeps, whichever process slept them.
    assert tick2["Timing/sec_per_tick"] >= 4 * sleep
    assert tick2["Timing/sec_per_kimg"] >= 4 * sleep / 0.032
    # The run's total: at least the 8 sleeps of both processes, and on from tick 1's.
    assert tick2["Timing/total_sec"] >= 8 * sleep and tick2["Timing/total_sec"] > rows[1]["Timing/total_sec"]
