"""The op parts of scripts/gpu_check.py (environment, builds, parity, speed, auto's decisions): they import only ops."""
import os
import platform
import shutil
import subprocess
import time

import torch

import bench_ops
from ops import _build, dispatch
from ops.upfirdn2d import setup_filter

try:  # parity and the large tensors need check_ops; where it cannot be imported, they say why and the rest runs
    import check_ops
    CHECK_OPS_MISSING = None
except Exception as e:  # noqa: BLE001 - reported in those stages
    check_ops = None
    CHECK_OPS_MISSING = f"error: scripts/check_ops.py cannot be imported ({type(e).__name__}: {e})"

# The layouts parity checks on the device: the ones training uses (channels-last in the float16 blocks).
PARITY_LAYOUTS = ("contiguous", "channels_last")


# Text of a command's last output line, or why it could not run.
def _command_version(cmd) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
        return lines[-1].strip() if lines else f"exit {out.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not available ({type(e).__name__})"


def check_env(device: torch.device) -> dict:
    """Environment (GPU, driver, torch, CUDA, cuDNN, nvcc, ninja, Python) and the op builds for the device: each op
    'built' or 'NOT BUILT: why'; status 'complete' when every op built."""
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
    env["op_builds"] = {op: "built" if not isinstance(r, Exception) else f"NOT BUILT: {r}"
                        for op, r in dispatch.load_all(device.type).items()}
    env["op_build_s"] = round(time.time() - t0, 1)
    env["ok"] = all(v == "built" for v in env["op_builds"].values())
    env["status"] = "complete" if env["ok"] else "error: " + "; ".join(
        f"{op} {v}" for op, v in env["op_builds"].items() if v != "built")
    return env


