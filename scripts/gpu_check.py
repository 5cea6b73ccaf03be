"""Checks a GPU machine in one command: environment, op builds, op parity and speed, training speed, host syncs."""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path


import torch

import bench_ops
import check_ops
from ops import _build, dispatch, fused_ops
from training import dist
from training.config import compose_config
from training.probes import CountMinibatch, TimeMinibatches, run_with_probe

# NVIDIA's published StyleGAN2-ADA speeds (8 A100s) per GPU, and ganforge's targets for one H200 (s/kimg).
REFERENCE_SEC_PER_KIMG = {"paper256": (2.47 * 8, 10.0), "stylegan2": (14.57 * 8, 58.0)}

# Each step's time budget in seconds: on a GPU (with the CUDA op builds, ~2 minutes the first time, the whole check
# stays under 8 minutes) and in --quick mode on a CPU (under a minute with the CPU op builds cached).
BUDGETS = {"gpu": dict(parity=60, large=30, op_speed=60, training=180, syncs=20),
           "quick": dict(parity=15, large=5, op_speed=8, training=30, syncs=15)}

# The training runs: (name, preset, resolution) x ops impl x precision. On a GPU at the presets' real sizes; in
# --quick mode on a CPU the same presets at 32 px with few channels.
TRAINING_RUNS = [("paper256", 256), ("stylegan2", 1024)]


# Text of a command's first output line, or why it could not run.
def _command_version(cmd) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
        return lines[-1].strip() if lines else f"exit {out.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not available ({type(e).__name__})"


