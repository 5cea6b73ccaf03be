"""Tests of the training loader (order, resume, RNG, workers) and of the fast synthetic renderer."""
import io
import json
import os
import random
import subprocess
import sys
import time
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from training.data import loader as loader_mod
from training.data.dataset import ImageDataset
from training.data.loader import default_num_workers, make_loader
from training.data.sampler import InfiniteSampler
from training.data.synthetic import SHAPES, SyntheticDataset, _inside, render, scene

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


# A straightforward reference renderer: supersample every pixel (4x4, 2x2 above 256 px), average (the scene's random
# draws are the dataset's own; only how the pixels are computed differs from render()).
def reference_render(index, resolution, num_classes=4, seed=0):
    shape, fg, top, bottom, half, cx, cy = scene(index, num_classes, seed)
    r = resolution
    ss = 4 if r <= 256 else 2
    t = (np.arange(r * ss, dtype=np.float32) + 0.5) / (r * ss)
    mask = _inside(shape, t[None, :], t[:, None], cx, cy, half)
    cover = mask.reshape(r, ss, r, ss).mean(axis=(1, 3), dtype=np.float32)
    yc = (np.arange(r, dtype=np.float32) + 0.5) / r
    bg = top[:, None] * (1.0 - yc[None, :]) + bottom[:, None] * yc[None, :]
    img = bg[:, :, None] * (1.0 - cover[None]) + fg[:, None, None] * cover[None]
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# A zip of PNGs with class labels in dataset.json, as scripts/dataset_tool.py writes it.
def _png_zip(path, n=24, res=16):
    src = SyntheticDataset(resolution=res, num_images=n, num_classes=6)
    labels = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for i in range(n):
            buf = io.BytesIO()
            PIL.Image.fromarray(src[i][0].transpose(1, 2, 0)).save(buf, format="PNG")
            name = f"00000/img{i:08d}.png"
            zf.writestr(name, buf.getvalue())
            labels.append([name, src.get_class(i)])
        zf.writestr("dataset.json", json.dumps({"labels": labels}))
    return str(path)


# `n` batches from make_loader, as (images, labels) tensors concatenated over the batches.
def _take(dataset, n, batch=4, workers=0, start=0, rank=0, world=1, seed=3):
    sampler = InfiniteSampler(len(dataset), rank=rank, num_replicas=world, seed=seed, start=start)
    it = make_loader(dataset, sampler, batch, workers, CPU, seed)
    out = [next(it) for _ in range(n)]
    del it
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


# A dataset whose items report the process and its torch thread count, for the worker checks.
class _ProbeDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, idx):
        return np.zeros([1, 1, 1], dtype=np.uint8), np.array([os.getpid(), torch.get_num_threads()], np.float32)


# True while process `pid` exists and is not a zombie.
def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# The fast renderer gives the same bytes as the reference, for every shape, many scenes and every resolution.
@pytest.mark.parametrize("res,count", [(8, 120), (16, 120), (32, 120), (64, 120), (128, 60), (256, 48),
                                       (512, 8), (1024, 6)])
def test_render_matches_reference(res, count):
    for i in range(count):
        seed = (i * 7919) % 5 if i % 2 else 2**32 - 1 - i
        a, b = render(i, res, num_classes=6, seed=seed), reference_render(i, res, num_classes=6, seed=seed)
        assert a.dtype == np.uint8 and a.shape == (3, res, res)
        assert np.array_equal(a, b), f"index {i} ({SHAPES[i % 6]}) seed {seed} at {res} px differs"


# The reused, reseeded RandomState behind scene() draws exactly what a fresh RandomState([seed, index]) draws,
# whatever was drawn before (the dataset's scenes did not change with it).
def test_reseeded_rng_draws_like_a_fresh_one():
    from training.data.synthetic import _rng
    for seed, index in ((0, 0), (3, 17), (2**32 - 2, 5), (0, 0)):
        _rng([seed + 1, index]).random_sample(7)  # something else drawn first
        assert np.array_equal(_rng([seed, index]).random_sample(12),
                              np.random.RandomState([seed, index]).random_sample(12))