def parity(device: torch.device, budget_s: float) -> list:
    """check_ops' parity (values, 1st and 2nd derivatives against a float64 truth) in float32, float16 and bfloat16
    (on CPU also float64), contiguous and channels-last, within `budget_s`; each row gets a status."""
    if CHECK_OPS_MISSING:
        return [dict(op="(all)", dtype="(all)", layout="(all)", order="(all)", ok=False, skipped=None, err=None,
                     tol=None, case="", detail=CHECK_OPS_MISSING, status=CHECK_OPS_MISSING)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if device.type == "cuda" else None
    rows = check_ops.run_parity(device, dtypes, budget_s, layouts=PARITY_LAYOUTS)
    for r in rows:
        r["status"] = ("complete" if r["ok"] else f"FAIL: {r['detail'] or 'err above tol'}") if r["skipped"] is None \
            else (f"budget: {r['skipped']}" if "budget" in r["skipped"] else f"skipped: {r['skipped']}")
        if r["ok"] is False and r["skipped"] is None and r["err"] is None:
            r["status"] = f"error: {r['detail']}"
    return rows


def large(device: torch.device, budget_s: float) -> list:
    """check_ops' tensors over 2^31 elements (float16 on CUDA; skipped on CPU), each row with a status."""
    if CHECK_OPS_MISSING:
        return [dict(op="(all)", case="", order="(all)", status=CHECK_OPS_MISSING)]
    rows = check_ops.check_large_tensor(device, budget_s)
    for r in rows:
        r["status"] = (("complete" if r["ok"] else f"FAIL: {r['detail']}") if r["skipped"] is None
                       else f"skipped: {r['skipped']}")
    return rows


def speed_plan(device: torch.device, small: bool) -> list:
    """The op-speed groups in the order they matter: (title, model px, batch, min res, res -> (dtype, layout)).
    Training's real shapes: paper256 (down to the first float32 resolution) and stylegan2@1024 as their presets run
    (float16 channels-last in the four highest resolutions), then paper256 under mixed_precision=bf16 and in float32.
    On CPU (small) the models are 32 and 64 px at batch 2, and float16 is float32 there (the CPU kernels have no
    half types) in the same layouts."""
    half = torch.float16 if device.type == "cuda" else torch.float32
    m256, m1024 = (32, 64) if small else (256, 1024)
    b256, b1024 = (2, 2) if small else (32, 8)

    def as_trained(top):  # float16 channels-last in the 4 highest resolutions, float32 below
        return lambda r: (half, "channels_last") if r >= top // 8 else (torch.float32, "contiguous")
    return [("paper256 as trained (num_fp16_res=4)", m256, b256, m256 // 16, as_trained(m256)),
            ("stylegan2@1024 as trained (num_fp16_res=4)", m1024, b1024, m1024 // 8, as_trained(m1024)),
            ("paper256 mixed_precision=bf16", m256, b256, m256 // 8, lambda r: (torch.bfloat16, "contiguous")),
            ("paper256 fp32", m256, b256, m256 // 8, lambda r: (torch.float32, "contiguous"))]


def time_case(op, fn, shape, nbias, device, dtype, layout, rep_budget) -> dict:
    """bench_ops.bench_case in a memory layout (ms of 'ref' and 'fused', forward and forward + backward; refuses to
    time a fused call that ran no kernel), then one forward + backward with impl='auto' on inputs of the same kind,
    so that a self-checking 'auto' decides for this dtype and layout at a real shape."""
    fmt = torch.channels_last if layout == "channels_last" and len(shape) == 4 else torch.contiguous_format
    row = bench_ops.bench_case(op, fn, shape, nbias, device, dtype, rep_budget, fmt)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(shape, generator=g, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
    b = torch.randn(nbias, generator=g, device=device, dtype=dtype).requires_grad_(True) if nbias else None
    y = fn(x, "auto", b)
    y.backward(torch.randn_like(y))  # (randn_like keeps y's layout)
    row["out_layout"] = ("channels_last" if y.ndim == 4 and y.is_contiguous(memory_format=torch.channels_last)
                         and not y.is_contiguous() else "contiguous")
    return row


def op_speed(device: torch.device, budget_s: float, small: bool) -> list:
    """Reference vs fused ms, ratio, GB/s of the op's minimal traffic and % of the device's peak, group by group of
    speed_plan within `budget_s`; every row 'complete' or why not (budget, unavailable, fell back, out of memory)."""
    deadline = time.perf_counter() + budget_s
    peak, peak_source = bench_ops.peak_bandwidth(device)
    todo = []
    for title, model_res, batch, min_res, precision in speed_plan(device, small):
        by_dtype = {}  # the group's cases with the filter in each dtype it uses
        for case in bench_ops.cases(model_res, batch, None, min_res):
            label, shape, _, nbias = case[:4]  # (bench_ops may add a memory format: the layout here is the plan's)
            if label.endswith(" cl"):  # bench_ops' own channels-last copy of a case, where it makes one
                continue
            res = int(label.split()[1][1:])  # the label's 'r<res>': the block's resolution
            dtype, layout = precision(res)
            if dtype not in by_dtype:
                f = setup_filter([1, 3, 3, 1], device=device).to(dtype)
                by_dtype[dtype] = {c[0]: c[2] for c in bench_ops.cases(model_res, batch, f, min_res)}
            todo.append((title, label, shape, by_dtype[dtype][label], nbias, dtype, layout))
    rep_budget = min(0.25 if device.type == "cpu" else 0.1, budget_s / (8 * max(len(todo), 1)))
    rows = []
    for title, label, shape, fn, nbias, dtype, layout in todo:
        op = "bias_act" if "bias_act" in label else "upfirdn2d"
        row = {"group": title, "case": label.split(" ", 1)[1], "op": op, "dtype": str(dtype)[6:], "layout": layout,
               "shape": list(shape), "peak_gbps": None if peak is None else peak / 1e9, "peak_source": peak_source}
        rows.append(row)
        why = dispatch.unavailable_reason(op, torch.empty(0, device=device, dtype=dtype))
        if why:
            row["status"] = f"skipped: fused {op} unavailable: {why}"
            continue
        if time.perf_counter() > deadline:
            row["status"] = f"budget: {budget_s:.0f} s for op speed spent"
            continue
        fields, why = bench_ops.measure(lambda: time_case(op, fn, shape, nbias, device, dtype, layout, rep_budget),
                                        peak)
        if why is not None:
            kind, message = why
            row["status"] = f"{kind}: {message[:200 if kind == 'out of memory' else 300]}"
            continue
        row.update(fields, status="complete")
    return rows


def fused_unavailable(device: torch.device, dtype: torch.dtype):
    """Why some fused op cannot run on `dtype` tensors of `device` ('op: reason'), or None when every one can."""
    for op in dispatch.OPS:
        why = dispatch.unavailable_reason(op, torch.empty(0, device=device, dtype=dtype))
        if why:
            return f"{op}: {why}"
    return None


def auto_decisions() -> dict:
    """What the self-checking ops_impl=auto kept or replaced in this process: ops.dispatch.decisions() (a list of
    dicts) where this build of ops has it, else why not."""
    decisions = getattr(dispatch, "decisions", None)
    if not callable(decisions):
        return {"status": "skipped: ops.dispatch.decisions() is not in this build of ops", "rows": []}
    try:
        rows = [dict(d) for d in decisions()]
    except Exception as e:  # noqa: BLE001 - reported
        return {"status": f"error: {type(e).__name__}: {e}", "rows": []}
    return {"status": "complete", "rows": rows}
