"""Long runs: bit-exact resume after SIGKILL and SIGTERM, crash-safe checkpoints, safe loading, clear errors."""
import errno
import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from helpers import PY, ROOT, TINY, run_train, script_env
from tests import official_builder as ob
from training.errors import ResumeError
from training.io import checkpoint as ckpt
from training.resume import check_config, config_changes

# Ticks of 16 images (2 minibatches of 8), a checkpoint at every tick.
SMALL = TINY + ["train.tick_kimg=0.016"]
# SMALL with ADA on, a fast p and a small dataset (so that p rises), so that p, its statistic and the
# augmentations' random draws are all part of the state that must survive.
ADA = [a for a in SMALL if a != "aug=noaug"] + ["aug=ada", "aug.ada_kimg=1", "aug.ada_interval=2", "data.max_size=32",
                                               "train.deterministic=true"]
KIMG = "train.kimg=0.064"
LAUNCH2 = [str(Path(PY).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


# The command that runs scripts/train.py (for runs in the background; run_train for the others).
def train_cmd(args, launcher=None):
    return (launcher or [PY]) + [str(ROOT / "scripts/train.py")] + args


# Start a run in the background, wait until `ready()` is true, then send `sig`; returns (returncode, out, err).
def interrupt_when(args, cwd, ready, sig, timeout=600):
    with open(Path(cwd) / "out.txt", "w") as out, open(Path(cwd) / "err.txt", "w") as err:
        proc = subprocess.Popen(train_cmd(args), cwd=cwd, env=script_env(cwd), stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(sig)
        rc = proc.wait(timeout=timeout)
    return rc, (Path(cwd) / "out.txt").read_text(), (Path(cwd) / "err.txt").read_text()


# (inode, mtime) of a file, None when it does not exist: a checkpoint rewritten by rename changes it.
def file_id(path):
    try:
        st = os.stat(path)
        return st.st_ino, st.st_mtime_ns
    except FileNotFoundError:
        return None


# Every tensor and value of two training states, compared exactly (the config and checksum name the run dir; timing
# is wall-clock seconds).
def assert_states_equal(a: dict, b: dict, path: str = "state") -> int:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
        return 1
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        return sum(assert_states_equal(a[k], b[k], f"{path}.{k}") for k in a
                   if k not in ("config", "config_requested", "sha256", "timing"))
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        return sum(assert_states_equal(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"
    return 0


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def stats_ticks(run_dir):
    return [json.loads(x)["Progress/tick"] for x in (Path(run_dir) / "stats.jsonl").read_text().splitlines()]


# The uninterrupted run that the interrupted ones must reproduce bit for bit.
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("reference")
    run_train(ADA + [KIMG, "run_dir=run"], cwd)
    return cwd / "run"


def test_sigterm_then_sigkill_then_rerun_is_bit_exact(reference, tmp_path):
    run_dir, state_file = tmp_path / "run", tmp_path / "run/training-state-000000.pt"
    # 1. A long run gets SIGTERM right after its first checkpoint: it stops at the next step boundary (mid-tick),
    # writes a checkpoint there and exits with 0.
    rc, out, err = interrupt_when(ADA + ["train.kimg=1000", "run_dir=run"], tmp_path, state_file.exists,
                                  signal.SIGTERM)
    assert rc == 0, err[-2000:]
    assert "Received SIGTERM" in err and "Stopped by SIGTERM" in out
    stopped = load(state_file)["counters"]["cur_nimg"]
    assert 16 < stopped < 64 and stopped % 8 == 0 and not (run_dir / "DONE").exists()

    # 2. Rerun with the reference's length (a change that is allowed and logged), SIGKILLed as soon as it has
    # written its next checkpoint.
    first = file_id(state_file)
    rc, out, _ = interrupt_when(ADA + [KIMG, "run_dir=run"], tmp_path, lambda: file_id(state_file) != first,
                                signal.SIGKILL)
    assert rc == -signal.SIGKILL and not (run_dir / "DONE").exists()
    assert "Config change on resume (allowed): train.kimg: 1000.0 → 0.064" in out
    assert f"Resuming from run/training-state-000000.pt at {stopped / 1000:.3f} kimg" in out
    killed_at = load(state_file)["counters"]["cur_nimg"]
    assert stopped < killed_at < 64
    # A newer checkpoint cut short (as by a crash outside the atomic rename) and a killed write's temporary file.
    data = state_file.read_bytes()
    (run_dir / "training-state-000001.pt").write_bytes(data[: len(data) // 2])
    (run_dir / ".training-state-000000.pt.x1y2.tmp").write_bytes(data[:100])

    # 3. The same command again: it skips the broken newest file, resumes and ends bit for bit where the
    # uninterrupted reference run ended.
    proc = run_train(ADA + [KIMG, "run_dir=run"], tmp_path)
    assert "skipping" in proc.stdout and "training-state-000001.pt" in proc.stdout
    assert f"Resuming from run/training-state-000000.pt at {killed_at / 1000:.3f} kimg" in proc.stdout
    assert not (run_dir / ".training-state-000000.pt.x1y2.tmp").exists()
    final, ref = load(state_file), load(reference / "training-state-000000.pt")
    assert final["counters"]["cur_nimg"] == 64
    assert assert_states_equal(final, ref) > 100  # G, D, G_ema, both Adams, pl_mean, ADA pipe, RNG states.
    assert final["ada"] == ref["ada"]
    assert max(json.loads(x)["Progress/augment_p"] for x in (reference / "stats.jsonl").read_text().splitlines()) > 0
    assert stats_ticks(run_dir) == [0, 1, 2, 3, 4]  # Ticks that a killed run had reported are not doubled.


def test_config_change_and_resume_none_are_refused(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_train(ADA + [KIMG, "run_dir=run", "train.glr=0.001", "model.map_layers=3"], tmp_path, check=False)
    assert proc.returncode == 1
    assert "run/training-state-000000.pt: the config differs" in proc.stderr
    assert "train.glr: 0.0025 → 0.001" in proc.stderr and "model.map_layers: 2 → 3" in proc.stderr
    assert {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # A refused run writes nothing.
    from training.resume import resolve_resume
    with pytest.raises(ResumeError, match=r"run already holds checkpoints \(training-state-000000\.pt, "
                                          r"network-snapshot-000000\.safetensors\); resume=none refuses"):
        resolve_resume("none", run_dir)
    assert resolve_resume("none", tmp_path / "new") == {"kind": "fresh"}


def test_weights_only_resume_from_snapshot(reference, tmp_path):
    # Transfer learning: G, D and G_ema from a snapshot; counters, optimizers and ADA start fresh, with
    # ada_kimg_resume. With zero learning rates the weights must stay exactly the snapshot's.
    snap_path = reference / "network-snapshot-000000.safetensors"
    proc = run_train(ADA + ["train.kimg=0.016", "run_dir=run", f"resume={snap_path}", "train.glr=0", "train.dlr=0",
                            "aug.ada_kimg_resume=100"], tmp_path)
    assert f"Starting from the weights of {snap_path}" in proc.stdout
    state = load(tmp_path / "run/training-state-000000.pt")
    snap = ckpt.load_snapshot(snap_path)
    assert state["counters"]["cur_nimg"] == 16 and state["counters"]["batch_idx"] == 2
    for name in ("G", "D"):
        for k, v in snap[name].named_parameters():
            assert torch.equal(state[name][k], v), f"{name}.{k}"
    # One p update after 2 minibatches of 8: a step of 16 / (ada_kimg_resume * 1000) = 0.00016, not 0.016.
    assert state["ada"]["p"] in (0.0, pytest.approx(0.00016))
    # Fresh Adam: G stepped twice (Gmain) + once (Greg, every 2 minibatches in train=test), in this run only.
    assert [float(s["step"]) for s in state["opt"][0]["state"].values()][0] == 3


def test_nonfinite_gradients_stop_with_last_good_state(tmp_path):
    proc = run_train(SMALL + ["train.kimg=1000", "run_dir=run", "train.max_nonfinite=2"], tmp_path, check=False,
                     GANFORGE_TEST_NONFINITE_FROM_NIMG="8")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "2 minibatches in a row with non-finite gradients (train.max_nonfinite=2)" in proc.stderr
    assert "the last good state is run/training-state-000000.pt" in proc.stderr
    state = load(tmp_path / "run/training-state-000000.pt")
    assert state["counters"]["cur_nimg"] == 8 + 2 * 8
    assert state["counters"]["skipped_steps"] >= 2
    for name in ("G", "D", "G_ema"):
        assert all(torch.isfinite(v).all() for v in state[name].values() if v.is_floating_point())


# Run scripts/train.py in a Python whose torch.save fails with ENOSPC from its second call on (the second
# training state): the first one must stay intact and the run must stop with a clear message.
def test_disk_full_keeps_previous_checkpoint_and_stops(tmp_path):
    wrapper = tmp_path / "disk_full.py"
    wrapper.write_text(textwrap.dedent(f"""
        import errno, runpy, sys, torch
        calls = [0]
        real_save = torch.save
        def save(*args, **kwargs):
            calls[0] += 1
            if calls[0] >= 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(*args, **kwargs)
        torch.save = save
        sys.argv = [{str(ROOT / 'scripts/train.py')!r}] + sys.argv[1:]
        sys.path[0] = {str(ROOT / 'scripts')!r}
        runpy.run_path(sys.argv[0], run_name="__main__")
    """))
    # Ticks of one minibatch: checkpoints at 8 and 16 images.
    proc = subprocess.run([PY, str(wrapper)] + TINY + ["train.tick_kimg=0.008", "train.kimg=0.016", "run_dir=run"],
                          cwd=tmp_path, env=script_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    state_file = tmp_path / "run/training-state-000000.pt"
    assert "run/training-state-000000.pt: disk full" in proc.stderr and "intact" in proc.stderr
    assert ckpt.read_state_file(state_file)["counters"]["cur_nimg"] == 8
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    assert not (tmp_path / "run/DONE").exists()


@pytest.mark.slow
def test_two_processes_rank_killed_then_rerun_is_bit_exact(tmp_path):
    args = SMALL + ["train.kimg=0.032", "run_dir=run", "train.deterministic=true"]
    (tmp_path / "ref").mkdir()
    run_train(args, tmp_path / "ref", launcher=LAUNCH2, GANFORGE_DIST_TIMEOUT="30")
    # Rank 1 dies (SIGKILL) in the second tick: rank 0 must not hang; the launcher fails within the timeout.
    (tmp_path / "kill").mkdir()
    start = time.monotonic()
    proc = run_train(args, tmp_path / "kill", check=False, launcher=LAUNCH2, timeout=240, GANFORGE_DIST_TIMEOUT="30",
                     GANFORGE_TEST_KILL_AT_NIMG="24", GANFORGE_TEST_KILL_RANK="1")
    assert proc.returncode != 0 and time.monotonic() - start < 240
    state_file = tmp_path / "kill/run/training-state-000000.pt"
    assert load(state_file)["counters"]["cur_nimg"] == 16 and not (tmp_path / "kill/run/DONE").exists()
    proc = run_train(args, tmp_path / "kill", launcher=LAUNCH2, GANFORGE_DIST_TIMEOUT="30")
    assert "Resuming from" in proc.stdout
    final, ref = load(state_file), load(tmp_path / "ref/run/training-state-000000.pt")
    assert len(final["rng"]) == 2 and final["counters"]["cur_nimg"] == 32
    assert assert_states_equal(final, ref) > 100


# Progressive schedule with ADA: a run killed in the middle of a fade (stage 16 px, with its own batch) resumes from
# its mid-fade checkpoint and ends bit for bit where the uninterrupted run ends; then a rerun with another schedule
# is refused. Stages: 8 px (batch 16) to 0.032 kimg, 16 px fading in over 0.032 kimg, 32 px from 0.064 kimg.
def test_mid_fade_kill_then_rerun_is_bit_exact(tmp_path):
    args = ADA + ["schedule=prog32", "schedule.boundaries_kimg=[0.032,0.064]", "schedule.fade_kimg=0.032",
                  "schedule.batch_size=[16,8,8]", "train.kimg=0.08", "run_dir=run"]
    (tmp_path / "ref").mkdir()
    run_train(args, tmp_path / "ref")
    (tmp_path / "kill").mkdir()
    proc = run_train(args, tmp_path / "kill", check=False, GANFORGE_TEST_KILL_AT_NIMG="56")
    state_file = tmp_path / "kill/run/training-state-000000.pt"
    assert proc.returncode == -signal.SIGKILL
    killed = load(state_file)
    assert killed["counters"]["cur_nimg"] == 48 and killed["stage"] == {"resolution": 16, "alpha": 0.5}
    proc = run_train(args, tmp_path / "kill")
    assert "Resuming from run/training-state-000000.pt at 0.048 kimg" in proc.stdout
    assert "Stage 2: 32 px from 0.064 kimg" in proc.stdout
    final, ref = load(state_file), load(tmp_path / "ref/run/training-state-000000.pt")
    assert final["counters"]["cur_nimg"] == 80 and final["stage"] == {"resolution": 32, "alpha": 0.5}
    assert assert_states_equal(final, ref) > 100
    assert [json.loads(x)["Progress/resolution"] for x in (tmp_path / "kill/run/stats.jsonl").read_text().splitlines()] \
        == [json.loads(x)["Progress/resolution"] for x in (tmp_path / "ref/run/stats.jsonl").read_text().splitlines()]
    proc = run_train([a for a in args if a != "train.kimg=0.08"] + ["train.kimg=0.1", "schedule.fade_kimg=0.016"],
                     tmp_path / "kill", check=False)
    assert proc.returncode != 0 and "schedule.fade_kimg: 0.032 → 0.016" in proc.stderr


# ---- checkpoint files (in process) ----

def small_state(value: float) -> dict:
    return {"G": {"w": torch.full([4, 4], value)}, "counters": {"cur_nimg": int(value)},
            "rng": [{"torch": torch.arange(5)}]}


def test_checksum_detects_a_flipped_byte_and_the_previous_state_is_used(tmp_path, capsys):
    ckpt.write_state_file(tmp_path / "training-state-000001.pt", small_state(1.0))
    ckpt.write_state_file(tmp_path / "training-state-000002.pt", small_state(2.0))
    newest = tmp_path / "training-state-000002.pt"
    data = bytearray(newest.read_bytes())
    pattern = torch.full([4, 4], 2.0).numpy().tobytes()
    at = bytes(data).index(pattern)
    data[at + 5] ^= 0x10  # Inside the tensor's bytes: the zip and pickle still load, only the checksum can tell.
    newest.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"training-state-000002\.pt: checksum mismatch"):
        ckpt.read_state_file(newest)
    messages = []
    path, state = ckpt.newest_intact_state(tmp_path, log=messages.append)
    assert path.name == "training-state-000001.pt" and state["counters"]["cur_nimg"] == 1
    assert any("skipping" in m and "training-state-000002.pt" in m for m in messages)
    # When no state is usable, the run is not silently restarted from scratch.
    (tmp_path / "training-state-000001.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)no intact training state.*000002.*000001"):
        ckpt.newest_intact_state(tmp_path, log=messages.append)


def test_state_with_code_is_refused_and_code_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "training-state-000002.pt"
    torch.save({"G": {"w": torch.zeros(2)}, "counters": ob.GlobalRefCall(os.system, (f"touch {marker}",))}, bad)
    with pytest.raises(ckpt.CheckpointError, match=r"training-state-000002\.pt: refused to load.*could run code"):
        ckpt.read_state_file(bad)
    assert not marker.exists()
    # Auto-resume skips it with a warning and takes the previous one; resume=<that file> is an error.
    ckpt.write_state_file(tmp_path / "training-state-000001.pt", small_state(1.0))
    messages = []
    path, _ = ckpt.newest_intact_state(tmp_path, log=messages.append)
    assert path.name == "training-state-000001.pt" and "refused" in messages[0]
    from training.resume import resolve_resume
    with pytest.raises(ckpt.CheckpointError, match="refused to load"):
        resolve_resume(str(bad), tmp_path / "new_run")
    assert not marker.exists()


def test_keep_prunes_old_states_but_not_the_best(tmp_path):
    for kimg in range(1, 7):
        ckpt.write_state_file(tmp_path / f"training-state-{kimg:06d}.pt", small_state(float(kimg)))
    (tmp_path / "metric-fid50k_full-best.json").write_text(json.dumps(
        {"metric": "fid50k_full", "value": 3.2, "snapshot": "network-snapshot-000002.safetensors", "kimg": 2.0}))
    ckpt.prune_states(tmp_path, keep=3, protect=ckpt.best_kimgs(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("training-state-*.pt")) == [
        "training-state-000002.pt", "training-state-000004.pt", "training-state-000005.pt", "training-state-000006.pt"]
    ckpt.prune_states(tmp_path, keep=0)  # 0 keeps everything.
    assert len(list(tmp_path.glob("training-state-*.pt"))) == 4


def test_disk_full_in_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "training-state-000001.pt"
    ckpt.write_state_file(path, small_state(1.0))
    before = path.read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"training-state-000001\.pt: disk full.*intact"):
        ckpt.write_state_file(path, small_state(2.0))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_config_diff_lists_refused_and_allowed_changes():
    old = {"train": {"glr": 0.002, "kimg": 100, "seed": 0}, "log": {"wandb": "disabled"}, "run_dir": "a",
           "model": {"name": "tiny"}}
    new = {"train": {"glr": 0.001, "kimg": 200, "seed": 0, "keep": 3}, "log": {"wandb": "offline"}, "run_dir": "b",
           "model": {"name": "tiny2"}}
    refused, allowed = config_changes(old, new)
    assert refused == ["model.name: 'tiny' → 'tiny2'", "train.glr: 0.002 → 0.001"]
    assert allowed == ["log.wandb: 'disabled' → 'offline'", "train.keep: '(absent)' → 3", "train.kimg: 100 → 200"]
    with pytest.raises(ResumeError, match=r"(?s)state\.pt: the config differs.*train\.glr: 0\.002 → 0\.001"):
        check_config(old, new, "state.pt")


def test_second_stop_signal_exits_at_once(tmp_path):
    script = textwrap.dedent("""
        import os, signal, sys, time
        from training.preempt import StopRequest
        stop = StopRequest(repeat_s=1.0).install()
        print("ready", flush=True)
        while stop.signum is None:
            time.sleep(0.01)
        print("first", stop.name, flush=True)
        time.sleep(60)
        print("not reached", flush=True)
    """)
    proc = subprocess.Popen([PY, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGUSR1)
    proc.send_signal(signal.SIGUSR1)  # The same stop delivered twice at once (scheduler + launcher): one request.
    assert proc.stdout.readline().strip() == "first SIGUSR1"
    time.sleep(1.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM and "not reached" not in out
    assert "Second stop signal (SIGTERM): exiting now" in err


# ---- bad input, end to end: the message must survive Hydra and the loop ----

def test_bad_dataset_message_reaches_the_user(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        PIL.Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(data / f"img{i}.png")
    proc = run_train(TINY + [f"data={data}"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "img0.png" in proc.stderr and "12x12" in proc.stderr and "scripts/dataset_tool.py" in proc.stderr


# Process ids whose parent is `ppid` (from /proc).
def children_of(ppid: int) -> list:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
                kids.append(int(entry))
    return kids


# Whether process `pid` still runs (a zombie has exited); this process reaps the orphans it adopted.
def running(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# A dead launcher frees its GPUs: SIGKILL of `accelerate launch` (as the out-of-memory killer or a scheduler does)
# leaves two workers in sessions of their own, which would hold their devices; each notices (parent-death signal,
# parent pid at the step boundary), stops at a step boundary with a checkpoint and exits, within 30 s.
@pytest.mark.slow
def test_workers_exit_when_the_launcher_is_killed(tmp_path):
    import ctypes
    import socket
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = LAUNCH2 + ["--main_process_port", str(port)]
    state_file = tmp_path / "run/training-state-000000.pt"
    libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0)  # the orphans become this process's children: reapable
    workers = []
    try:
        with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
            proc = subprocess.Popen(train_cmd(SMALL + ["train.kimg=1000", "run_dir=run"], launcher), cwd=tmp_path,
                                    env=script_env(tmp_path), stdout=out, stderr=err)
            deadline = time.monotonic() + 300
            while not state_file.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None and state_file.exists(), (tmp_path / "err.txt").read_text()[-3000:]
            first = load(state_file)["counters"]["cur_nimg"]
            workers = children_of(proc.pid)
            assert len(workers) == 2
            proc.kill()
            proc.wait()
            killed = time.monotonic()
            while any(running(w) for w in workers) and time.monotonic() - killed < 30:
                time.sleep(0.1)
            assert not any(running(w) for w in workers), "workers still running 30 s after their launcher died"
        text = (tmp_path / "err.txt").read_text() + (tmp_path / "out.txt").read_text()
        assert f"The launcher (pid {proc.pid}) is gone" in text, text
        assert f"Stopped by the death of the launcher (pid {proc.pid})" in text
        assert load(state_file)["counters"]["cur_nimg"] > first  # the stop wrote a checkpoint where it stopped
    finally:
        libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)
        for w in workers:
            if running(w):
                os.kill(w, signal.SIGKILL)
                os.waitpid(w, 0)
