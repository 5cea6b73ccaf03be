"""The FID Inception-v3 feature detector: our own network, NVIDIA's TorchScript file, and where the weights come from."""
import contextlib
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from training import dist
from training.errors import RunTimeFailure
from training.io.weights import (cache_root, download as _download, file_sha256,  # noqa: F401
                              is_torchscript as _is_torchscript, offline_env)

# The two weight files users have, and where they are published.
NVIDIA_FILE = "inception-2015-12-05.pt"
NVIDIA_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
PTFID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PTFID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
KNOWN_FILES = (NVIDIA_FILE, PTFID_FILE)
# File downloaded when nothing is found locally: NVIDIA's, the convention StyleGAN papers report.
DEFAULT_URL = NVIDIA_URL
FEATURE_DIM = 2048


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
    """The FID Inception-v3 (TF 2015-12-05 graph): uint8 [N,3,H,W] -> bilinear 299x299 -> [-1,1] -> pool3 [N,2048].
    Attribute names follow torchvision/pytorch-fid so pytorch-fid's weight file loads with strict=True (`fc`, the
    1008-way classifier, is kept only for that; features never use it)."""
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

    def forward(self, img: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        if not return_features:
            raise ValueError("FIDInceptionV3 only computes pool3 features (return_features=True)")
        x = img.to(torch.float32)
        if x.shape[2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (x / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)  # ~1.5x faster convs on CPU
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                     "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))


class Detector:
    """One interface over both file kinds: `features(img_uint8 [N,C,H,W]) -> float32 [N,2048]` on the detector's
    device. `id` ("<file>:<sha256[:16]>") labels every metric result, so numbers from different files are never
    mixed."""
    def __init__(self, net, kind: str, file_name: str, sha256: str, device):
        self.net = net.eval().to(device)
        if kind == "state_dict":
            self.net = self.net.to(memory_format=torch.channels_last)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.kind = kind                       # 'torchscript' (NVIDIA file, called as-is) or 'state_dict' (ours)
        self.file_name = file_name
        self.sha256 = sha256
        self.id = f"{file_name}:{sha256[:16]}"
        self.device = torch.device(device)
        self.feature_dim = FEATURE_DIM
        # How inputs are resized, part of the dataset-stats cache key.
        self.resize = "bilinear299" if kind == "state_dict" else "torchscript-internal"
        if kind == "torchscript":  # learn its feature size now, so every rank agrees before any batch
            self.features(torch.zeros((1, 3, 32, 32), dtype=torch.uint8))

    def features(self, img: torch.Tensor) -> torch.Tensor:
        if img.dtype != torch.uint8 or img.ndim != 4 or img.shape[1] not in (1, 3):
            raise ValueError(f"Detector.features expects uint8 [N,1|3,H,W] images, got {img.dtype} {tuple(img.shape)}")
        if img.shape[1] == 1:
            img = img.repeat(1, 3, 1, 1)
        # Full fp32 (no TF32 on Ampere+), as the reference implementations compute these features.
        with full_fp32(), torch.no_grad():
            out = self.net(img.to(self.device), return_features=True)
        if out.ndim != 2 or out.shape[0] != img.shape[0]:
            raise ValueError(f"detector {self.id} returned shape {tuple(out.shape)}, expected [{img.shape[0]}, D]")
        self.feature_dim = int(out.shape[1])
        return out.to(torch.float32)

    __call__ = features


# The message of DetectorNotFound: the file names, the URLs, and the settings to point at a file.
def _not_found_message(reason: str, searched) -> str:
    where = "\n".join(f"    {p}" for p in searched) or "    (nowhere)"
    return (f"Inception detector not found: {reason}\nLooked in:\n{where}\n"
            f"Get one of these files and point ganforge at it:\n"
            f"  {NVIDIA_FILE} (NVIDIA TorchScript): {NVIDIA_URL}\n"
            f"  {PTFID_FILE} (pytorch-fid state dict): {PTFID_URL}\n"
            f"with `metrics.detector=<path>` (config), `--detector <path>` (scripts/calc_metrics.py) "
            f"or the environment variable GANFORGE_INCEPTION=<path>, or put it in the cache directory "
            f"({cache_root()}, set by GANFORGE_CACHE).")


def resolve_detector_path(path_or_url=None, cache_dir=None, allow_download=None) -> str:
    """Find the detector file: explicit path/URL -> $GANFORGE_INCEPTION -> cache dir -> download (unless offline).
    """
    if allow_download is None:
        allow_download = not offline_env()
    explicit_cache = cache_dir is not None or "GANFORGE_CACHE" in os.environ
    cache_dir = cache_dir or cache_root()
    source = path_or_url or os.environ.get("GANFORGE_INCEPTION") or None
    how = "metrics.detector" if path_or_url else "GANFORGE_INCEPTION"
    url = None
    if source:
        if "://" not in source:
            path = os.path.expanduser(source)
            if os.path.isfile(path):
                return path
            raise DetectorNotFound(_not_found_message(f"{how}={source!r} is not a file", [path]))
        url = source
        cached = os.path.join(cache_dir, os.path.basename(url.split("?")[0]))
        if os.path.isfile(cached):
            return cached
    else:
        searched = [os.path.join(cache_dir, name) for name in KNOWN_FILES]
        if not explicit_cache:  # pytorch-fid users already have its file in torch hub's cache
            searched.append(os.path.join(torch.hub.get_dir(), "checkpoints", PTFID_FILE))
        for path in searched:
            if os.path.isfile(path):
                return path
        url = DEFAULT_URL
    searched = [os.path.join(cache_dir, os.path.basename(url.split("?")[0]))]
    if not allow_download:
        raise DetectorNotFound(_not_found_message(
            f"no file found and downloads are off (offline mode, GANFORGE_OFFLINE) so {url} was not fetched",
            searched if source else [os.path.join(cache_dir, n) for n in KNOWN_FILES]))
    try:
        return _download(url, cache_dir)
    except Exception as e:  # no network, HTTP error, disk error: say so, never fall back to other features
        raise DetectorNotFound(_not_found_message(f"download of {url} failed ({type(e).__name__}: {e})",
                                                  searched)) from e


def load_detector_file(path: str, device=None) -> Detector:
    """Load the detector from a resolved file: TorchScript is used as-is, a state dict goes into FIDInceptionV3."""
    device = device if device is not None else dist.device()
    name, sha = os.path.basename(path), file_sha256(path)
    if path.endswith(".pkl"):
        raise ValueError(f"{path}: NVIDIA's pickled detector is not supported (it needs their code); "
                         f"use the TorchScript file {NVIDIA_FILE} from {NVIDIA_URL}")
    if _is_torchscript(path):
        with warnings.catch_warnings():  # TorchScript is deprecated, but NVIDIA's file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(path, map_location="cpu")
        return Detector(net, "torchscript", name, sha, device)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: neither a TorchScript archive nor a loadable state dict ({e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (mapping of tensor names), got {type(state).__name__}")
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
