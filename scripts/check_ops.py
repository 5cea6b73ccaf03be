"""Builds the fused ops, checks them against the reference on every device present, times them, and reports."""
import argparse
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ops import _build, _fused, dispatch  # noqa: E402
from ops.bias_act import activation_funcs, bias_act  # noqa: E402
from ops.upfirdn2d import setup_filter, upfirdn2d  # noqa: E402

# Parity tolerances (max abs error on O(1) data) per dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


# Max abs difference of forward outputs and of the gradients w.r.t. every input, fused vs reference.
def parity(fn, inputs, device):
    errs = {}
    outs = {}
    for impl in ("ref", "fused"):
        xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        y = fn(*xs, impl=impl)
        gy = torch.ones_like(y) * torch.linspace(-1, 1, y.numel(), device=device, dtype=y.dtype).reshape(y.shape)
        grads = torch.autograd.grad(y, [x for x in xs if x.requires_grad], gy)
        outs[impl] = (y.detach(), [g.detach() for g in grads])
    errs["fwd"] = (outs["ref"][0].double() - outs["fused"][0].double()).abs().max().item()
    errs["bwd"] = max((a.double() - b.double()).abs().max().item() for a, b in zip(outs["ref"][1], outs["fused"][1]))
    return errs


# Parity cases: every activation (with gain/clamp) and a set of up/down/padding/filter configurations.
def parity_cases(device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    cases = []
    for act in activation_funcs:
        cases.append((f"bias_act {act} clamp=1", lambda x, b, impl, act=act: bias_act(x, b, act=act, clamp=1.0,
                                                                                    impl=impl),
                      [rnd(2, 8, 9, 7), rnd(8)]))
    cases.append(("bias_act lrelu dim=0 [N,C]", lambda x, b, impl: bias_act(x, b, dim=0, act="lrelu", impl=impl),
                  [rnd(16, 5), rnd(16)]))
    f4 = setup_filter([1, 3, 3, 1], device=device)
    f2d = torch.randn(3, 5, generator=g).to(device)
    for name, f, kw in [("upsample 2x", f4, dict(up=2, padding=[2, 1, 2, 1], gain=4)),
                        ("downsample 2x", f4, dict(down=2, padding=1)),
                        ("filter pad 2", f4, dict(padding=2)),
                        ("up3 down2 2-D filter", f2d, dict(up=3, down=2, padding=[1, -1, 2, 0])),
                        ("1-D filter, flip", torch.tensor([1.0, 2.0, 5.0], device=device),
                         dict(down=(1, 2), padding=[0, 1, 2, 2], flip_filter=True))]:
        cases.append((f"upfirdn2d {name}", lambda x, impl, f=f, kw=kw: upfirdn2d(x, f, impl=impl, **kw),
                      [rnd(2, 4, 13, 11)]))
    return cases


# fwd+bwd time of fn(x, impl) in ms (best of a few), for the short benchmark.
def fwd_bwd_ms(fn, x, device, reps=10):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    xg = x.clone().requires_grad_(True)
    times = []
    for _ in range(reps + 1):  # the first (warm-up) run is not counted
        xg.grad = None
        sync()
        t0 = time.perf_counter()
        y = fn(xg)
        y.backward(torch.ones_like(y))
        sync()
        times.append(time.perf_counter() - t0)
    return min(times[1:]) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cuda-build", action="store_true",
                        help="also compile the CUDA extensions when no GPU is present (compile check only)")
    args = parser.parse_args(argv)
    ok = True
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), default ops impl '{dispatch.default_impl()}' "
          f"(GANFORGE_OPS_IMPL={os.environ.get('GANFORGE_OPS_IMPL', '')!r}), cache {_build.cache_root()}")
    print(f"ninja: {shutil.which('ninja') or 'NOT FOUND'}; CUDA toolkit: {_build.find_cuda_home() or 'NOT FOUND'}; "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')!r}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    # Build.
    built = {}
    for dev in devices + ([] if torch.cuda.is_available() or not args.cuda_build else [torch.device("cuda")]):
        t0 = time.time()
        for op, result in _fused.load_all(dev.type).items():  # the ops of a device build in parallel
            built[op, dev.type] = not isinstance(result, Exception)
            if built[op, dev.type]:
                print(f"[build] {op:9s} {dev.type:4s}: built/loaded ({time.time() - t0:.1f} s for all ops)")
            else:
                ok = False
                print(f"[build] {op:9s} {dev.type:4s}: NOT BUILT: {result}")

    # Parity and a short benchmark on each device with built kernels.
    for dev in devices:
        dtypes = [torch.float32, torch.float64] + ([torch.float16, torch.bfloat16] if dev.type == "cuda" else [])
        for dtype in dtypes:
            worst = {}
            for name, fn, inputs in parity_cases(dev, dtype):
                op = name.split()[0]
                if not built.get((op, dev.type)):
                    continue
                e = parity(fn, inputs, dev)
                if op not in worst or max(e["fwd"], e["bwd"]) > max(worst[op][:2]):
                    worst[op] = (e["fwd"], e["bwd"], name)
                if max(e["fwd"], e["bwd"]) > TOL[dtype]:
                    ok = False
                    print(f"[parity] {dev.type} {dtype}: {name}: fwd {e['fwd']:.2e} bwd {e['bwd']:.2e} > {TOL[dtype]}")
            for op, (fe, be, name) in worst.items():
                flag = "ok" if max(fe, be) <= TOL[dtype] else "FAIL"
                print(f"[parity] {op:9s} {dev.type:4s} {str(dtype)[6:]:8s}: max abs error fwd {fe:.2e}, "
                      f"bwd {be:.2e} (worst: {name}) {flag}")
        shape = [2, 64, 64, 64] if dev.type == "cpu" else [8, 256, 128, 128]
        x = torch.randn(shape, device=dev)
        f4 = setup_filter([1, 3, 3, 1], device=dev)
        b = torch.zeros(shape[1], device=dev)
        for op, fn in [("bias_act", lambda x, impl: bias_act(x, b, act="lrelu", clamp=256, impl=impl)),
                       ("upfirdn2d", lambda x, impl: upfirdn2d(x, f4, padding=2, impl=impl))]:
            if built.get((op, dev.type)):
                r = fwd_bwd_ms(lambda t: fn(t, "ref"), x, dev)
                f = fwd_bwd_ms(lambda t: fn(t, "fused"), x, dev)
                print(f"[bench]  {op:9s} {dev.type:4s} fwd+bwd {shape}: ref {r:.2f} ms, fused {f:.2f} ms, "
                      f"speed-up {r / f:.2f}x")
    print("all fused ops built and match the reference" if ok else
          "SOME FUSED OPS ARE UNAVAILABLE OR WRONG: impl='auto' uses the reference for them (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
