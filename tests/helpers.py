"""Helpers shared by the test modules (their shared pytest fixtures are in conftest.py): tiny networks, training
subprocesses, exact comparison of states, test detectors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import _metrics_dist_worker as W
from faults import train_script
from networks.discriminator import Discriminator
from networks.factory import build_networks
from networks.generator import Generator
from training.config import ModelConfig
from training.augment import AugmentPipe, presets
from training.eval.inception import load_detector
from training.loss import StyleGAN2Loss

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# The tiny preset shrunk for subprocess training runs on one CPU thread: no metrics, reference ops, no augmentation.
TINY = ["model=tiny", "train=test", "log.progress=false", "model.channel_base=256", "model.channel_max=32",
        "data.num_images=256", "metrics=none", "train.ops_impl=ref",
        "aug=noaug", "train.cpu_threads=1"]


# The environment of a script run as a subprocess in `cwd`: unbuffered output, one OpenMP thread, offline, the
# cache in `cwd`; `extra` adds or replaces variables.
def script_env(cwd, **extra) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", GANFORGE_OFFLINE="1",
                GANFORGE_CACHE=str(Path(cwd) / "cache"), **extra)


# scripts/train.py in a subprocess in `cwd` (script_env, plus the variables `env`; a GANFORGE_TEST_* fault among
# them runs tests/train_with_faults.py instead); `check` turns a failure into an AssertionError showing the end of
# its output.
def run_train(args, cwd, check=True, launcher=None, timeout=600, **env):
    cmd = (launcher or [PY]) + [train_script(ROOT, env)] + args
    proc = subprocess.run(cmd, cwd=cwd, env=script_env(cwd, **env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# A 32-px G and D small enough for one CPU thread (the tiny preset's shape), in training mode.
def tiny_nets(seed=0):
    torch.manual_seed(seed)
    G = Generator(z_dim=32, c_dim=0, w_dim=32, img_resolution=32, img_channels=3, mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(channel_base=512, channel_max=32, conv_clamp=256))
    D = Discriminator(c_dim=0, img_resolution=32, img_channels=3, channel_base=512, channel_max=32, conv_clamp=256,
                      mbstd_group_size=4)
    return G.train(), D.train()


# The networks of a run before its first step: the loop's seed and constructor arguments (32 px synthetic data).
def tiny_nets_like(state):
    cfg = json.loads(state["config"])
    torch.manual_seed(cfg["train"]["seed"])
    G, D, _ = build_networks(ModelConfig(**cfg["model"]), 32, 3, 0)
    return G, D


# Stats and gradients of the four phases on the same weights, inputs and random draws (ADA at p = 0.5, mixing,
# noise), under the current ops impl and an optional CPU autocast dtype / grad scaler.
def four_phases(autocast_dtype=None, grad_scaler=None):
    G, D = tiny_nets()
    pipe = AugmentPipe(**presets("bgc"))
    pipe.set_p(0.5)
    kw = {}
    if autocast_dtype is not None:
        kw["autocast"] = lambda: torch.autocast("cpu", dtype=autocast_dtype)
    loss = StyleGAN2Loss(G, D, augment_pipe=pipe, r1_gamma=1.0, pl_weight=2.0, grad_scaler=grad_scaler, **kw)
    torch.manual_seed(1)
    real, z, c = torch.rand(8, 3, 32, 32) * 2 - 1, torch.randn(8, 32), torch.zeros(8, 0)
    stats, grads = {}, {}
    for phase in ("Gmain", "Greg", "Dmain", "Dreg"):
        module = G if phase.startswith("G") else D
        module.requires_grad_(True)
        torch.manual_seed(2)
        stats.update({k: float(v) for k, v in loss.accumulate_gradients(phase, real, c, z, c, gain=1).items()})
        grads[phase] = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
        module.zero_grad(set_to_none=True)
        module.requires_grad_(False)
    return stats, grads


# Every tensor and value of two nested structures, compared exactly; returns how many tensors were compared.
def assert_same(a, b, path="state") -> int:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
        return 1
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        return sum(assert_same(a[k], b[k], f"{path}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        return sum(assert_same(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"
    return 0


# A TinyDetector (tests/_metrics_dist_worker.py) saved as TorchScript in tmp_path; returns its path.
def save_tiny_detector(tmp_path, dim=2048, name="tiny-detector.pt"):
    path = str(tmp_path / name)
    torch.jit.save(torch.jit.script(W.TinyDetector(dim=dim)), path)
    return path


# Wrap detector.features to count the images it sees.
def count_calls(detector):
    counter = {"images": 0}
    inner = detector.features

    def counting(img, **kw):
        counter["images"] += img.shape[0]
        return inner(img, **kw)
    detector.features = counting
    return counter


# A TinyDetector of `dim` features saved in tmp_path and loaded on the CPU, with a counter of the images it sees.
def counted_detector(tmp_path, dim=16):
    det = load_detector(save_tiny_detector(tmp_path, dim=dim), device="cpu")
    return det, count_calls(det)