# Batches are bit-identical with 0 and 2 workers (sampler order kept), for the synthetic and a zip dataset;
# images stay uint8 [N, C, H, W] and labels float32 [N, L].
def test_workers_give_identical_batches(tmp_path):
    for ds in (SyntheticDataset(resolution=16, num_images=40, num_classes=6, use_labels=True, xflip=True),
               ImageDataset(_png_zip(tmp_path / "d.zip"), use_labels=True, xflip=True)):
        img0, c0 = _take(ds, 12, batch=5, workers=0)
        img2, c2 = _take(ds, 12, batch=5, workers=2)
        assert img0.dtype == torch.uint8 and img0.shape == (60, 3, 16, 16)
        assert c0.dtype == torch.float32 and c0.shape == (60, 6)
        assert torch.equal(img0, img2) and torch.equal(c0, c2)
        idx = [i for i, _ in zip(InfiniteSampler(len(ds), seed=3), range(60))]
        assert torch.equal(img0, torch.stack([torch.from_numpy(ds[i][0]) for i in idx]))


# A loader started at stream position k (any k, with ranks) continues the stream exactly.
def test_start_continues_the_stream():
    ds = SyntheticDataset(resolution=8, num_images=23, use_labels=True)
    for world, rank in ((1, 0), (2, 1)):
        full, c_full = _take(ds, 10, batch=4, rank=rank, world=world)
        for k, workers in ((8, 0), (7, 2), (25, 1)):
            part, c_part = _take(ds, 3, batch=3, workers=workers, start=k, rank=rank, world=world)
            assert torch.equal(part, full[k:k + 9]) and torch.equal(c_part, c_full[k:k + 9])


# Iterating the loader, with or without workers, leaves the global torch, numpy and Python RNGs untouched.
def test_no_global_rng_draw():
    ds = SyntheticDataset(resolution=8, num_images=16)
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    for workers in (0, 2):
        _take(ds, 5, workers=workers)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), states[1]))
    assert random.getstate() == states[2]


# Workers run at 1 torch thread and are gone as soon as the iterator is dropped (no garbage collection needed).
def test_workers_one_thread_and_shut_down_on_drop():
    it = make_loader(_ProbeDataset(), InfiniteSampler(1000, seed=0), 4, 2, CPU, 0)
    labels = torch.cat([next(it)[1] for _ in range(6)])
    pids = set(int(p) for p in labels[:, 0].tolist())
    assert len(pids) == 2 and os.getpid() not in pids
    assert labels[:, 1].eq(1).all()
    assert all(_alive(p) for p in pids)
    del it
    assert not any(_alive(p) for p in pids)


# Workers do not outlive a killed training process: they watch their parent and exit within ~5 s.
def test_workers_exit_when_parent_is_killed():
    code = ("import os, sys, time, torch\n"
            "from training.data.loader import make_loader\nfrom training.data.sampler import InfiniteSampler\n"
            "from tests.test_loader import _ProbeDataset\n"
            "it = make_loader(_ProbeDataset(), InfiniteSampler(1000), 4, 2, torch.device('cpu'), 0)\n"
            "pids = {int(p) for _ in range(4) for p in next(it)[1][:, 0].tolist()}\n"
            "print(' '.join(map(str, pids)), flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 15
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


# The automatic worker count: a core per worker in this process's share, one core kept, at most 8; none on CPU;
# the local process count from LOCAL_WORLD_SIZE.
def test_default_num_workers(monkeypatch):
    assert 1 <= loader_mod._cores() <= os.cpu_count()
    monkeypatch.setattr(loader_mod, "_cores", lambda: 16)
    assert default_num_workers("cuda", 1) == 8
    assert default_num_workers("cuda", 2) == 7
    assert default_num_workers("cuda", 4) == 3
    assert default_num_workers("cuda", 8) == 1
    assert default_num_workers("cuda", 16) == 1
    assert default_num_workers("cuda", 0) == 8
    assert default_num_workers("cpu", 1) == 0
    monkeypatch.setattr(loader_mod, "_cores", lambda: 2)
    assert default_num_workers("cuda", 1) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_mod.local_process_count() == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loader_mod.local_process_count() == 1
