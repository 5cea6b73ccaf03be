"""Checkpoint helpers: tensor hashes (snapshot records, state digests, weight fingerprints) and CPU state dicts."""
import hashlib
import json
from pathlib import Path

import torch

from networks.factory import build_networks
from training.config import ModelConfig
from training.io.checkpoint import cpu_state_dict, state_digest, tensor_digests, tensor_sha256, tensors_sha256
from training.state import fingerprint

ROOT = Path(__file__).resolve().parents[1]
# A training state written by commit d85b71e: its content sha256 and its networks' fingerprints were computed then.
LEGACY = ROOT / "tests/data/training-state-d85b71e.pt"


# A module with parameters and buffers of several dtypes, one parameter in channels-last memory layout.
def small_module():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(5, 2))
    net[0].weight.data = net[0].weight.data.to(memory_format=torch.channels_last)
    net[1].running_mean.uniform_()
    return net


# The fingerprint algorithm written out: for each parameter, then each buffer, its name and its row-major bytes.
def fingerprint_by_hand(module) -> str:
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().numpy().tobytes(order="C"))
    return h.hexdigest()


# tensors_sha256 over a module's parameters then buffers is state.fingerprint, byte for byte: on a small module
# (float and int64 tensors, a channels-last one) and on the networks of a state written by d85b71e, whose recorded
# fingerprints it reproduces.
def test_tensors_sha256_is_the_weight_fingerprint():
    net = small_module()
    assert not net[0].weight.is_contiguous()
    named = list(net.named_parameters()) + list(net.named_buffers())
    assert tensors_sha256(named) == fingerprint(net) == fingerprint_by_hand(net)
    net[1].num_batches_tracked += 1  # any tensor changed: another digest
    assert tensors_sha256(named) != fingerprint_by_hand(small_module())
    legacy = torch.load(LEGACY, map_location="cpu", weights_only=True)
    config = json.loads(legacy["config"])
    nets = dict(zip(("G", "D", "G_ema"), build_networks(ModelConfig(**config["model"]), 16, 3, 0)))
    for name, module in nets.items():
        module.load_state_dict(legacy[name])
        digest = tensors_sha256(list(module.named_parameters()) + list(module.named_buffers()))
        assert digest == fingerprint(module) == legacy["fingerprints"][0][name], name


# tensor_sha256 is sha256 of "T<dtype><shape>:" and the bytes; the digests of a snapshot record and of a whole state
# are unchanged: the d85b71e state's content hash verifies.
def test_tensor_sha256_and_state_digest():
    t = torch.arange(12, dtype=torch.int16).reshape(3, 4).t()  # not contiguous
    expected = hashlib.sha256(b"Ttorch.int16(4, 3):" + t.contiguous().numpy().tobytes()).hexdigest()
    assert tensor_sha256(t) == expected
    assert tensor_digests({"a": t, "b": t.float()}) == {"a": expected, "b": tensor_sha256(t.contiguous().float())}
    assert tensor_sha256(t.float()) != tensor_sha256(t.double())  # the dtype is part of it
    assert tensor_sha256(t.reshape(-1)) != expected  # the shape too
    legacy = torch.load(LEGACY, map_location="cpu", weights_only=True)
    assert state_digest(legacy) == legacy["sha256"]


# cpu_state_dict: the module's state dict, detached on the CPU, sharing the module's storage; copy=True gives
# contiguous tensors of their own (what safetensors takes).
def test_cpu_state_dict():
    net = small_module()
    net[0].weight.requires_grad_(True)
    shared, copied = cpu_state_dict(net), cpu_state_dict(net, copy=True)
    assert list(shared) == list(copied) == list(net.state_dict())
    for k, v in net.state_dict().items():
        assert torch.equal(shared[k], v) and torch.equal(copied[k], v), k
        assert not shared[k].requires_grad and not copied[k].requires_grad
        assert copied[k].is_contiguous() and copied[k].data_ptr() != v.data_ptr(), k
        assert shared[k].data_ptr() == v.data_ptr(), k
    assert shared["0.weight"].stride() == net[0].weight.stride()  # the layout is the module's
    with torch.no_grad():
        net[2].bias.add_(1.0)
    assert torch.equal(shared["2.bias"], net[2].bias) and not torch.equal(copied["2.bias"], net[2].bias)
