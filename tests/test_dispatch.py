"""ops.dispatch's self-checking 'auto': planted wrong kernels are caught, one decision per key, ranks agree."""
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from helpers import TINY, four_phases, run_train, tiny_nets
import networks.generator as generator_module
import networks.layers as layers_module
import ops.bias_act as bias_act_module
import ops.upfirdn2d as upfirdn2d_module
from ops import dispatch
from ops.bias_act import bias_act
from ops.upfirdn2d import setup_filter, upfirdn2d

HERE = Path(__file__).resolve().parent


# Fresh decisions and the CPU extensions built once; one intra-op thread (tiny tensors, shared machine).
@pytest.fixture(autouse=True)
def _fresh():
    dispatch.reset()
    threads, old = torch.get_num_threads(), dispatch.default_impl()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    dispatch.set_default_impl(old)
    dispatch.reset()


# A fused function (ext first, then the reference's arguments) off by a relative 2^-16 (~500 float32 eps: "off by
# a little").
def _off_by_a_little(real):
    return lambda ext, *a, **k: real(ext, *a, **k) * (1 + 2.0 ** -16)


# A fused function that returns NaN everywhere.
def _nan(real):
    return lambda ext, *a, **k: real(ext, *a, **k) * float("nan")


# Replace op module `module`'s fused function (ops.dispatch.kernel checks and runs it) by plant(the real one).
def _plant(monkeypatch, module, plant):
    name = module.__name__.split(".")[-1] + "_fused"
    monkeypatch.setattr(module, name, plant(getattr(module, name)))


# bias_act and upfirdn2d calls with gradients, on fixed inputs: (outputs, gradients of a fixed weighting); impls
# per op.
def _calls(impl=None, impl_fir=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(True)
    b = torch.randn(4, generator=g).requires_grad_(True)
    f = setup_filter([1, 3, 3, 1])
    y1 = bias_act(x, b, act="lrelu", clamp=2.0, impl=impl)
    y2 = upfirdn2d(y1, f, up=2, padding=[2, 1, 2, 1], gain=4, impl=impl_fir or impl)
    w = torch.randn(y2.shape, generator=g)
    return [y1.detach(), y2.detach()] + list(torch.autograd.grad((y2 * w).sum(), [x, b]))


@pytest.mark.parametrize("plant", [_off_by_a_little, _nan])
@pytest.mark.parametrize("module", [bias_act_module, upfirdn2d_module], ids=["bias_act", "upfirdn2d"])
def test_wrong_kernel_is_replaced_by_reference(monkeypatch, module, plant):
    """A planted wrong kernel is caught on its first call: 'auto' warns once (what, by how much) and every call then
    gives exactly the reference's values and gradients (the other op keeps its kernel); the decision names the
    reason."""
    ref = _calls("ref", "fused") if module is bias_act_module else _calls("fused", "ref")
    _plant(monkeypatch, module, plant)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [_calls("auto") for _ in range(2)]
    for out in outs:
        for a, b in zip(out, ref):
            assert torch.equal(a, b)
    op = module.__name__.split(".")[-1]
    mine = [w for w in caught if f"ops.{op}" in str(w.message)]
    assert len(mine) == 1 and "disagrees with the reference" in str(mine[0].message), [str(w.message) for w in caught]
    d = {x["op"]: x for x in dispatch.decisions()}
    assert d[op]["impl"] == "ref" and d[op]["grad"] and d[op]["err"] > d[op]["tol"]
    other = "upfirdn2d" if op == "bias_act" else "bias_act"
    assert d[other]["impl"] == "fused" and d[other]["err"] <= d[other]["tol"]


def test_forced_fused_raises_on_a_mismatch(monkeypatch):
    """impl='fused' runs the same check and raises (on every call) instead of falling back."""
    _plant(monkeypatch, bias_act_module, _off_by_a_little)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="disagrees with the reference.*impl='fused'"):
            bias_act(torch.randn(2, 3), torch.randn(3), act="tanh", impl="fused")


def test_arguments_the_kernel_does_not_take_make_no_decision():
    """A call the kernel does not take (a bias of another length) goes to the reference, which raises its own error,
    and records no decision: a later valid call of the same key under impl='fused' self-checks and runs the kernel."""
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(ValueError, match="bias of shape \\(3,\\) does not match dim 1"):
        bias_act(x, torch.randn(3), act="lrelu", impl="fused")
    assert dispatch.decisions() == []
    with dispatch.kernel_calls("bias_act", "cpu") as calls:
        y = bias_act(x, torch.randn(4), act="lrelu", impl="fused")
    assert calls[0] > 0 and y.shape == x.shape
    d = dispatch.decisions()
    assert len(d) == 1 and d[0]["impl"] == "fused" and d[0]["variant"] == "lrelu"


