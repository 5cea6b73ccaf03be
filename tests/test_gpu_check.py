"""scripts/gpu_check.py in its CPU mode: the same code paths as on a GPU, a report that says what ran and what not."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Run the check; returns (exit status, JSON report, markdown report, output).
def run_check(tmp_path, **env):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--device", "cpu", "--quick", "--out",
                           str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env))
    report = json.loads((out / "gpu-check.json").read_text())
    return proc.returncode, report, (out / "gpu-check.md").read_text(), proc.stdout + proc.stderr


# --device cpu --quick passes and reports every step: builds, parity of both ops in every order and layout
# (fp16/bf16 and the 2^31-element tensors marked skipped, with the reason), op timings, fused and reference
# training runs of both presets (fp16 layers skipped: CUDA only) and the host-sync count at its target.
@pytest.mark.slow
def test_gpu_check_cpu_quick(tmp_path):
    rc, report, md, out = run_check(tmp_path)
    assert rc == 0, out[-3000:]
    assert report["ok"] and report["env"]["op_builds"] == {"bias_act": "built", "upfirdn2d": "built"}
    ran = [r for r in report["parity"] if not r["skipped"]]
    assert ran and all(r["ok"] for r in ran)
    assert {(r["op"], r["order"]) for r in ran} == {(op, o) for op in ("bias_act", "upfirdn2d")
                                                    for o in ("fwd", "grad", "grad2")}
    assert {"contiguous", "channels_last"} <= {r["layout"] for r in ran} and len({r["layout"] for r in ran}) >= 3
    skipped = {r["dtype"] for r in report["parity"] if r["skipped"]}
    assert {"float16", "bfloat16"} <= skipped
    assert report["large"] and all(r["skipped"] for r in report["large"])
    assert report["op_speed"] and any(r["ok"] and r["ms_fused_fwd"] > 0 for r in report["op_speed"])
    train = {(r["preset"], r["ops"], r["precision"]): r for r in report["training"]}
    assert len(train) == 8
    for preset in ("paper256", "stylegan2"):
        for ops in ("fused", "ref"):
            row = train[preset, ops, "fp32"]
            assert row.get("sec_per_kimg", 0) > 0 and row["minibatches"] >= 1, row
            assert train[preset, ops, "num_fp16_res=4"]["skipped"] == "float16 layers run on CUDA only"
    assert report["syncs"]["ok"] and report["syncs"]["reads"] <= 2 and report["syncs"]["copies"] == 0
    for title in ("## Environment", "## Op parity", "## Op speed", "## Training speed", "## Host syncs",
                  "float16 layers run on CUDA only", "result: **PASS**"):
        assert title in md


# A failed op build is a failing check: exit 1, the reason in the report, and the rest still measured (training
# falls back to the reference ops).
@pytest.mark.slow
def test_gpu_check_reports_a_failed_build(tmp_path):
    rc, report, md, _ = run_check(tmp_path, GANFORGE_OPS_FORCE_BUILD_FAILURE="upfirdn2d")
    assert rc == 1 and not report["ok"] and "result: **FAIL**" in md
    assert report["env"]["op_builds"]["upfirdn2d"].startswith("NOT BUILT: build failure forced")
    assert report["env"]["op_builds"]["bias_act"] == "built"
    assert any(r["op"] == "upfirdn2d" and r["ok"] is False for r in report["parity"])
    assert any(r.get("sec_per_kimg") for r in report["training"])