def check_env(device: torch.device) -> dict:
    """Environment: GPU, driver, torch, CUDA, cuDNN, nvcc, ninja, Python; and which fused ops built (and why not).
    """
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "device": str(device),
           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST"), "cuda_home": _build.find_cuda_home(),
           "ninja": _command_version(["ninja", "--version"]) if shutil.which("ninja") else "not found"}
    env["nvcc"] = (_command_version([os.path.join(env["cuda_home"], "bin", "nvcc"), "--version"])
                   if env["cuda_home"] else "not found")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2 ** 30, 1),
                   capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                   driver=_command_version(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    t0 = time.time()
    builds = {}
    for op, result in fused_ops.load_all(device.type).items():
        builds[op] = "built" if not isinstance(result, Exception) else f"NOT BUILT: {result}"
    env["op_builds"] = builds
    env["op_build_s"] = round(time.time() - t0, 1)
    env["ok"] = all(v == "built" for v in builds.values())
    return env


def training_overrides(preset: str, res: int, impl: str, fp16: bool, batch: int, batch_gpu: int, run_dir: str,
                       quick: bool) -> list:
    """The overrides of one timed training run (ADA on, lazy R1 and path length at their preset intervals)."""
    args = [f"model={preset}", f"data.resolution={res}", "data.num_images=1024", "metrics=none",
            "log.progress=false", "aug=ada", "train.kimg=100000", "train.tick_kimg=100000", "train.snap=0",
            "train.image_snap=0", f"train.ops_impl={impl}", f"model.num_fp16_res={4 if fp16 else 0}",
            f"train.batch_size={batch}", f"train.batch_gpu={batch_gpu}", f"run_dir={run_dir}"]
    if quick:
        args += ["model.channel_base=512", "model.channel_max=32", "train.cpu_threads=1"]
    return args


def time_training(overrides: list, warmup: int, count: int, budget_s: float, device: torch.device) -> dict:
    """Time one training run in this process: sec/kimg over a window of minibatches, peak memory."""
    return run_with_probe(compose_config(overrides), TimeMinibatches(warmup, count, budget_s, device)).result


def check_training(device: torch.device, budget_s: float, quick: bool, tmp: str) -> list:
    """Training speed and memory of paper256 at 256 px and stylegan2 at 1024 px, fused and reference ops, fp32 and
    num_fp16_res=4 (on CUDA), each in its share of the budget; the report compares with NVIDIA's per-GPU speed."""
    rows = []
    warmup, count = (1, 3) if quick else (4, 16)
    configs = []
    for preset, res in TRAINING_RUNS:
        for impl in ("fused", "ref"):
            for fp16 in (False, True):
                configs.append((preset, res, impl, fp16))
    configs.sort(key=lambda c: (c[2] != "fused", c[0] != "paper256", c[3]))  # fused first: the numbers that matter
    start = time.time()
    for i, (preset, res, impl, fp16) in enumerate(configs):
        row = dict(preset=preset, resolution=res, ops=impl, precision="num_fp16_res=4" if fp16 else "fp32")
        rows.append(row)
        if fp16 and device.type != "cuda":
            row["skipped"] = "float16 layers run on CUDA only"
            continue
        left = budget_s - (time.time() - start)
        share = left / (len(configs) - i)
        if share < (3 if quick else 20):
            row["skipped"] = f"time budget spent ({budget_s:.0f} s for all training runs)"
            continue
        if quick:
            run_res, batch, batch_gpu = 32, 8, 8
        else:
            run_res, batch, batch_gpu = res, 32, 32 if res <= 256 else 8
        row.update(run_resolution=run_res, batch=batch, batch_gpu=batch_gpu)
        try:
            result = time_training(training_overrides(preset, run_res, impl, fp16, batch, batch_gpu,
                                                      os.path.join(tmp, f"train{i}"), quick),
                                   warmup, count, share, device)
        except Exception as e:  # a failing run is a finding: report it and go on
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()[-2000:]
            continue
        row.update(result)
        nvidia, target = REFERENCE_SEC_PER_KIMG[preset]
        row.update(nvidia_a100_sec_per_kimg=nvidia, target_sec_per_kimg=target)
        if not result["complete"]:
            row["note"] = (f"window cut to {result['minibatches']} of {count} minibatches by the time budget: "
                           f"lazy regularization not fully amortized")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def check_syncs(device: torch.device, tmp: str) -> dict:
    """Host syncs in one minibatch with every phase due (ADA at p = 0.5): the Python-level counter and, on CUDA, every
    synchronizing call that torch.cuda.set_sync_debug_mode reports."""
    overrides = ["model=tiny", "train=test", "model.channel_base=256", "model.channel_max=32", "data.num_images=256",
                 "metrics=none", "log.progress=false", "aug=ada", "aug.p=0.5", "aug.sync_free=true",
                 "train.r1_interval=2",
                 "train.pl_interval=2", "train.tick_kimg=1", "train.kimg=1", "train.snap=0", "train.image_snap=0",
                 f"run_dir={os.path.join(tmp, 'syncs')}"]
    probe = run_with_probe(compose_config(overrides), CountMinibatch(2))
    c = probe.counter
    out = dict(reads=c.reads, copies=c.copies, sites=[f"{n} x {site}" for site, n in c.sites.most_common(8)],
               cuda_syncs=probe.cuda_syncs, cuda_messages=probe.cuda_messages[:8], target="<= 2 reads, 0 copies")
    out["ok"] = c.reads <= 2 and c.copies == 0
    return out


def run_step(name: str, fn, report: dict) -> None:
    """Run one step under its budget; an exception becomes the step's error (the report goes on)."""
    t0 = time.time()
    print(f"[gpu_check] {name} ...", flush=True)
    try:
        report[name] = fn()
    except Exception as e:
        report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    report.setdefault("seconds", {})[name] = round(time.time() - t0, 1)
    print(f"[gpu_check] {name} done in {time.time() - t0:.1f} s", flush=True)


# A markdown table from rows (dicts) and (header, key or function) columns.
def _table(rows, columns) -> list:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for _, col in columns:
            v = col(r) if callable(col) else r.get(col, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v if v is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    """The readable report (gpu-check.md) of the JSON report."""
    env = report.get("env", {})
    out = ["# ganforge GPU check", "", f"Command: `{report['command']}`; total {report['total_s']:.0f} s; "
           f"result: **{'PASS' if report['ok'] else 'FAIL'}**", "", "## Environment", ""]
    out += [f"- {k}: {v}" for k, v in env.items() if k not in ("op_builds", "ok")]
    out += [f"- op build {op}: {v}" for op, v in env.get("op_builds", {}).items()]
    parity = report.get("parity", [])
    if isinstance(parity, list):
        out += ["", "## Op parity (against a float64 truth; err and tol in eps units of each dtype)", ""]
        out += _table(_parity_summary(parity), [("op", "op"), ("dtype", "dtype"), ("order", "order"),
                                                ("checks", "checks"), ("failed", "failed"),
                                                ("worst err", "err"), ("its tol", "tol"), ("worst case", "case"),
                                                ("skipped", "skipped")])
    large = report.get("large")
    if isinstance(large, list) and large:
        out += ["", "## Tensors over 2^31 elements", ""]
        out += _table(large, [("op", "op"), ("case", "case"), ("dtype", "dtype"), ("order", "order"),
                              ("err", "err"), ("tol", "tol"), ("ok", "ok"), ("skipped", "skipped")])
    speed = report.get("op_speed")
    if isinstance(speed, list) and speed:
        out += ["", "## Op speed (best-of-N ms; ratio = reference / fused; GB/s of the op's minimal traffic)", ""]
        out += _table(speed, [("case", "case"), ("dtype", "dtype"), ("shape", "shape"),
                              ("fwd ref", "ms_ref_fwd"), ("fwd fused", "ms_fused_fwd"), ("ratio", "ratio_fwd"),
                              ("f+b ref", "ms_ref_fwd_bwd"), ("f+b fused", "ms_fused_fwd_bwd"),
                              ("ratio", "ratio_fwd_bwd"), ("GB/s fwd", "gbps_fwd"), ("GB/s f+b", "gbps_fwd_bwd"),
                              ("% peak fwd", "pct_peak_fwd"), ("% peak f+b", "pct_peak_fwd_bwd"),
                              ("skipped", "skipped")])
    rows = report.get("training")
    if isinstance(rows, list):
        out += ["", "## Training speed", ""]
        out += _table(rows, [("preset", "preset"), ("px", "run_resolution"), ("ops", "ops"),
                             ("precision", "precision"), ("batch", "batch"), ("batch_gpu", "batch_gpu"),
                             ("sec/kimg", "sec_per_kimg"), ("NVIDIA A100 sec/kimg", "nvidia_a100_sec_per_kimg"),
                             ("target", "target_sec_per_kimg"), ("peak GB", "peak_mem_gb"),
                             ("minibatches", "minibatches"),
                             ("note", lambda r: r.get("skipped") or r.get("error") or r.get("note") or "")])
    syncs = report.get("syncs")
    if isinstance(syncs, dict):
        out += ["", "## Host syncs per minibatch (every phase due, ADA p = 0.5)", "",
                f"- Python-level: {syncs.get('reads')} reads, {syncs.get('copies')} host-to-tensor copies "
                f"(target {syncs.get('target')}): {'ok' if syncs.get('ok') else 'FAIL'}",
                "- CUDA sync debug mode: " + (f"{syncs['cuda_syncs']} synchronizing calls"
                                               if syncs.get("cuda_syncs") is not None else "not on this device")]
        out += [f"  - {m}" for m in syncs.get("cuda_messages", [])]
    errors = {k: v["error"] for k, v in report.items() if isinstance(v, dict) and "error" in v}
    if errors:
        out += ["", "## Errors", ""] + [f"- {k}: {v}" for k, v in errors.items()]
    return "\n".join(out) + "\n"


# Parity rows grouped by (op, dtype, order): how many ran and failed, the worst error with its tolerance.
def _parity_summary(rows) -> list:
    groups = {}
    for r in rows:
        g = groups.setdefault((r.get("op"), r.get("dtype"), r.get("order")),
                              dict(op=r.get("op"), dtype=r.get("dtype"), order=r.get("order"), checks=0, failed=0,
                                   err=None, tol=None, case="", skipped=""))
        if r.get("skipped"):
            g["skipped"] = r["skipped"]
            continue
        g["checks"] += 1
        g["failed"] += 0 if r.get("ok") else 1
        ratio = (r.get("err") or 0) / max(r.get("tol") or 1e-30, 1e-30)
        if g["err"] is None or ratio > (g["err"] or 0) / max(g["tol"] or 1e-30, 1e-30):
            g.update(err=r.get("err"), tol=r.get("tol"), case=f"{r.get('case')} / {r.get('layout')}")
    return list(groups.values())


def passed(report: dict) -> bool:
    """Whether the report passes: builds, parity, large tensors and the sync target (speed is reported, not judged).
    """
    if any(isinstance(v, dict) and "error" in v for v in report.values()):
        return False
    ok = report.get("env", {}).get("ok", False) and report.get("syncs", {}).get("ok", False)
    for key in ("parity", "large"):
        rows = report.get(key, [])
        ok = ok and all(r.get("ok", True) or r.get("skipped") for r in rows)
    return bool(ok and not any("error" in r for r in report.get("training", [])))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="small sizes and budgets (the CPU smoke run)")
    parser.add_argument("--out", default="gpu-check", help="folder for gpu-check.json and gpu-check.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    budgets = BUDGETS["quick" if args.quick or device.type == "cpu" else "gpu"]
    quick = args.quick or device.type == "cpu"
    if device.type == "cpu":
        torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("GANFORGE_OFFLINE", "1")
    dispatch.set_default_impl("auto")
    t_start = time.time()
    report = {"command": " ".join([os.path.basename(sys.executable), "scripts/gpu_check.py"] + (argv or sys.argv[1:])),
              "budgets_s": budgets}
    # fp32, fp16 and bf16 on CUDA; on CPU fp32 and fp64, with fp16/bf16 reported as skipped (no CPU kernels).
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if device.type == "cuda" else None
    with tempfile.TemporaryDirectory() as tmp:
        run_step("env", lambda: check_env(device), report)
        run_step("parity", lambda: check_ops.run_parity(device, dtypes, budgets["parity"]), report)
        run_step("large", lambda: check_ops.check_large_tensor(device, budgets["large"]), report)
        run_step("op_speed", lambda: [r for dt in ([torch.float32, torch.float16] if device.type == "cuda"
                                                   else [torch.float32])
                                      for r in bench_ops.run_bench(device, dt, [256, 1024] if not quick else [32],
                                                                   32 if not quick else 2,
                                                                   budgets["op_speed"] / 2)], report)
        run_step("training", lambda: check_training(device, budgets["training"], quick, tmp), report)
        run_step("syncs", lambda: check_syncs(device, tmp), report)
    report["total_s"] = time.time() - t_start
    report["ok"] = passed(report)
    Path(args.out, "gpu-check.json").write_text(json.dumps(report, indent=2, default=str))
    Path(args.out, "gpu-check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    dist.end_process(main())