def test_decision_is_made_once_per_key(monkeypatch):
    """One self-check per (op, device, dtype, layout, variant, grad); later calls run the kernel once and nothing
    else; a new layout, dtype or activation gets its own decision."""
    decide, count = dispatch._decide, [0]

    def counted(*a, **k):
        count[0] += 1
        return decide(*a, **k)
    monkeypatch.setattr(dispatch, "_decide", counted)
    x = torch.randn(2, 4, 6, 6)
    b = torch.randn(4)
    with dispatch.kernel_calls("bias_act", "cpu") as calls:
        bias_act(x, b, act="lrelu")
        first = calls[0]
        for _ in range(3):
            bias_act(x, b, act="lrelu")
    assert count[0] == 1 and first > 1 and calls[0] == first + 3
    bias_act(x.contiguous(memory_format=torch.channels_last), b, act="lrelu")
    bias_act(x.double(), b, act="lrelu")
    bias_act(x, b, act="tanh")
    assert count[0] == 4
    keys = {(d["layout"], d["dtype"], d["variant"]) for d in dispatch.decisions()}
    assert keys == {("contiguous", "float32", "lrelu"), ("channels_last", "float32", "lrelu"),
                    ("contiguous", "float64", "lrelu"), ("contiguous", "float32", "tanh")}
    assert all(d["impl"] == "fused" and d["ms_fused"] is None for d in dispatch.decisions())  # CPU: not timed
    assert "bias_act cpu float32 contiguous lrelu: fused, agrees" in dispatch.describe(dispatch.decisions()[0])


def test_training_step_with_wrong_kernels_equals_reference(monkeypatch):
    """The four training phases (ADA, R1, path length) under 'auto' with both kernels planted wrong give exactly
    the 'ref' run's losses and gradients, and every decision is 'ref'."""
    dispatch.set_default_impl("ref")
    ref_stats, ref_grads = four_phases()
    _plant(monkeypatch, bias_act_module, _off_by_a_little)
    _plant(monkeypatch, upfirdn2d_module, _nan)
    dispatch.set_default_impl("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats, grads = four_phases()
    assert stats == ref_stats
    for phase in ref_grads:
        assert torch.equal(grads[phase], ref_grads[phase]), phase
    d = dispatch.decisions()
    assert {x["op"] for x in d} == {"bias_act", "upfirdn2d"} and all(x["impl"] == "ref" for x in d)


def test_layers_hand_bias_act_the_activation_dtype(monkeypatch):
    """Under CPU bfloat16 autocast every layer of G and D passes bias_act a bias of x's dtype (the conv or matmul
    output's), so the fused kernel is not skipped for a dtype mismatch."""
    seen = []

    def recording(x, b=None, *a, **k):
        seen.append((x.dtype, None if b is None else b.dtype))
        return bias_act(x, b, *a, **k)
    monkeypatch.setattr(layers_module, "bias_act", recording)
    monkeypatch.setattr(generator_module, "bias_act", recording)
    G, D = tiny_nets()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = G(torch.randn(2, 32), torch.zeros(2, 0))
        D(img, torch.zeros(2, 0))
    assert len(seen) > 10 and any(x == torch.bfloat16 for x, _ in seen)
    assert all(b is None or b == x for x, b in seen), seen


# A free local TCP port for a two-process group.
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree(tmp_path):
    """Two gloo ranks where only rank 0's bias_act kernel is wrong: both use the reference (rank 0 decided and
    broadcast), both keep upfirdn2d's correct kernel, and their outputs are equal."""
    port = str(_free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(HERE.parent))
    procs = [subprocess.Popen([sys.executable, str(HERE / "_dispatch_dist_worker.py"), str(r), "2", port,
                               str(tmp_path / f"rank{r}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for r, who in ((r0, "rank 0"), (r1, "rank 0")):
        d = {x["op"]: x for x in r["decisions"]}
        assert d["bias_act"]["impl"] == "ref" and d["upfirdn2d"]["impl"] == "fused"
        assert all(x["decided_by"] == who for x in r["decisions"])
    assert r1["decisions"] == r0["decisions"] and r0["out"] == r1["out"]


def test_training_run_logs_decisions_once(tmp_path):
    """A short 'auto' run prints each decision once and writes them to stats.jsonl ('Ops/decisions') once: every
    op that ran is there, on CPU kept fused (the kernels agree)."""
    args = [a for a in TINY if not a.startswith("train.ops_impl=")] + ["train.kimg=0.032", "train.ops_impl=auto",
                                                                       "run_dir=run"]
    env_backup = {k: os.environ.pop(k) for k in ("GANFORGE_OPS_IMPL", "GANFORGE_OPS_FORCE_BUILD_FAILURE")
                  if k in os.environ}
    try:
        proc = run_train(args, tmp_path)
    finally:
        os.environ.update(env_backup)
    lines = [json.loads(x) for x in (tmp_path / "run/stats.jsonl").read_text().splitlines()]
    logged = [d for line in lines for d in line.get("Ops/decisions", [])]
    assert {d["op"] for d in logged} == {"bias_act", "upfirdn2d"}
    keys = [tuple(d[k] for k in ("op", "device", "dtype", "layout", "variant", "grad")) for d in logged]
    assert len(keys) == len(set(keys)) and all(d["impl"] == "fused" and d["err"] <= d["tol"] for d in logged)
    printed = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("ops: ")]
    assert len(printed) == len(logged)
