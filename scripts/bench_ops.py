"""Times reference vs fused bias_act/upfirdn2d at the shapes of a 256 px (and 1024 px) StyleGAN2; prints ratios."""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ops import _fused  # noqa: E402
from ops.bias_act import bias_act  # noqa: E402
from ops.upfirdn2d import downsample2d, setup_filter, upfirdn2d, upsample2d  # noqa: E402


# Feature maps at resolution `res` (StyleGAN2: min(cbase / res, 512); cbase 16384 at 256 px, 32768 at 1024 px).
def channels(res: int, max_res: int) -> int:
    cbase = 16384 if max_res <= 256 else 32768
    return min(cbase // res, 512)


# The op calls of one model: (label, shape, fn(x, impl)) per distinct shape, per resolution (G and D blocks).
def cases(max_res: int, batch: int, f, min_res: int):
    out = []
    res = max_res
    while res >= min_res:
        c = channels(res, max_res)
        tag = f"{max_res}px r{res}"
        out += [
            # Conv layers of G and D: bias + lrelu (gain sqrt 2) + clamp 256, on every block's activations.
            (f"{tag} bias_act lrelu", [batch, c, res, res],
             lambda x, impl, c=c: bias_act(x, torch.ones(c, device=x.device), act="lrelu", clamp=256, impl=impl)),
            # G up-conv: the FIR filter (gain 4) after the stride-2 transposed 3x3 conv ([r+1] -> [r]).
            (f"{tag} upfirdn2d G up-conv filter", [batch, c, res + 1, res + 1],
             lambda x, impl: upfirdn2d(x, f, padding=1, gain=4, impl=impl)),
            # D down-conv: the FIR filter before the stride-2 3x3 conv ([r] -> [r+1]).
            (f"{tag} upfirdn2d D down-conv filter", [batch, c, res, res],
             lambda x, impl: upfirdn2d(x, f, padding=2, impl=impl)),
            # D resnet skip: filter + decimate before the 1x1 conv ([r] -> [r/2]).
            (f"{tag} upfirdn2d D skip down=2", [batch, c, res, res],
             lambda x, impl: upfirdn2d(x, f, down=2, padding=1, impl=impl)),
            # G skip: upsample the RGB image ([r/2] -> [r]).
            (f"{tag} upsample2d G rgb", [batch, 3, res // 2, res // 2],
             lambda x, impl: upsample2d(x, f, impl=impl)),
            # D skip (and ADA-style downsampling of images): downsample the RGB image ([r] -> [r/2]).
            (f"{tag} downsample2d rgb", [batch, 3, res, res],
             lambda x, impl: downsample2d(x, f, impl=impl)),
        ]
        res //= 2
    return out


# Best wall time in ms of fn() over enough repeats (at least `min_reps`, about `budget` seconds): the minimum is
# the least disturbed by other processes on a shared machine.
def timeit(fn, device, budget=0.25, min_reps=3):
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


# Forward and forward+backward times of one case for impl 'ref' and 'fused'.
def bench_case(fn, shape, device, dtype):
    x = torch.randn(shape, device=device, dtype=dtype)
    xg = x.clone().requires_grad_(True)
    gy = torch.randn_like(fn(x, "ref"))
    row = {}
    for impl in ("ref", "fused"):
        with torch.no_grad():
            row[("fwd", impl)] = timeit(lambda: fn(x, impl), device)

        def fwd_bwd():
            xg.grad = None
            fn(xg, impl).backward(gy)
        row[("fwd+bwd", impl)] = timeit(fwd_bwd, device)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--res", type=int, nargs="+", default=None,
                        help="model resolutions (default: 256 on CPU, 256 and 1024 on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 2 on CPU, 8 on CUDA)")
    parser.add_argument("--min-res", type=int, default=8, help="smallest block resolution to time")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both paths (default: torch's; 1 gives stable numbers on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    resolutions = args.res or ([256] if cpu else [256, 1024])
    batch = args.batch or (2 if cpu else 8)
    dtype = getattr(torch, args.dtype)
    for op in ("bias_act", "upfirdn2d"):
        why = _fused.unavailable_reason(op, torch.empty(1, device=device, dtype=dtype))
        if why:
            print(f"fused {op} unavailable on {device} ({why}); nothing to compare")
            return 1
    f = setup_filter([1, 3, 3, 1], device=device)
    print(f"device {device} ({torch.get_num_threads()} threads on CPU), dtype {args.dtype}, batch {batch}; "
          f"best-of-N ms; ratio = ref / fused")
    head = f"{'case':38s} {'shape':>20s} | {'fwd ref':>8s} {'fused':>8s} {'ratio':>6s} | " \
           f"{'f+b ref':>8s} {'fused':>8s} {'ratio':>6s}"
    print(head)
    print("-" * len(head))
    totals = {}
    worst = {}
    for max_res in resolutions:
        for label, shape, fn in cases(max_res, batch, f, args.min_res):
            r = bench_case(fn, shape, device, dtype)
            op = "bias_act" if "bias_act" in label else "upfirdn2d"
            for k, v in r.items():
                totals[(max_res, op) + k] = totals.get((max_res, op) + k, 0.0) + v
            for mode in ("fwd", "fwd+bwd"):
                ratio = r[(mode, "ref")] / r[(mode, "fused")]
                worst[(max_res, op, mode)] = min(worst.get((max_res, op, mode), float("inf")), ratio)
            print(f"{label:38s} {str(shape):>20s} | {r['fwd', 'ref']:8.2f} {r['fwd', 'fused']:8.2f} "
                  f"{r['fwd', 'ref'] / r['fwd', 'fused']:6.2f} | {r['fwd+bwd', 'ref']:8.2f} "
                  f"{r['fwd+bwd', 'fused']:8.2f} {r['fwd+bwd', 'ref'] / r['fwd+bwd', 'fused']:6.2f}", flush=True)
    print("-" * len(head))
    for max_res in resolutions:
        for op in ("bias_act", "upfirdn2d"):
            t = {k[2:]: v for k, v in totals.items() if k[:2] == (max_res, op)}
            print(f"{f'{max_res}px {op} total':38s} {'':>20s} | {t['fwd', 'ref']:8.2f} {t['fwd', 'fused']:8.2f} "
                  f"{t['fwd', 'ref'] / t['fwd', 'fused']:6.2f} | {t['fwd+bwd', 'ref']:8.2f} "
                  f"{t['fwd+bwd', 'fused']:8.2f} {t['fwd+bwd', 'ref'] / t['fwd+bwd', 'fused']:6.2f}   "
                  f"(worst row: fwd {worst[max_res, op, 'fwd']:.2f}, f+b {worst[max_res, op, 'fwd+bwd']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
