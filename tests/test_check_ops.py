"""scripts/check_ops.py and scripts/bench_ops.py on CPU: the tolerance rule, parity rows, broken kernels, budgets."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import bench_ops  # noqa: E402
import check_ops  # noqa: E402
import ops.bias_act as bias_act_module  # noqa: E402
import ops.upfirdn2d as upfirdn2d_module  # noqa: E402
from ops import dispatch  # noqa: E402
from ops.bias_act import bias_act_ref  # noqa: E402

FORCE = "GANFORGE_OPS_FORCE_BUILD_FAILURE"


# The CPU extensions built (or loaded from the cache) once for this module; one intra-op thread for small tensors.
@pytest.fixture(scope="module", autouse=True)
def exts():
    saved = os.environ.pop(FORCE, None)
    dispatch.reset()
    for op, m in dispatch.load_all("cpu").items():
        assert not isinstance(m, Exception), f"building the CPU {op} extension failed: {m}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if saved is not None:
        os.environ[FORCE] = saved
    dispatch.reset()


# Values near +-100 rounded to float16, then moved by k ulps of float16 (exact in float16).
def _fp16_near_100(k):
    g = torch.Generator().manual_seed(0)
    truth = (torch.rand(64, generator=g, dtype=torch.float64) * 20 + 90) * torch.tensor([1.0, -1.0]).repeat(32).double()
    ref = truth.half()
    ulp = 2.0 ** (torch.floor(torch.log2(ref.double().abs())) - 10)
    return truth, ref, (ref.double() + k * ulp).half()


# One ulp off near +-100 in float16 (0.0625 absolute, which the old absolute 2e-2 rejected) passes; ten ulps fail.
def test_tolerance_rule_fp16_near_100():
    truth, ref, one = _fp16_near_100(1)
    assert (one.double() - truth).abs().max() > 2e-2
    c = check_ops.compare(one, ref, truth, truth, torch.float16)
    assert c["ok"], c
    assert c["tol"] == check_ops.ULPS[torch.float16]  # the reference itself is within half an ulp
    truth, ref, ten = _fp16_near_100(10)
    c = check_ops.compare(ten, ref, truth, truth, torch.float16)
    assert not c["ok"], c
    # A reference that is itself 10 ulps off widens the tolerance (k x its error): then 10 ulps pass.
    assert check_ops.compare(ten, ten, truth, truth, torch.float16)["ok"]
    # NaN never passes.
    assert not check_ops.compare(torch.full_like(ref, float("nan")), ref, truth, truth, torch.float16)["ok"]


# Every case, layout and order of both ops passes on CPU in float32, and every row ran the fused kernel.
def test_run_parity_cpu_float32_ok():
    rows = check_ops.run_parity(torch.device("cpu"), [torch.float32])
    ran = [r for r in rows if r["skipped"] is None]
    bad = [r for r in ran if not r["ok"]]
    assert not bad, bad[:3]
    seen = {(r["op"], r["order"], r["layout"]) for r in ran}
    for op in ("bias_act", "upfirdn2d"):
        for order in ("fwd", "grad", "grad2"):
            for layout in ("contiguous", "channels_last", "strided", "transposed"):
                assert (op, order, layout) in seen, (op, order, layout)
    assert all(r["err"] <= r["tol"] and r["dtype"] == "float32" for r in ran)


# float16 and bfloat16 on CPU are reported as skipped (no CPU kernels), float64 runs.
def test_run_parity_cpu_half_skipped():
    rows = check_ops.run_parity(torch.device("cpu"), [torch.float16, torch.bfloat16, torch.float64],
                                ops=["bias_act"], layouts=("contiguous",))
    half = [r for r in rows if r["dtype"] in ("float16", "bfloat16")]
    assert len(half) == 2 and all(r["skipped"] and r["ok"] is None for r in half)
    assert all(r["ok"] for r in rows if r["dtype"] == "float64")


# A fused bias_act that is 0.1 % off is reported as not ok in every order.
def test_run_parity_flags_wrong_fused(monkeypatch):
    real = bias_act_module.bias_act_fused
    monkeypatch.setattr(bias_act_module, "bias_act_fused", lambda ext, *a, **k: real(ext, *a, **k) * 1.001)
    rows = check_ops.run_parity(torch.device("cpu"), [torch.float32], ops=["bias_act"], layouts=("contiguous",))
    assert rows and all(r["ok"] is False for r in rows), [r for r in rows if r["ok"]][:3]


# upfirdn2d with the filter flipped the wrong way is caught for the asymmetric filters only (the symmetric
# [1,3,3,1] gives the same result either way).
def test_run_parity_flags_flipped_filter(monkeypatch):
    real = upfirdn2d_module.upfirdn2d_fused

    def flipped(ext, x, f, up, down, padding, flip, gain):
        return real(ext, x, f, up, down, padding, not flip, gain)
    monkeypatch.setattr(upfirdn2d_module, "upfirdn2d_fused", flipped)
    rows = check_ops.run_parity(torch.device("cpu"), [torch.float32], ops=["upfirdn2d"], layouts=("contiguous",))
    for r in rows:
        assert r["ok"] is ("[1,3,3,1]" in r["case"]), r


# A 'fused' path that silently runs the reference is not ok either: no kernel ran.
def test_run_parity_flags_silent_fallback(monkeypatch):
    monkeypatch.setattr(bias_act_module, "bias_act_fused", lambda ext, *a, **k: bias_act_ref(*a, **k))
    rows = check_ops.run_parity(torch.device("cpu"), [torch.float32], ops=["bias_act"], layouts=("contiguous",))
    assert rows and all(r["ok"] is False and "fell back" in r["detail"] for r in rows)


# A spent budget marks the remaining rows skipped.
def test_run_parity_budget():
    rows = check_ops.run_parity(torch.device("cpu"), [torch.float32], budget_s=0.0, ops=["upfirdn2d"])
    assert rows and all(r["skipped"] and "budget" in r["skipped"] and r["ok"] is None for r in rows)


# The >2^31-element check is skipped on CPU (memory) unless forced; forced on a small stand-in shape, with small
# index boundaries to sample around, every check passes.
def test_check_large_tensor(monkeypatch):
    rows = check_ops.check_large_tensor(torch.device("cpu"))
    assert len(rows) == 4 and all("memory" in r["skipped"] for r in rows)
    monkeypatch.setattr(check_ops, "LARGE_SHAPE", (300, 3, 11, 13))
    monkeypatch.setattr(check_ops, "INDEX_LIMIT", 20000)
    assert check_ops._boundary_planes(143, 900)[:4] == [0, 139, 279, 419]
    rows = check_ops.check_large_tensor(torch.device("cpu"), force=True)
    assert all(r["ok"] for r in rows), rows
    assert {r["order"] for r in rows} == {"fwd", "grad"}


# A tiny budget times the first cases and marks the rest skipped; rows carry ms, ratios and GB/s (no peak on CPU).
def test_run_bench_budget():
    rows = bench_ops.run_bench(torch.device("cpu"), torch.float32, [64], 1, budget_s=0.3, min_res=4, rep_budget=0.002)
    timed = [r for r in rows if r["skipped"] is None]
    skipped = [r for r in rows if r["skipped"] is not None]
    assert timed and skipped and all("budget" in r["skipped"] and r["ok"] is None for r in skipped)
    for r in timed:
        assert r["ok"] and r["ms_fused_fwd"] > 0 and r["ratio_fwd_bwd"] > 0 and r["gbps_fwd"] > 0
        assert r["pct_peak_fwd"] is None and r["bytes_fwd_bwd"] > r["bytes_fwd"] > 0
    assert not any(bench_ops.is_failure(r) for r in rows)


# float16 on CPU: every row is reported unavailable and nothing is timed (no reference timed twice).
def test_run_bench_float16_cpu_unavailable(monkeypatch):
    monkeypatch.setattr(bench_ops, "timeit", lambda *a, **k: pytest.fail("timed a case without a fused kernel"))
    rows = bench_ops.run_bench(torch.device("cpu"), torch.float16, [16], 1, budget_s=10)
    assert len(rows) == 20  # per block (16, 8 px): bias_act, 3 upfirdn2d cases x 2 layouts, 2 RGB; 2 ADA rows
    assert sum(r["layout"] == "channels_last" for r in rows) == 6
    assert all("float16" in r["skipped"] and r["ms_fused_fwd"] is None and r["ok"] is False for r in rows)


# A 'fused' bias_act that dispatches to the reference is refused, not timed; upfirdn2d rows still run.
def test_run_bench_refuses_fallback(monkeypatch):
    monkeypatch.setattr(bias_act_module, "bias_act_fused", lambda ext, *a, **k: bias_act_ref(*a, **k))
    rows = bench_ops.run_bench(torch.device("cpu"), torch.float32, [16], 1, budget_s=30, min_res=16,
                               rep_budget=0.002)
    for r in rows:
        if r["op"] == "bias_act":
            assert "fell back" in r["skipped"] and r["ok"] is False
        else:
            assert r["skipped"] is None and r["ms_fused_fwd"] > 0


# Both command lines still run and exit 0 on CPU.
def test_clis(capsys):
    assert bench_ops.main(["--device", "cpu", "--res", "16", "--min-res", "8", "--batch", "1", "--threads", "1"]) == 0
    assert "16px bias_act total" in capsys.readouterr().out
    assert check_ops.main([]) == 0
    out = capsys.readouterr().out
    assert "all fused ops built and match the reference" in out and "[large]" in out


# check_ops (and the bench_ops it imports) load with `training`, hydra and omegaconf missing, as on a bare GPU
# machine: the op checks need only `ops`.
def test_check_ops_imports_without_training():
    import subprocess
    code = ("import sys; [sys.modules.__setitem__(m, None) for m in ('training', 'hydra', 'omegaconf')]; "
            "sys.path.insert(0, 'scripts'); import check_ops; print(len(check_ops.parity_cases()))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and int(proc.stdout.split()[-1]) > 10, proc.stderr[-2000:]
