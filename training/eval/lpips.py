"""LPIPS (Zhang et al. 2018) on VGG16: our own module or NVIDIA's TorchScript vgg16.pt, and where the weights come from."""
import os

import torch
import torch.nn as nn
from torchvision.models.vgg import cfgs, make_layers

from training import dist
from training.errors import RunTimeFailure
from training.io.files import load_dict, load_torchscript
from training.io.weights import (cache_root, download as _download, is_torchscript, not_found_text,  # noqa: F401
                                 offline_env)

# The weight files users have, and where they are published.
NVIDIA_FILE = "vgg16.pt"
NVIDIA_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt"
TV_FILE = "vgg16-397923af.pth"
TV_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LIN_FILE = "vgg.pth"
LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"

# torchvision's VGG16 `features` indices after which LPIPS taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAP_INDICES = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS' input scaling for images in [-1, 1]: (x - shift) / scale, per RGB channel.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


class PerceptualWeightsNotFound(RunTimeFailure, FileNotFoundError):
    """Raised when no perceptual weights can be found or fetched; says which files, URLs and settings to use."""
    pass


class VGG16LPIPS(nn.Module):
    """LPIPS-VGG16 as one module with NVIDIA's calling convention: images in [0, 255] -> per-layer channel-normalized
    features scaled by sqrt(lin weight / (H*W)) and concatenated, so that ||f(a) - f(b)||^2 is LPIPS(a, b)."""
    def __init__(self):
        super().__init__()
        features = make_layers(cfgs["D"], batch_norm=False)  # torchvision's vgg16().features, same indices
        bounds = (0,) + tuple(i + 1 for i in TAP_INDICES)
        self.slices = nn.ModuleList(nn.Sequential(*[features[j] for j in range(a, b)])
                                    for a, b in zip(bounds[:-1], bounds[1:]))
        self.lins = nn.ParameterList(nn.Parameter(torch.ones(1, c, 1, 1)) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))

    def load_weights(self, vgg_state: dict, lin_state: dict, vgg_name: str = "vgg16", lin_name: str = "lin"):
        """Load torchvision's VGG16 state dict (keys features.N.weight/bias; classifier keys ignored) and the LPIPS
        linear layers (keys linK.model.1.weight, [1, C, 1, 1], non-negative)."""
        feats = {k[len("features."):]: v for k, v in vgg_state.items() if k.startswith("features.")}
        want = {}
        for s, a in zip(self.slices, (0,) + tuple(i + 1 for i in TAP_INDICES)):
            for name, p in s.named_parameters():
                j, kind = name.split(".")
                want[f"{int(j) + a}.{kind}"] = p
        missing = sorted(set(want) - set(feats), key=lambda k: int(k.split(".")[0]))
        if missing:
            raise ValueError(f"{vgg_name}: not a torchvision VGG16 state dict; missing keys "
                             f"{['features.' + k for k in missing[:4]]} (expected {TV_FILE} from {TV_URL})")
        for k, p in want.items():
            if feats[k].shape != p.shape:
                raise ValueError(f"{vgg_name}: features.{k} has shape {tuple(feats[k].shape)}, "
                                 f"expected {tuple(p.shape)} (VGG16)")
            p.data.copy_(feats[k])
        for i, c in enumerate(TAP_CHANNELS):
            key = f"lin{i}.model.1.weight"
            if key not in lin_state:
                raise ValueError(f"{lin_name}: missing key {key!r}; expected the LPIPS VGG linear layers "
                                 f"({LIN_FILE} from {LIN_URL}) with keys lin0..lin4.model.1.weight")
            w = lin_state[key]
            if tuple(w.shape) != (1, c, 1, 1):
                raise ValueError(f"{lin_name}: {key} has shape {tuple(w.shape)}, expected (1, {c}, 1, 1)")
            if (w < 0).any():
                raise ValueError(f"{lin_name}: {key} has negative weights; LPIPS linear weights are non-negative")
            self.lins[i].data.copy_(w)
        return self

    def taps(self, img: torch.Tensor) -> list:
        """The five tapped activations of images in [0, 255] (LPIPS input scaling applied)."""
        x = (img.to(torch.float32) / 127.5 - 1 - self.shift) / self.scale
        out = []
        for s in self.slices:
            x = s(x)
            out.append(x)
        return out

    def forward(self, img: torch.Tensor, resize_images: bool = False, return_lpips: bool = True) -> torch.Tensor:
        """NVIDIA's calling convention; only resize_images=False and return_lpips=True are supported."""
        if resize_images or not return_lpips:
            raise ValueError("VGG16LPIPS supports only resize_images=False, return_lpips=True")
        parts = []
        for f, lin in zip(self.taps(img), self.lins):
            f = f / (f.square().sum(dim=1, keepdim=True).sqrt() + EPS)
            parts.append((f * (lin / (f.shape[2] * f.shape[3])).sqrt()).flatten(1))
        return torch.cat(parts, dim=1)

    def lpips(self, img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
        """LPIPS written out as in the paper: unit-normalize channels, squared difference, 1x1 linear weights, spatial
        mean, sum over layers. Returns [N]."""
        total = 0
        for f0, f1, lin in zip(self.taps(img0), self.taps(img1), self.lins):
            f0 = f0 / (f0.square().sum(dim=1, keepdim=True).sqrt() + EPS)
            f1 = f1 / (f1.square().sum(dim=1, keepdim=True).sqrt() + EPS)
            total = total + ((f0 - f1).square() * lin).sum(dim=1).mean(dim=[1, 2])
        return total


class Perceptual:
    """The perceptual distance used by the projector, whichever file it came from: `features(img_0_255)` gives vectors
    whose squared L2 distance is LPIPS; `distance(a, b)` does that per sample."""
    def __init__(self, net, kind: str, source: str, device="cpu"):
        self.net = net.eval().to(device)
        for p in self.net.parameters():  # (ScriptModules have no requires_grad_)
            p.requires_grad_(False)
        self.kind = kind      # 'torchscript' (NVIDIA's vgg16.pt) or 'state_dict' (torchvision VGG16 + LPIPS lin)
        self.source = source  # the file(s), for the output's settings
        self.device = torch.device(device)

    def features(self, img: torch.Tensor) -> torch.Tensor:
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"LPIPS expects RGB images [N, 3, H, W] in [0, 255], got {tuple(img.shape)}")
        out = self.net(img.to(self.device, torch.float32), resize_images=False, return_lpips=True)
        if out.ndim != 2 or out.shape[0] != img.shape[0]:
            raise ValueError(f"LPIPS network {self.source} returned shape {tuple(out.shape)}, "
                             f"expected [{img.shape[0]}, D]")
        return out

    @staticmethod
    def distance(f0: torch.Tensor, f1: torch.Tensor) -> torch.Tensor:
        return (f0 - f1).square().sum(dim=1)

    def __call__(self, img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
        return self.distance(self.features(img0), self.features(img1))


# The message of PerceptualWeightsNotFound: the reason, where we looked, the files, URLs and settings.
def _not_found_message(reason: str, searched) -> str:
    return (not_found_text("LPIPS weights", reason, searched) +
            f"Provide either\n"
            f"  (a) {NVIDIA_FILE} (NVIDIA TorchScript VGG16+LPIPS): {NVIDIA_URL}\n"
            f"      with --vgg16 <path> or GANFORGE_VGG16=<path>, or\n"
            f"  (b) {TV_FILE} (torchvision VGG16): {TV_URL}\n"
            f"      plus {LIN_FILE} (LPIPS linear layers): {LIN_URL}\n"
            f"      with --vgg16 <path> --lpips-lin <path> or GANFORGE_VGG16 / GANFORGE_LPIPS_LIN,\n"
            f"or put the file(s) in the cache directory {cache_root()} (set by GANFORGE_CACHE); "
            f"downloads happen only when online and GANFORGE_OFFLINE is not set. "
            f"Without LPIPS, `--loss fallback` projects with a pixel + discriminator-feature loss.")


# An existing file from an explicit setting, or PerceptualWeightsNotFound naming the setting.
def _explicit(path: str, how: str) -> str:
    p = os.path.expanduser(path)
    if not os.path.isfile(p):
        raise PerceptualWeightsNotFound(_not_found_message(f"{how}={path!r} is not a file", [p]))
    return p


# Find (and fetch if allowed) one missing file among `candidates`, else download `url`, else raise.
def _find_or_fetch(candidates, url, cache_dir, allow_download, what):
    for p in candidates:
        if os.path.isfile(p):
            return p
    if not allow_download:
        raise PerceptualWeightsNotFound(_not_found_message(
            f"no {what} found and downloads are off (GANFORGE_OFFLINE or offline), so {url} was not fetched",
            candidates))
    try:
        return _download(url, cache_dir)
    except Exception as e:  # no network, HTTP or disk error: say so
        raise PerceptualWeightsNotFound(_not_found_message(
            f"download of {url} failed ({type(e).__name__}: {e})", candidates)) from e


def resolve_weights(vgg16=None, lpips_lin=None, cache_dir=None, allow_download=None) -> tuple:
    """Resolve the weights: explicit paths -> $GANFORGE_VGG16 / $GANFORGE_LPIPS_LIN -> cache dir (NVIDIA's file, or
    torchvision's + the lin layers; torchvision's also from torch hub's cache) -> download -> error. Returns
    ('torchscript', path, None) or ('state_dict', vgg_path, lin_path)."""
    if allow_download is None:
        allow_download = not offline_env()
    explicit_cache = cache_dir is not None or "GANFORGE_CACHE" in os.environ
    cache_dir = cache_dir or cache_root()
    vgg = _explicit(vgg16, "--vgg16") if vgg16 else (
        _explicit(os.environ["GANFORGE_VGG16"], "GANFORGE_VGG16") if os.environ.get("GANFORGE_VGG16") else None)
    lin = _explicit(lpips_lin, "--lpips-lin") if lpips_lin else (
        _explicit(os.environ["GANFORGE_LPIPS_LIN"], "GANFORGE_LPIPS_LIN")
        if os.environ.get("GANFORGE_LPIPS_LIN") else None)
    if vgg is not None and is_torchscript(vgg):
        return ("torchscript", vgg, None)
    tv_candidates = [os.path.join(cache_dir, TV_FILE)]
    if not explicit_cache:  # torchvision users already have the file in torch hub's cache
        tv_candidates.append(os.path.join(torch.hub.get_dir(), "checkpoints", TV_FILE))
    lin_candidates = [os.path.join(cache_dir, LIN_FILE)]
    if vgg is None and lin is None:
        nvidia = os.path.join(cache_dir, NVIDIA_FILE)
        if os.path.isfile(nvidia):
            return ("torchscript", nvidia, None)
        have_tv = next((p for p in tv_candidates if os.path.isfile(p)), None)
        if have_tv is None:  # nothing local: fetch NVIDIA's single file, the published projector's choice
            return ("torchscript", _find_or_fetch([nvidia] + tv_candidates, NVIDIA_URL, cache_dir,
                                                  allow_download, "VGG16 weights"), None)
        vgg = have_tv
    if vgg is None:
        vgg = _find_or_fetch(tv_candidates, TV_URL, cache_dir, allow_download, f"{TV_FILE} (for --lpips-lin)")
    if lin is None:
        lin = _find_or_fetch(lin_candidates, LIN_URL, cache_dir, allow_download, f"{LIN_FILE} (for {vgg})")
    return ("state_dict", vgg, lin)


# The state dict file of the `what` weights, loaded without executing code.
def _load_state(path: str, what: str) -> dict:
    return load_dict(path, f"cannot load the {what} as a state dict", f"a state dict for the {what}")


def load_files(kind: str, vgg_path: str, lin_path=None, device="cpu") -> Perceptual:
    """Build the Perceptual from resolved files."""
    if kind == "torchscript":
        return Perceptual(load_torchscript(vgg_path), "torchscript", vgg_path, device)
    net = VGG16LPIPS().load_weights(_load_state(vgg_path, "torchvision VGG16"),
                                    _load_state(lin_path, "LPIPS linear layers"), vgg_path, lin_path)
    return Perceptual(net, "state_dict", f"{vgg_path} + {lin_path}", device)


def load_lpips(vgg16=None, lpips_lin=None, cache_dir=None, device="cpu", allow_download=None) -> Perceptual:
    """Resolve and load LPIPS (see resolve_weights for the order); raises PerceptualWeightsNotFound.

    In multi-process runs rank 0 resolves (and downloads) alone and tells the others (dist.rank0_decides).
    """
    kind, vgg_path, lin_path = dist.rank0_decides(
        lambda: resolve_weights(vgg16, lpips_lin, cache_dir, allow_download), PerceptualWeightsNotFound)
    if not os.path.isfile(vgg_path) or (lin_path and not os.path.isfile(lin_path)):
        kind, vgg_path, lin_path = resolve_weights(vgg16, lpips_lin, cache_dir, allow_download=False)
    return load_files(kind, vgg_path, lin_path, device)
