"""Times reference vs fused bias_act/upfirdn2d at StyleGAN2 shapes (256 and 1024 px): ms, ratio, GB/s, % of peak."""
import argparse
import math
import sys
import time

import torch


from ops import _build, dispatch
from ops.bias_act import bias_act
from ops.dispatch import kernel_calls
from ops.upfirdn2d import downsample2d, setup_filter, upfirdn2d, upsample2d

# Peak DRAM bandwidth (bytes/s) of known GPUs, by a substring of the device name (checked in order); others get a
# measured device-to-device copy.
PEAK_BANDWIDTH = [("H200", 4.8e12, "H200 HBM3e"), ("H100 80GB HBM3", 3.35e12, "H100 SXM"),
                  ("H100 SXM", 3.35e12, "H100 SXM"), ("A100-SXM4-80GB", 2.0e12, "A100 80GB"),
                  ("A100 80GB", 2.0e12, "A100 80GB")]


def channels(res: int, max_res: int) -> int:
    """Feature maps at resolution `res` (StyleGAN2: min(cbase / res, 512); cbase 16384 at 256 px, 32768 at
    1024 px)."""
    cbase = 16384 if max_res <= 256 else 32768
    return min(cbase // res, 512)


def cases(max_res: int, batch: int, f, min_res: int, f12=None,
          layouts=("contiguous", "channels_last")):
    """The op calls of one model: (label, shape, fn(x, impl, b), bias channels or 0, memory format) per distinct
    shape, per resolution (G and D blocks), each upfirdn2d feature-map case once per layout in `layouts`; f is the
    [1,3,3,1] filter in the benchmark's dtype, f12 ADA's 12-tap 1-D filter (its rows at the top resolution), b the
    case's bias (same dtype)."""
    out = []
    res = max_res
    fmts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    while res >= min_res:
        c = channels(res, max_res)
        tag = f"{max_res}px r{res}"
        # Conv layers of G and D: bias + lrelu (gain sqrt 2) + clamp 256, on every block's activations.
        out.append((f"{tag} bias_act lrelu", [batch, c, res, res],
                    lambda x, impl, b: bias_act(x, b, act="lrelu", clamp=256, impl=impl), c, torch.contiguous_format))
        for layout in layouts:
            cl = " cl" if layout == "channels_last" else ""
            out += [(label + cl, shape, fn, 0, fmts[layout]) for label, shape, fn in [
                # G up-conv: the FIR filter (gain 4) after the stride-2 transposed 3x3 conv ([r+1] -> [r]).
                (f"{tag} upfirdn2d G up-conv filter", [batch, c, res + 1, res + 1],
                 lambda x, impl, b: upfirdn2d(x, f, padding=1, gain=4, impl=impl)),
                # D down-conv: the FIR filter before the stride-2 3x3 conv ([r] -> [r+1]).
                (f"{tag} upfirdn2d D down-conv filter", [batch, c, res, res],
                 lambda x, impl, b: upfirdn2d(x, f, padding=2, impl=impl)),
                # D resnet skip: filter + decimate before the 1x1 conv ([r] -> [r/2]).
                (f"{tag} upfirdn2d D skip down=2", [batch, c, res, res],
                 lambda x, impl, b: upfirdn2d(x, f, down=2, padding=1, impl=impl))]]
        out += [
            # G skip: upsample the RGB image ([r/2] -> [r]).
            (f"{tag} upsample2d G rgb", [batch, 3, res // 2, res // 2],
             lambda x, impl, b: upsample2d(x, f, impl=impl), 0, torch.contiguous_format),
            # D skip (and ADA-style downsampling of images): downsample the RGB image ([r] -> [r/2]).
            (f"{tag} downsample2d rgb", [batch, 3, res, res],
             lambda x, impl, b: downsample2d(x, f, impl=impl), 0, torch.contiguous_format),
        ]
        if res == max_res and f12 is not None:
            # ADA's geometric augmentation: 2x upsample of the reflect-padded image with the 12-tap filter, then
            # the 2x decimation back (flip_filter, 'valid'), on real-sized images.
            out += [(f"{tag} upsample2d ADA 12-tap", [batch, 3, res, res],
                     lambda x, impl, b: upsample2d(x, f12, impl=impl), 0, torch.contiguous_format),
                    (f"{tag} upfirdn2d ADA 12-tap down=2", [batch, 3, 2 * res + 10, 2 * res + 10],
                     lambda x, impl, b: upfirdn2d(x, f12, down=2, flip_filter=True, impl=impl), 0,
                     torch.contiguous_format)]
        res //= 2
    return out


def timeit(fn, device, budget=0.25, min_reps=3):
    """Best wall time in ms of fn() over enough repeats (at least `min_reps`, about `budget` seconds): the
    minimum is the least disturbed by other processes on a shared machine."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def peak_bandwidth(device):
    """The device's peak memory bandwidth in bytes/s and where it came from: the known table, else the bandwidth
    of a ~1 GiB device-to-device copy (read + write) as the practical peak; (None, why) on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, "no peak on CPU"
    name = torch.cuda.get_device_name(device)
    for key, bw, label in PEAK_BANDWIDTH:
        if key.lower() in name.lower():
            return bw, f"{name}: {label} spec {bw / 1e12:.2f} TB/s"
    a = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = timeit(lambda: b.copy_(a), device, budget=0.5, min_reps=5)
    bw = 2 * a.numel() / (ms / 1e3)
    return bw, f"{name}: measured 1 GiB device copy {bw / 1e12:.2f} TB/s (not in the table)"


def traffic(op, n_in, n_out, nbias, elem):
    """Minimal DRAM traffic in bytes of one case (each tensor read or written once): bias_act forward reads x and
    the bias and writes y, its backward reads gy and the saved tensor and writes gx and the bias gradient;
    upfirdn2d reads its input and writes its output, forward and backward alike."""
    if op == "bias_act":
        fwd = (2 * n_in + nbias) * elem
        return fwd, fwd + (3 * n_in + nbias) * elem
    return (n_in + n_out) * elem, 2 * (n_in + n_out) * elem


def bench_case(op, fn, shape, nbias, device, dtype, rep_budget, memory_format=torch.contiguous_format):
    """Time one case (fwd with no grad, and fwd+bwd with x and the bias requiring grad) for 'ref' and 'fused', on
    an input in `memory_format` (its gradient arrives in the output's layout).
    impl='fused' raises when the kernel is unavailable; a probe also checks that the kernel really ran forward
    and backward, so a silent fall-back to the reference is refused instead of timed. Returns the row fields or
    raises RuntimeError."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    b = torch.randn(nbias, generator=g, device=device, dtype=dtype) if nbias else None
    xg = x.clone().requires_grad_(True)
    bg = b.clone().requires_grad_(True) if b is not None else None
    with kernel_calls(op, device.type) as calls:
        with torch.no_grad():
            y = fn(x, "fused", b)
        fwd_calls = calls[0]
        fn(xg, "fused", bg).backward(torch.ones_like(y))
        bwd_calls = calls[0] - fwd_calls
    if fwd_calls == 0 or bwd_calls == 0:
        raise RuntimeError(f"impl='fused' fell back to the reference ({'forward' if fwd_calls == 0 else 'backward'} "
                           f"ran no kernel): not timed")
    gy = torch.randn(y.shape, generator=g, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    row = {}
    for impl in ("ref", "fused"):
        with torch.no_grad():
            row[f"ms_{impl}_fwd"] = timeit(lambda: fn(x, impl, b), device, rep_budget)

        def fwd_bwd():
            xg.grad = None
            if bg is not None:
                bg.grad = None
            fn(xg, impl, bg).backward(gy)
        row[f"ms_{impl}_fwd_bwd"] = timeit(fwd_bwd, device, rep_budget)
    row["bytes_fwd"], row["bytes_fwd_bwd"] = traffic(op, x.numel(), y.numel(), nbias, x.element_size())
    return row


def measure(time_case, peak):
    """time_case() (bench_case's fields: ms and bytes of 'ref' and 'fused') with ratio_*, gbps_* (fused) and
    pct_peak_* (None without a `peak` in bytes/s) added, forward and forward + backward: (fields, None); or (None,
    (kind, first line of the error)) where it ran out of memory (kind 'out of memory') or raised (kind 'error':
    the fall-back refused, or a kernel error)."""
    try:
        row = time_case()
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return None, ("out of memory", str(e).splitlines()[0])
    except (RuntimeError, _build.BuildError) as e:
        return None, ("error", (str(e).splitlines() or [""])[0])
    for mode in ("fwd", "fwd_bwd"):
        row[f"ratio_{mode}"] = row[f"ms_ref_{mode}"] / row[f"ms_fused_{mode}"]
        row[f"gbps_{mode}"] = row[f"bytes_{mode}"] / row[f"ms_fused_{mode}"] / 1e6
        row[f"pct_peak_{mode}"] = None if peak is None else 100 * row[f"gbps_{mode}"] * 1e9 / peak
    return row, None


def run_bench(device, dtype=torch.float32, resolutions=None, batch=None, budget_s: float = 600.0, min_res: int = 8,
              rep_budget: float = None, layouts=("contiguous", "channels_last")) -> list:
    """Time every case of `resolutions` (256 and 1024 px by default on CUDA, 256 on CPU) in `dtype` (every tensor
    of a case, bias and filter included) within `budget_s` seconds (the rest is marked skipped), the upfirdn2d
    feature-map cases in each of `layouts`. Rows: device, dtype, case, op, shape, layout,
    ms_{ref,fused}_{fwd,fwd_bwd}, ratio_fwd and ratio_fwd_bwd (ref / fused), bytes_fwd,
    bytes_fwd_bwd, gbps_fwd and gbps_fwd_bwd (fused), gbps_ref_fwd, gbps_ref_fwd_bwd, pct_peak_fwd and
    pct_peak_fwd_bwd (fused, CUDA only), peak_gbps, peak_source, skipped (None or the reason), ok (True: timed;
    False: the fused op is unavailable or fell back to the reference; None: out of time or memory)."""
    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    cpu = device.type == "cpu"
    resolutions = resolutions or ([256] if cpu else [256, 1024])
    batch = batch or (2 if cpu else 8)
    deadline = time.perf_counter() + budget_s
    dispatch.load_all(device.type)  # build both ops at once if not cached (part of the budget)
    f = setup_filter([1, 3, 3, 1], device=device).to(dtype)
    # A 12-tap 1-D filter standing for ADA's (its taps do not change the time; this script imports only ops).
    f12 = setup_filter(torch.hann_window(14, periodic=False)[1:-1], device=device).to(dtype)
    todo = [(max_res, c) for max_res in resolutions for c in cases(max_res, batch, f, min_res, f12, layouts)]
    if rep_budget is None:  # seconds per timing loop: 0.25 on CPU, 0.1 on CUDA, less when the budget is short
        rep_budget = min(0.25 if cpu else 0.1, budget_s / (8 * max(len(todo), 1)))
    peak, peak_source = peak_bandwidth(device)
    why_not = {op: dispatch.unavailable_reason(op, torch.empty(0, device=device, dtype=dtype))
               for op in ("bias_act", "upfirdn2d")}
    rows = []
    for _, (label, shape, fn, nbias, fmt) in todo:
        op = "bias_act" if "bias_act" in label else "upfirdn2d"
        row = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "case": label, "op": op,
               "shape": list(shape), "layout": "channels_last" if fmt == torch.channels_last else "contiguous",
               "peak_gbps": None if peak is None else peak / 1e9,
               "peak_source": peak_source, "skipped": None}
        for k in ("ms_ref_fwd", "ms_fused_fwd", "ms_ref_fwd_bwd", "ms_fused_fwd_bwd", "ratio_fwd",
                  "ratio_fwd_bwd", "bytes_fwd", "bytes_fwd_bwd", "gbps_fwd", "gbps_fwd_bwd", "gbps_ref_fwd",
                  "gbps_ref_fwd_bwd", "pct_peak_fwd", "pct_peak_fwd_bwd"):
            row[k] = None
        rows.append(row)
        if why_not[op]:
            row["skipped"] = f"fused {op} unavailable: {why_not[op]}"
            continue
        if time.perf_counter() > deadline:
            row["skipped"] = f"time budget of {budget_s:g} s spent"
            continue
        fields, why = measure(lambda: bench_case(op, fn, shape, nbias, device, dtype, rep_budget, fmt), peak)
        if why is not None:
            kind, message = why
            row["skipped"] = f"{kind}: {message}" if kind == "out of memory" else message
            continue
        row.update(fields)
        for mode in ("fwd", "fwd_bwd"):
            row[f"gbps_ref_{mode}"] = row[f"bytes_{mode}"] / row[f"ms_ref_{mode}"] / 1e6
    for row in rows:  # ok: timed; False: the fused op could not be timed; None: out of time or memory
        row["ok"] = True if row["skipped"] is None else (False if is_failure(row) else None)
    return rows


def is_failure(row):
    """Whether a skipped row means the fused op could not be timed (unavailable, fell back, kernel error), not
    that time or memory ran out."""
    return row["skipped"] is not None and not row["skipped"].startswith(("time budget", "out of memory"))


def print_table(rows):
    """Print rows as a table (ms, ratio = ref / fused, fused GB/s and, on CUDA, % of peak) with per-model totals."""
    cuda = any(r["pct_peak_fwd"] is not None for r in rows)
    pk = f" {'%pk':>5s} {'%pk':>5s}" if cuda else ""
    head = (f"{'case':44s} {'shape':>19s} | {'fwd ref':>8s} {'fused':>8s} {'ratio':>6s} | {'f+b ref':>8s} "
            f"{'fused':>8s} {'ratio':>6s} | {'GB/s f':>7s} {'GB/s fb':>7s}{pk}")
    print(head)
    print("-" * len(head))
    totals = {}
    for r in rows:
        if r["skipped"]:
            print(f"{r['case']:44s} {str(r['shape']):>19s} | skipped: {r['skipped']}")
            continue
        key = (r["case"].split()[0], r["op"])
        t = totals.setdefault(key, {"fwd": [0.0, 0.0], "fwd_bwd": [0.0, 0.0], "worst": [math.inf, math.inf]})
        for i, mode in enumerate(("fwd", "fwd_bwd")):
            t[mode][0] += r[f"ms_ref_{mode}"]
            t[mode][1] += r[f"ms_fused_{mode}"]
            t["worst"][i] = min(t["worst"][i], r[f"ratio_{mode}"])
        pct = f" {r['pct_peak_fwd']:5.1f} {r['pct_peak_fwd_bwd']:5.1f}" if cuda else ""
        print(f"{r['case']:44s} {str(r['shape']):>19s} | {r['ms_ref_fwd']:8.2f} {r['ms_fused_fwd']:8.2f} "
              f"{r['ratio_fwd']:6.2f} | {r['ms_ref_fwd_bwd']:8.2f} {r['ms_fused_fwd_bwd']:8.2f} "
              f"{r['ratio_fwd_bwd']:6.2f} | {r['gbps_fwd']:7.1f} {r['gbps_fwd_bwd']:7.1f}{pct}", flush=True)
    print("-" * len(head))
    for (model, op), t in totals.items():
        (rf, ff), (rb, fb) = t["fwd"], t["fwd_bwd"]
        print(f"{f'{model} {op} total':44s} {'':>19s} | {rf:8.2f} {ff:8.2f} {rf / ff:6.2f} | {rb:8.2f} {fb:8.2f} "
              f"{rb / fb:6.2f}   (worst row: fwd {t['worst'][0]:.2f}, f+b {t['worst'][1]:.2f})")


def main(argv=None):
    """Time and print every case (the command line); 0 when every fused op could be timed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to time on (default: cuda when present)")
    parser.add_argument("--res", type=int, nargs="+", default=None,
                        help="model resolutions (default: 256 on CPU, 256 and 1024 on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 2 on CPU, 8 on CUDA)")
    parser.add_argument("--min-res", type=int, default=8, help="smallest block resolution to time")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"],
                        help="tensor dtype of every row")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all rows (default: 90 on CPU, 600 on CUDA); the rest is marked skipped")
    parser.add_argument("--layout", choices=["both", "contiguous", "channels_last"], default="both",
                        help="memory layouts of the upfirdn2d feature-map cases (default: both)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both paths (default: torch's; 1 gives stable numbers on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    dtype = getattr(torch, args.dtype)
    batch = args.batch or (2 if cpu else 8)
    budget = args.budget if args.budget is not None else (90.0 if cpu else 600.0)
    peak, source = peak_bandwidth(device)
    print(f"device {device} ({torch.get_num_threads()} threads on CPU), dtype {args.dtype} (inputs, bias, filter), "
          f"batch {batch}; best-of-N ms; ratio = ref / fused; GB/s = minimal bytes moved / fused time; "
          f"peak: {source}")
    layouts = ("contiguous", "channels_last") if args.layout == "both" else (args.layout,)
    rows = run_bench(device, dtype, args.res, batch, budget, args.min_res, layouts=layouts)
    print_table(rows)
    failed = sorted({r["skipped"] for r in rows if is_failure(r)})
    for why in failed:
        print(f"NOT TIMED: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
