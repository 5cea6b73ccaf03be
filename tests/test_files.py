"""Tests for training/io/files.py (atomic writes, loads without code, strict loads) and dist.rank0_decides."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from tests import official_builder as ob
from training import dist
from training.eval import metrics
from training.io import checkpoint as ckpt
from training.io import files, weights
from training.io.files import FileWriteError, atomic_open, atomic_write, load_dict, load_strict, load_torchscript

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Set the process umask for one test.
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


class Boom(Exception):
    pass


# Raise `error` (for lambdas).
def throw(error):
    raise error


# The file appears complete or not at all: a write_fn that fails half-way leaves the old content, and no temporary.
def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def half(f):
        f.write(b"new, but not all of it")
        raise Boom("in the middle")
    with pytest.raises(Boom):
        atomic_write(path, half)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]
    # A new file that fails is not created at all.
    with pytest.raises(Boom):
        atomic_write(tmp_path / "b.bin", half)
    assert os.listdir(tmp_path) == ["a.bin"]
    # Text mode, and a folder that does not exist yet.
    atomic_write(tmp_path / "sub" / "c.json", lambda f: json.dump({"é": 1}, f), mode="w")
    assert json.loads((tmp_path / "sub" / "c.json").read_text("utf-8")) == {"é": 1}


# An OSError in the write (disk full) becomes FileWriteError naming the file (the checkpoint code's
# CheckpointWriteError is the same class); the old file stays.
def test_disk_full_is_a_file_write_error(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def full(f):
        raise OSError(28, "No space left on device")
    with pytest.raises(FileWriteError, match=r"a\.bin: disk full.*intact") as info:
        atomic_write(path, full)
    assert info.value.errno == 28 and isinstance(info.value, ckpt.CheckpointWriteError)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


# The data is fsynced before the rename, through a descriptor of the temporary file.
def test_fsync_before_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_size)), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.path.basename(b))),
                                                     real_replace(a, b)))
    atomic_write(tmp_path / "x.bin", lambda f: f.write(b"12345"))
    assert events == [("fsync", 5), ("replace", "x.bin")]


# The finished file has the mode a plain open gives (0o666 & ~umask), not tempfile's 0o600.
def test_mode_follows_the_umask(tmp_path, umask_022):
    atomic_write(tmp_path / "x.bin", lambda f: f.write(b"1"))
    assert os.stat(tmp_path / "x.bin").st_mode & 0o777 == 0o644
    os.umask(0o077)
    atomic_write(tmp_path / "y.bin", lambda f: f.write(b"1"))
    assert os.stat(tmp_path / "y.bin").st_mode & 0o777 == 0o600


# metric-<name>-best.json and the dataset-stats cache go through the same write: normal mode, complete.
def test_best_json_and_stats_cache_have_the_normal_mode(tmp_path, umask_022):
    record = {"metric": "fid50k_full", "value": 3.0, "detector_hash": "h", "resolution": 32}
    assert metrics.update_best(str(tmp_path), record)
    best = tmp_path / "metric-fid50k_full-best.json"
    assert os.stat(best).st_mode & 0o777 == 0o644 and json.loads(best.read_text()) == record
    stats = metrics.FeatureStats(capture_all=True)
    stats.append(np.ones((3, 4), np.float32))
    stats.save(str(tmp_path / "cache" / "s.npz"), {"k": 1})
    assert os.stat(tmp_path / "cache" / "s.npz").st_mode & 0o777 == 0o644
    assert metrics.FeatureStats.load(str(tmp_path / "cache" / "s.npz"))[0].num_items == 3
    assert sorted(os.listdir(tmp_path)) == ["cache", best.name]


# A file written by path (a downloader replacing the temporary file) is committed the same way; a failed download
# leaves nothing behind.
def test_download_is_atomic(tmp_path, monkeypatch, umask_022):
    def fetch(url, dst, progress=True):
        assert os.path.basename(dst).startswith(".w.pt.") and dst.endswith(".tmp")
        tmp = dst + ".partial"
        with open(tmp, "wb") as f:
            f.write(b"weights")
        os.chmod(tmp, 0o600)
        os.replace(tmp, dst)
    monkeypatch.setattr(weights, "transfer", fetch)
    path = weights.download("https://example.com/w.pt?x=1", str(tmp_path / "d"))
    assert path == str(tmp_path / "d" / "w.pt") and open(path, "rb").read() == b"weights"
    assert os.stat(path).st_mode & 0o777 == 0o644 and os.listdir(tmp_path / "d") == ["w.pt"]

    def fail(url, dst, progress=True):
        raise weights.DownloadError("no network")
    monkeypatch.setattr(weights, "transfer", fail)
    with pytest.raises(weights.DownloadError):
        weights.download("https://example.com/v.pt", str(tmp_path / "d"))
    assert os.listdir(tmp_path / "d") == ["w.pt"]


# A temporary file left by a killed checkpoint write is recognised (and removed) by the stale-temp cleanup.
def test_stale_temps_of_checkpoints_are_recognised(tmp_path):
    kept = tmp_path / "notes.txt"
    kept.write_text("x")
    for name in ("training-state-000012.pt", "network-snapshot-000012.safetensors"):
        out = atomic_open(tmp_path / name)
        out.file.write(b"partial")
        out.file.close()  # (as a killed process would leave it)
        assert ckpt.TEMP_RE.match(out.temp_path.name) and files.temp_pattern(r"x\.pt").match(".x.pt.ab12.tmp")
    assert len(ckpt.remove_stale_temps(tmp_path)) == 2
    assert os.listdir(tmp_path) == ["notes.txt"]


# load_strict loads an exact match, and otherwise names the missing, unexpected and mis-shaped keys.
def test_load_strict():
    src, dst = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert load_strict(dst, src.state_dict(), "here") is dst and torch.equal(dst.weight, src.weight)
    bad = {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}
    with pytest.raises(KeyError, match=r"where: .*missing keys \[bias\].*unexpected keys \[extra\].*"
                                       r"mis-shaped keys \[weight: file \(2, 4\) vs network \(2, 3\)\]"):
        load_strict(dst, bad, "where", KeyError)
    assert torch.equal(dst.weight, src.weight)  # Nothing was loaded.
    many = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(10)])
    with pytest.raises(ValueError, match=r"missing keys \[0\.weight, .*3\.bias\] \(\+12 more\)"):
        load_strict(many, {}, "net")


# load_dict gives back a saved dict of tensors and plain data; a file torch cannot load, a pickle carrying code
# (without running it) and a non-dict are each the caller's error type with the caller's words and the file.
def test_load_dict(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(3.0), "n": 2, "names": ["a"]}, good)
    state = load_dict(good, "unreadable", "a dict")
    assert torch.equal(state["w"], torch.arange(3.0)) and (state["n"], state["names"]) == (2, ["a"])
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(KeyError, match=r"list\.pt: expected a dict of weights, got list"):
        load_dict(tmp_path / "list.pt", "unreadable", "a dict of weights", KeyError)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pt: cannot load the weights \(UnpicklingError: "):
        load_dict(tmp_path / "junk.pt", "cannot load the weights", "a dict")
    marker = tmp_path / "pwned"
    # Unpickling it would run `touch <marker>`.
    torch.save({"w": ob.GlobalRefCall(os.system, (f"touch {marker}",))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt: cannot load the weights \(UnpicklingError: "):
        load_dict(tmp_path / "evil.pt", "cannot load the weights", "a dict")
    with pytest.raises(ValueError, match=r"evil\.pt: refused to load: it holds objects other than tensors and "
                                         r"plain data, which could run code \(Weights only load failed"):
        load_dict(tmp_path / "evil.pt", "cannot load the weights", "a dict", refuse_code=True)
    assert not marker.exists()


# load_torchscript gives back a saved TorchScript module on the CPU (the same outputs), and no warning escapes it
# (torch's deprecation of TorchScript is not shown).
def test_load_torchscript(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(lin), str(tmp_path / "lin.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = load_torchscript(tmp_path / "lin.pt")
    x = torch.randn(4, 3)
    assert isinstance(net, torch.jit.ScriptModule) and net.weight.device.type == "cpu"
    assert torch.equal(net(x), lin(x))


# One process (no process group): rank0_decides is fn(): its value, or its exception as it is.
def test_rank0_decides_in_one_process():
    assert not dist.is_initialized()
    assert dist.rank0_decides(lambda: {"path": "a", "n": 3}, FileNotFoundError) == {"path": "a", "n": 3}
    error = FileNotFoundError("nothing at /x")
    with pytest.raises(FileNotFoundError, match="nothing at /x") as info:
        dist.rank0_decides(lambda: throw(error), FileNotFoundError)
    assert info.value is error
    with pytest.raises(Boom):
        dist.rank0_decides(lambda: throw(Boom()), FileNotFoundError)


# Two processes (gloo): rank 0 alone calls fn; every rank gets its value, or raises its (listed) error with its type
# and message; an unlisted error reaches rank 1 as a RuntimeError instead of leaving it waiting.
@pytest.mark.slow
def test_rank0_decides_in_two_processes(tmp_path):
    script = textwrap.dedent("""
        import json, os, sys
        import torch.distributed as td
        from training import dist
        from training.eval.inception import DetectorNotFound
        td.init_process_group("gloo", rank=int(sys.argv[1]), world_size=2)
        calls, out = [], []
        def counted(value):
            calls.append(1)
            return value
        def fail(e):
            raise e
        out.append(dist.rank0_decides(lambda: counted([dist.get_rank(), "x"]), DetectorNotFound))
        for e in (DetectorNotFound("no detector at /d"), OSError(28, "disk full"), KeyError("k")):
            try:
                dist.rank0_decides(lambda: fail(e), DetectorNotFound, OSError)
            except BaseException as got:
                out.append([type(got).__name__, str(got)])
        print(json.dumps({"calls": len(calls), "out": out}))
        td.destroy_process_group()
    """)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["calls"] for r in results] == [1, 0]
    for rank, r in enumerate(results):
        assert r["out"][0] == [0, "x"]
        assert r["out"][1] == ["DetectorNotFound", "no detector at /d"]
        assert r["out"][2] == ["OSError", "[Errno 28] disk full"]
    assert results[0]["out"][3] == ["KeyError", "'k'"]
    assert results[1]["out"][3] == ["RuntimeError", "rank 0 failed: KeyError: 'k'"]
