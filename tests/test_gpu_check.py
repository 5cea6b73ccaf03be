"""scripts/gpu_check.py: its budget shares, its report's size cap, and the device plan rehearsed end to end on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402
import gpu_check_ops  # noqa: E402
import gpu_check_report  # noqa: E402
from ops import dispatch  # noqa: E402

# The stages of the plan, in the order the device runs them.
STAGES = ["op builds", "op parity", "op speed", "train paper256@256 fused num_fp16_res=4",
          "train paper256@256 fused mixed_precision=bf16", "train stylegan2@1024 fused num_fp16_res=4",
          "train paper256@256 ref num_fp16_res=4", "train paper256@256 ref mixed_precision=bf16",
          "train stylegan2@1024 ref num_fp16_res=4", "host syncs", "tensors over 2^31 elements"]
# How a row that is not complete may start: each says why not.
REASONS = ("budget:", "skipped:", "dropped:", "not run:", "error:", "FAIL", "out of memory:")


# Run the check in a subprocess on CPU (ops built beforehand in this process, so that a cold build on the shared
# machine does not take the budget); returns (exit status, JSON report, markdown report, output).
def run_check(tmp_path, args, pythonpath=(), **env):
    dispatch.load_all("cpu")
    out = tmp_path / "report"
    path = os.pathsep.join([*map(str, pythonpath), str(ROOT)])
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--device", "cpu", "--out", str(out),
                           *args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **env))
    report = json.loads((out / "gpu-check.json").read_text())
    return proc.returncode, report, (out / "gpu-check.md").read_text(), proc.stdout + proc.stderr


def all_rows(report):
    return report["parity"] + report["op_speed"] + report["training"] + report["large"]


# A stage's share: its weight's part of what is left after the later floors, at least its own floor, at most what
# is left.
def test_share_keeps_the_floors_and_the_total():
    assert gpu_check.share(100, [1, 1, 2], [0, 0, 0]) == pytest.approx(25)
    assert gpu_check.share(100, [1, 2], [0, 90]) == pytest.approx(10 / 3)  # the later 90 s floor is set aside
    assert gpu_check.share(120, [1, 1], [90, 0]) == pytest.approx(90)  # raised to its floor (60 < 90)
    assert gpu_check.share(200, [1, 1], [90, 0]) == pytest.approx(100)
    assert gpu_check.share(50, [2.5, 1], [90, 0]) == pytest.approx(50)  # never more than is left
    assert gpu_check.share(-3, [1], [0]) == 0.0
    # The device's plan at its default budget, with 100 s of builds: every stage's share adds up to what was left,
    # the 1024 px run gets at least 90 s, and each earlier one waits for nothing.
    weights = [gpu_check.WEIGHTS[k] for k in ("parity", "op_speed", "train paper256", "train paper256",
                                             "train stylegan2", "train ref", "train ref", "syncs", "large")]
    floors = [0, 0, 0, 0, 90, 0, 0, 0, 0]
    left, shares = 260.0, []
    for i in range(len(weights)):
        shares.append(gpu_check.share(left, weights[i:], floors[i:]))
        left -= shares[-1]  # each stage takes its whole share
    assert sum(shares) == pytest.approx(260) and shares[4] >= 90 and min(shares) > 0


# The markdown stays under its cap with a full device report (every parity group of 2 ops x 3 dtypes x 2 layouts x
# 3 orders, 400 op-speed rows): the op-speed table loses rows from its end and says how many are in the JSON only.
def test_markdown_fits_its_cap():
    speed = [dict(group="g", case=f"speed case {i} " + "x" * 40, dtype="float16", layout="channels_last",
                  shape=[32, 512, 8, 8], ms_ref_fwd=1.0, ms_fused_fwd=0.5, ratio_fwd=2.0, status="complete")
             for i in range(400)]
    parity = [dict(op=op, dtype=dt, layout=lo, order=o, err=1.0, tol=8.0, ok=True, skipped=None, case=f"c{i}",
                   status="complete") for op in ("bias_act", "upfirdn2d") for dt in ("float32", "float16", "bfloat16")
              for lo in ("contiguous", "channels_last") for o in ("fwd", "grad", "grad2") for i in range(10)]
    report = dict(command="c", budget_s=360.0, total_s=1.0, ok=True, stages=[], env={}, parity=parity,
                  op_speed=speed, training=[], large=[], auto_decisions={"status": "complete", "rows": []})
    md = gpu_check_report.markdown(report)
    assert len(md) <= gpu_check_report.MD_LIMIT
    shown = md.count("| speed case ")
    assert 0 < shown < 400 and f"({400 - shown} more rows in gpu-check.json)" in md
    assert md.count("| complete |") == 36 + shown  # every parity group kept
    small = gpu_check_report.markdown(dict(report, op_speed=speed[:3], parity=parity[:3]))
    assert small.count("| speed case ") == 3 and "more rows" not in small


# auto's decisions are read from ops.dispatch.decisions() where ops has it, and the report says so where not.
def test_auto_decisions_with_and_without_dispatch_decisions(monkeypatch):
    monkeypatch.delattr(dispatch, "decisions", raising=False)
    assert gpu_check_ops.auto_decisions() == {"status": "skipped: ops.dispatch.decisions() is not in this build of "
                                                        "ops", "rows": []}
    made = [{"op": "upfirdn2d", "dtype": "float16", "layout": "channels_last", "kept": "ref", "why": "slower"}]
    monkeypatch.setattr(dispatch, "decisions", lambda: made, raising=False)
    assert gpu_check_ops.auto_decisions() == {"status": "complete", "rows": made}


# The verdict: a crashed stage, a failed parity row, a training row that could not run or a missed sync target
# fails the check; rows cut or skipped for the budget do not.
def test_passed_judges_rows_and_stages():
    good = dict(env={"ok": True}, stages=[{"status": "complete"}, {"status": "budget: 3 s left"}],
                parity=[{"status": "complete"}, {"status": "skipped: no fused kernel for torch.float16 on cpu"}],
                training=[{"status": "complete"}, {"status": "budget: window cut to 3 of 16 minibatches"},
                          {"status": "dropped: reference rows run at 256 px only"}], syncs={"ok": True})
    assert gpu_check.passed(good)
    assert gpu_check.passed(dict(good, syncs={"status": "budget: 5 s left"}))
    assert not gpu_check.passed(dict(good, stages=[{"status": "error: ImportError: x"}]))
    assert not gpu_check.passed(dict(good, parity=[{"status": "FAIL: err above tol"}]))
    assert not gpu_check.passed(dict(good, training=[{"status": "not run: training cannot be imported (x)"}]))
    assert not gpu_check.passed(dict(good, training=[{"status": "out of memory: CUDA out of memory"}]))
    assert not gpu_check.passed(dict(good, syncs={"ok": False, "status": "complete"}))
    assert not gpu_check.passed(dict(good, env={"ok": False}))


# The command that docs/gpu.md documents for a bare GPU machine is the one that --help prints.
def test_documented_command_matches_help():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--help"], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
    command = next(ln.strip() for ln in out.splitlines() if "--budget 360" in ln)
    assert command.startswith("PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu_check.py --device cuda")
    assert command in (ROOT / "docs/gpu.md").read_text()
    assert "--target /tmp/site .whl/*.whl" in out


# The device run rehearsed: `--device cpu --budget 120` runs the whole plan (32 and 64 px models) in order within
# its budget, every row complete or saying why not, the training rows with fixed augmentation at p = 0.2, the
# reference row at 1024 px dropped, and a report that fits its cap.
@pytest.mark.slow
def test_gpu_check_cpu_rehearsal(tmp_path):
    rc, report, md, out = run_check(tmp_path, ["--budget", "120"])
    assert rc == 0 and report["ok"], out[-3000:]
    assert [s["name"] for s in report["stages"]] == STAGES
    assert report["total_s"] <= 120 * 1.1, report["stages"]
    assert all(r["status"] == "complete" or r["status"].startswith(REASONS) for r in all_rows(report))
    ran = [r for r in report["parity"] if r["status"] == "complete"]
    assert {(r["op"], r["dtype"], r["layout"], r["order"]) for r in ran} == {
        (op, dt, lo, o) for op in ("bias_act", "upfirdn2d") for dt in ("float32", "float64")
        for lo in ("contiguous", "channels_last") for o in ("fwd", "grad", "grad2")}
    timed = [r for r in report["op_speed"] if r["status"] == "complete"]
    for layout in ("contiguous", "channels_last"):
        assert any(r["layout"] == layout and r["ms_fused_fwd_bwd"] > 0 and r["gbps_fwd_bwd"] > 0 for r in timed)
    first = report["op_speed"][0]
    assert first["group"].startswith("paper256") and first["layout"] == "channels_last" and first["shape"][2] == 32
    train = {(r["preset"], r["ops"], r["precision"]): r for r in report["training"]}
    for key in [("paper256", "fused", "num_fp16_res=4"), ("stylegan2", "fused", "num_fp16_res=4"),
                ("paper256", "ref", "num_fp16_res=4"), ("paper256", "ref", "mixed_precision=bf16")]:
        row = train[key]
        assert row["status"] == "complete" and row["sec_per_kimg"] > 0 and row["aug"] == "fixed p=0.2", row
    assert train["paper256", "ref", "mixed_precision=bf16"]["mixed_precision"] == "bf16"
    assert train["stylegan2", "fused", "num_fp16_res=4"]["run_resolution"] == 64
    assert train["stylegan2", "ref", "num_fp16_res=4"]["status"].startswith("dropped:")
    bf16 = train["paper256", "fused", "mixed_precision=bf16"]
    if torch.bfloat16 in dispatch.SUPPORTED_DTYPES["cpu"]:
        assert bf16["status"] == "complete", bf16
    else:
        assert bf16["status"].startswith("skipped:") and "bfloat16" in bf16["status"]
    assert len(md) <= gpu_check_report.MD_LIMIT and "result: **PASS**" in md
    for title in ("## Plan", "## Op parity", "## Op speed", "## ops_impl=auto decisions", "## Training speed"):
        assert title in md


# On a machine without the training packages (a bare GPU image: no hydra-core, omegaconf or antlr4), the op parts
# still complete from `ops` alone, and every training row says that training could not be imported, and why.
@pytest.mark.slow
def test_op_parts_run_without_training(tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for name in ("hydra", "omegaconf", "antlr4"):
        (hidden / f"{name}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\", name='{name}')\n")
    rc, report, md, out = run_check(tmp_path, ["--budget", "40"], pythonpath=[hidden])
    assert rc == 1 and not report["ok"] and "result: **FAIL**" in md, out[-3000:]
    assert report["env"]["op_builds"] == {"bias_act": "built", "upfirdn2d": "built"}
    assert [s["status"] for s in report["stages"][:3]][0] == "complete"
    assert any(r["status"] == "complete" for r in report["parity"])
    assert not any(r["status"].startswith(("FAIL", "error")) for r in report["parity"])
    assert any(r["status"] == "complete" for r in report["op_speed"])
    for row in report["training"]:
        assert row["status"].startswith("not run: training cannot be imported") and "hydra" in row["status"], row
    assert report["syncs"]["status"].startswith("not run: training cannot be imported")


# A failed op build fails the check: the reason in the report, parity of that op failed, and the rest still
# measured (the reference training rows run; the fused ones say why not).
@pytest.mark.slow
def test_gpu_check_reports_a_failed_build(tmp_path):
    rc, report, md, _ = run_check(tmp_path, ["--budget", "40"], GANFORGE_OPS_FORCE_BUILD_FAILURE="upfirdn2d")
    assert rc == 1 and not report["ok"] and "result: **FAIL**" in md
    assert report["env"]["op_builds"]["upfirdn2d"].startswith("NOT BUILT: build failure forced")
    assert report["env"]["op_builds"]["bias_act"] == "built"
    assert any(r["op"] == "upfirdn2d" and r["ok"] is False for r in report["parity"])
    train = {(r["ops"], r["precision"], r["resolution"]): r for r in report["training"]}
    assert "upfirdn2d" in train["fused", "num_fp16_res=4", 256]["status"]
    assert train["ref", "num_fp16_res=4", 256]["status"] == "complete"
