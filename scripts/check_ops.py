"""Builds the fused ops, checks them against a float64 truth (values, 1st/2nd derivatives, layouts) and times them."""
import argparse
import contextlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import bench_ops
from ops import _build, dispatch
from ops.bias_act import activation_funcs, bias_act
from ops.dispatch import kernel_calls
from ops.filters import SYM6
from ops.tolerance import FLOOR, K_REF, REF_DTYPE, ULPS, compare, ulp_error  # noqa: F401 - the one rule
from ops.upfirdn2d import setup_filter, upfirdn2d

# Dtypes checked by default per device type (the CPU kernels have no float16/bfloat16: reported as skipped).
DEFAULT_DTYPES = {"cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                  "cuda": (torch.float32, torch.float16, torch.bfloat16)}
ORDERS = ("fwd", "grad", "grad2")
LAYOUTS = ("contiguous", "channels_last", "strided", "transposed")

# The >2^31-element check: 3718 x 64 planes of 95 x 95 = 2^31 + 33,152 elements, so 2^31 falls inside a plane.
LARGE_SHAPE = (3718, 64, 95, 95)
INDEX_LIMIT = 2 ** 31  # the int32 boundary whose neighbours are compared (tests make it small)


@dataclass
class Case:
    """One parity case: make(device, absolute) -> fn(x, b, impl) (absolute: |filter| taps, for the magnitude of a
    linear op); dim is the bias dim (None: no bias); act holds bias_act's arguments (to keep data off the clamp
    edge)."""
    op: str
    name: str
    shape: tuple
    make: Callable
    dim: Optional[int] = None
    x_scale: float = 1.0
    act: dict = field(default_factory=dict)


# A bias_act case with the given activation arguments.
def _bias_case(name, act, shape=(2, 8, 9, 7), dim=1, bias=True, x_scale=1.0):
    make = lambda device, absolute: (lambda x, b, impl: bias_act(x, b, dim=dim, impl=impl, **act))  # noqa: E731
    return Case("bias_act", name, shape, make, dim if bias else None, x_scale, act)


# An upfirdn2d case: filt(device) builds the filter; kw are upfirdn2d's arguments.
def _fir_case(name, filt, kw, shape=(2, 3, 24, 22)):
    def make(device, absolute):
        f = filt(device).abs() if absolute else filt(device)
        return lambda x, b, impl: upfirdn2d(x, f, impl=impl, **kw)
    return Case("upfirdn2d", name, shape, make)


def parity_cases():
    """Every activation (with its default gain and clamp 1), a large-magnitude case, no bias, dim 0; and
    upfirdn2d with up 2, down 2, up/down with a 2-D filter, padding and crop, flip, gain, the [1,3,3,1] filter
    and ADA's 12-tap sym6 (1-D, i.e. separable, as ADA uses it: upsample2d, then down 2 with the flipped filter;
    and as a 12x12 2-D filter)."""
    cases = [_bias_case(f"{a} clamp=1", dict(act=a, clamp=1.0)) for a in activation_funcs]
    cases += [_bias_case("lrelu alpha=0.3 gain=2 x*64 (|y|~100)", dict(act="lrelu", alpha=0.3, gain=2.0), x_scale=64),
              _bias_case("swish gain=0.7 no bias", dict(act="swish", gain=0.7), bias=False),
              _bias_case("lrelu dim=0 [N, C]", dict(act="lrelu"), shape=(16, 5), dim=0)]
    f4 = lambda d: setup_filter([1, 3, 3, 1], device=d)  # noqa: E731
    f3 = lambda d: torch.tensor([1.0, 2.0, 5.0], device=d)  # noqa: E731
    f2d = lambda d: torch.tensor([[0.3, -0.5, 1.0, 0.2, 0.1], [0.7, 1.5, -0.4, 0.9, 0.3],  # noqa: E731
                                  [0.2, 0.4, 0.8, -0.6, 0.5]], device=d)
    s6 = lambda d: setup_filter(SYM6, device=d)  # noqa: E731
    s6_2d = lambda d: setup_filter(SYM6, device=d, separable=False)  # noqa: E731
    fir = [("up2 [1,3,3,1] gain 4", f4, dict(up=2, padding=[2, 1, 2, 1], gain=4)),
           ("down2 [1,3,3,1]", f4, dict(down=2, padding=1)),
           ("filter pad 2 [1,3,3,1]", f4, dict(padding=2)),
           ("up3 down2 2-D 3x5 pad/crop", f2d, dict(up=3, down=2, padding=[1, -1, 2, 0])),
           ("up(2,1) down(1,2) [1,2,5] crop flip gain 2.5", f3,
            dict(up=(2, 1), down=(1, 2), padding=[-1, 1, 2, -2], flip_filter=True, gain=2.5)),
           ("sym6 upsample2d (ADA)", s6, dict(up=2, padding=[6, 5, 6, 5], gain=4)),
           ("sym6 down2 flip crop (ADA)", s6, dict(down=2, flip_filter=True, padding=[-1, -1, -2, 0])),
           ("sym6 2-D 12x12 down2", s6_2d, dict(down=2, padding=5))]
    return cases + [_fir_case(name, f, kw) for name, f, kw in fir]


def with_layout(t, layout):
    """t with the same values in another memory layout: a channels-last copy, every other element of a
    twice-as-wide buffer (strided), or a view with the last two dims swapped from a contiguous buffer
    (transposed)."""
    if t is None or layout == "contiguous":
        return t if t is None else t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t.contiguous()
    if layout == "strided":
        big = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.ndim >= 2 else t.contiguous()
    raise ValueError(f"unknown layout {layout!r}")


# Sum over every dim but `dim`.
def _sum_except(t, dim):
    return t.sum(dim=[i for i in range(t.ndim) if i != dim])


def derivatives(fn, x, b, gy, v, calls=None):
    """Forward; first derivatives by a plain backward (as in training); and with create_graph (as R1 and path
    length need) the first derivatives again plus the gradient of (dx . v) w.r.t. x, the bias and gy. Returns
    {order: {name: tensor}} and, when `calls` counts kernel calls, how many ran in each phase."""
    leaf = lambda t: None if t is None else t.detach().requires_grad_(True)  # noqa: E731
    count = {}

    @contextlib.contextmanager
    def phase(order):  # kernel calls made inside
        before = calls[0] if calls else 0
        yield
        count[order] = (calls[0] if calls else 0) - before
    xs, bs, gys = leaf(x), leaf(b), leaf(gy)
    wrt = [xs] + ([bs] if bs is not None else [])
    names = ["x", "b"][:len(wrt)]
    with phase("fwd"):
        y = fn(xs, bs)
    with phase("grad"):
        g = torch.autograd.grad(y, wrt, gy, retain_graph=True)
    with phase("grad2"):
        g1 = torch.autograd.grad(y, wrt, gys, create_graph=True)
        g2 = torch.autograd.grad((g1[0] * v).sum(), wrt + [gys], allow_unused=True)
    out = {"fwd": {"y": y.detach()}, "grad": {"d" + n: t.detach() for n, t in zip(names, g)},
           "grad2": {f"d{n}(cg)": t.detach() for n, t in zip(names, g1)}}
    for n, d, t in zip(names + ["gy"], g2, wrt + [gys]):
        out["grad2"]["d2" + n] = (torch.zeros_like(t) if d is None else d).detach()
    return out, count


# Inputs of one case in one dtype and layout (values rounded to the dtype; the float64 truth starts from the same
# rounded values). bias_act inputs within rounding distance of the clamp level move to z = 0: there the derivative
# jumps from gain * act' to 0 and rounding decides the side, so both answers would be right.
def _inputs(case, fn_ref, dtype, device, layout, seed):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda shape, k=1.0: (torch.randn(shape, generator=g, dtype=torch.float64) * k).to(  # noqa: E731
        REF_DTYPE.get(dtype, dtype)).to(device=device, dtype=dtype)
    x = rnd(case.shape, case.x_scale)
    b = rnd(case.shape[case.dim]) if case.dim is not None else None
    if case.act.get("clamp") is not None:
        args = {k: v for k, v in case.act.items() if k != "clamp"}
        pre = bias_act(x.double(), None if b is None else b.double(), dim=case.dim or 0, impl="ref", **args).abs()
        near = (pre - case.act["clamp"]).abs() <= 16 * max(torch.finfo(dtype).eps, 2.0 ** -20) * case.act["clamp"]
        if near.any():
            nb = 0 if b is None else -b.reshape([-1 if i == case.dim else 1 for i in range(x.ndim)])
            x = torch.where(near, nb + torch.zeros_like(x), x)
    with torch.no_grad():
        out_shape = fn_ref(x.double(), None if b is None else b.double()).shape
    gy, v = rnd(out_shape), rnd(case.shape)
    return tuple(with_layout(t, layout) for t in (x, b, gy, v))  # a 1-D bias is only ever strided


# Per-element magnitudes: for upfirdn2d (linear) the same derivatives with |filter| on |inputs| (sum of |terms|);
# for bias_act (element-wise) |truth|, and for bias gradients the sum of |terms| over the summed dims.
def _scales(case, device, truth, x64, gy64, v64):
    if case.op == "upfirdn2d":
        fn = case.make(device, True)
        return derivatives(lambda x, b: fn(x, b, "ref"), x64.abs(), None, gy64.abs(), v64.abs())[0]
    src = {"db": "dx", "db(cg)": "dx(cg)", "d2b": "d2x"}
    return {o: {n: (_sum_except(truth[o][src[n]].abs(), case.dim) if n in src else t.abs())
                for n, t in ts.items()} for o, ts in truth.items()}


# A result row; `skipped` is None for rows that ran, else why not (ok is then None).
def _row(device, case_op, case_name, dtype, layout, order, **kw):
    return dict({"device": str(device), "op": case_op, "case": case_name, "dtype": str(dtype).replace("torch.", ""),
                 "layout": layout, "order": order, "err": None, "err_ref": None, "tol": None, "ok": None, "wrt": "",
                 "ref_dtype": None, "max_abs": None, "skipped": None, "detail": ""}, **kw)


def run_parity(device, dtypes=None, budget_s: float = 600.0, ops=None, layouts=LAYOUTS) -> list:
    """Fused vs float64 truth for every case, dtype, layout and derivative order on `device` within `budget_s`
    seconds (a first build included; the rest is marked skipped). Rows: device, op, case, dtype, layout, order
    ('fwd'|'grad'|'grad2'), err, err_ref, tol (eps units), ref_dtype, ok, wrt (worst tensor), max_abs, skipped
    (None|why), detail."""
    device = torch.device(device)
    dtypes = dtypes or DEFAULT_DTYPES.get(device.type, [torch.float32])
    dtypes = [getattr(torch, d) if isinstance(d, str) else d for d in dtypes]  # names accepted too
    deadline = time.perf_counter() + budget_s
    dispatch.load_all(device.type)  # build both ops at once (in parallel) if not cached; failures show in the rows
    rows = []
    cases = [c for c in parity_cases() if ops is None or c.op in ops]
    threads = torch.get_num_threads()
    if device.type == "cpu":  # tiny tensors: one thread is faster, and much faster on a busy machine
        torch.set_num_threads(1)
    try:
        with dispatch.self_checks(False):  # this check compares the kernels itself (and must see a wrong one run)
            for dtype in dtypes:
                rows += _parity_dtype(device, dtype, cases, layouts, deadline, budget_s)
    finally:
        torch.set_num_threads(threads)
    return rows


# The rows of run_parity for one dtype.
def _parity_dtype(device, dtype, cases, layouts, deadline, budget_s):
    rows, usable = [], {}
    for op in dict.fromkeys(c.op for c in cases):
        why = dispatch.unavailable_reason(op, torch.empty(0, device=device, dtype=dtype))
        usable[op] = why is None
        if why is not None:  # unsupported dtype: skipped; supported but not built: a failure
            supported = dtype in dispatch.SUPPORTED_DTYPES.get(device.type, ())
            rows.append(_row(device, op, "(all)", dtype, "(all)", "(all)", ok=False if supported else None,
                             skipped=None if supported else why, detail=why))
    for ci, case in enumerate(cases):
        if not usable[case.op]:
            continue
        fn = case.make(device, False)
        fn_ref = lambda x, b: fn(x, b, "ref")  # noqa: E731
        fn_fused = lambda x, b: fn(x, b, "fused")  # noqa: E731
        for layout in [lo for lo in layouts if lo != "channels_last" or len(case.shape) == 4]:  # 4-D only
            if time.perf_counter() > deadline:
                rows += [_row(device, case.op, case.name, dtype, layout, o,
                              skipped=f"time budget of {budget_s:.0f} s spent") for o in ORDERS]
                continue
            rows += _parity_rows(case, device, dtype, layout, fn_ref, fn_fused, seed=1000 + ci)
    return rows


# The three rows (fwd, grad, grad2) of one case in one dtype and layout.
def _parity_rows(case, device, dtype, layout, fn_ref, fn_fused, seed):
    x, b, gy, v = _inputs(case, fn_ref, dtype, device, layout, seed)
    rd = REF_DTYPE.get(dtype, dtype)
    x64, b64, gy64, v64 = [None if t is None else t.double() for t in (x, b, gy, v)]
    truth, _ = derivatives(fn_ref, x64, b64, gy64, v64)
    ref, _ = derivatives(fn_ref, *[None if t is None else t.to(rd) for t in (x, b, gy, v)])
    scales = _scales(case, device, truth, x64, gy64, v64)
    try:
        with kernel_calls(case.op, device.type) as calls:
            fused, count = derivatives(fn_fused, x, b, gy, v, calls)
    except Exception as e:  # noqa: BLE001 - a kernel error is a failed row, not a crash of the whole check
        return [_row(device, case.op, case.name, dtype, layout, o, ok=False, detail=f"{type(e).__name__}: {e}")
                for o in ORDERS]
    rows = []
    for order in ORDERS:
        worst = max((dict(compare(fused[order][n], ref[order][n], t, scales[order][n], dtype, rd), wrt=n)
                     for n, t in truth[order].items()), key=_badness)
        if count[order] == 0:
            worst.update(ok=False, detail="impl='fused' called no kernel here: it fell back to the reference")
        rows.append(_row(device, case.op, case.name, dtype, layout, order, ref_dtype=str(rd)[6:], **worst))
    return rows


# Sort key of a comparison: failures first, then the largest err / tol.
def _badness(c):
    return (not c["ok"], (c["err"] or 0.0) / (c["tol"] or 1.0))


# Plane indices (of `planes` planes of `plane` elements) holding the first and last elements, and the elements on
# either side of every multiple of 2^31 below plane * planes.
def _boundary_planes(plane, planes):
    idx = {0, planes - 1}
    k = 1
    while k * INDEX_LIMIT < plane * planes:
        idx |= {(k * INDEX_LIMIT - 1) // plane, (k * INDEX_LIMIT) // plane}
        k += 1
    return sorted(idx)


def check_large_tensor(device, budget_s: float = 300.0, force: bool = False) -> list:
    """Fused ops on a tensor of more than 2^31 elements (LARGE_SHAPE, float16 on CUDA): bias_act forward and
    gradients (x and bias) and upfirdn2d up 2 (output > 2^33 elements) and down 2, compared at the first and last
    planes and those around each multiple of 2^31 with the reference run on those planes only. Rows as
    run_parity's, plus numel. On CPU it is skipped (float32: about 48 GiB of memory) unless `force`."""
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    s = list(LARGE_SHAPE)
    checks = [("bias_act", f"lrelu clamp=256 {s}", "fwd"), ("bias_act", f"lrelu clamp=256 {s} (x, bias)", "grad"),
              ("upfirdn2d", f"up2 [1,3,3,1] {s}", "fwd"), ("upfirdn2d", f"down2 [1,3,3,1] {s}", "fwd")]
    numel = math.prod(LARGE_SHAPE)
    why = (f"needs ~{6 * numel * 4 / 2 ** 30:.0f} GiB of memory in float32 (no float16 CPU kernels); run it on CPU "
           f"only when asked (--large / force=True)") if device.type == "cpu" and not force else None
    rows = [_row(device, op, name, dtype, "contiguous", order, numel=numel, skipped=why) for op, name, order in checks]
    if why:
        return rows
    deadline = time.perf_counter() + budget_s
    dispatch.load_all(device.type)
    try:
        with dispatch.self_checks(False):
            _large_checks(device, dtype, rows, deadline, budget_s)
    except Exception as e:  # noqa: BLE001 - out of memory: skipped; a kernel or build error: that row failed
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        for r in [r for r in rows if r["ok"] is None and r["skipped"] is None]:
            if isinstance(e, torch.cuda.OutOfMemoryError):
                r["skipped"] = f"out of memory: {why}"
            elif why:
                r.update(ok=False, detail=why)
                why = ""
            else:
                r["skipped"] = "not run after the error above"
    return rows


# The body of check_large_tensor: fills in `rows` in order, each compared on sampled planes (plus, for the bias
# gradient, every element against a float64 sum over chunks).
def _large_checks(device, dtype, rows, deadline, budget_s):
    gen = torch.Generator(device=device).manual_seed(7)
    N, C, H, W = LARGE_SHAPE
    x = torch.randn(LARGE_SHAPE, device=device, dtype=dtype, generator=gen)
    b = torch.randn(C, device=device, dtype=dtype, generator=gen)
    P = torch.tensor(_boundary_planes(H * W, N * C), device=device)
    xs = x.view(N * C, H, W)[P]  # the sampled planes, for the reference
    act = dict(act="lrelu", clamp=256.0)
    f4 = setup_filter([1, 3, 3, 1], device=device)

    # bias_act on the sampled planes (each plane its channel's bias) in dtype dt, or its gradient for gy's planes.
    def bias_ref(dt, gys=None):
        t = xs.to(dt).detach().requires_grad_(gys is not None)
        y = bias_act(t[None], b.to(dt)[P % C], impl="ref", **act)[0]
        return y.detach() if gys is None else torch.autograd.grad(y, t, gys.to(dt))[0]

    for i, row in enumerate(rows):
        if time.perf_counter() > deadline:
            row["skipped"] = f"time budget of {budget_s:.0f} s spent"
            continue
        with kernel_calls(row["op"], device.type) as calls:
            if i == 0:
                with torch.no_grad():
                    y = bias_act(x, b, impl="fused", **act).view(N * C, H, W)[P]
                truth = bias_ref(torch.float64)
                c = compare(y, bias_ref(dtype), truth, truth, dtype)
            elif i == 1:
                xg, bg = x.detach().requires_grad_(True), b.detach().requires_grad_(True)
                gy = torch.randn(LARGE_SHAPE, device=device, dtype=dtype, generator=gen)
                gx, gb = torch.autograd.grad(bias_act(xg, bg, impl="fused", **act), [xg, bg], gy)
                gys = gy.view(N * C, H, W)[P]
                truth = bias_ref(torch.float64, gys)
                c = dict(compare(gx.view(N * C, H, W)[P], bias_ref(dtype, gys), truth, truth, dtype), wrt="dx")
                tb, sb = (torch.zeros(C, dtype=torch.float64, device=device) for _ in range(2))
                for n0 in range(0, N, 256):  # the float64 bias gradient over every element, in chunks
                    t = x[n0:n0 + 256].double().requires_grad_(True)
                    yt = bias_act(t, b.double(), impl="ref", **act)
                    gz = torch.autograd.grad(yt, t, gy[n0:n0 + 256].double())[0]
                    tb += _sum_except(gz, 1)
                    sb += _sum_except(gz.abs(), 1)
                c = max([c, dict(compare(gb, None, tb, sb, dtype), wrt="db")], key=_badness)
                del xg, bg, gy, gx, gb, gys, t, yt, gz
            else:
                kw = dict(up=2, padding=[2, 1, 2, 1], gain=4) if i == 2 else dict(down=2, padding=1)
                with torch.no_grad():
                    y = upfirdn2d(x, f4, impl="fused", **kw)
                oh, ow = y.shape[2], y.shape[3]
                q = sorted(set(P.tolist()) | set(_boundary_planes(oh * ow, N * C)))
                Q = torch.tensor(q, device=device)
                y = y.view(N * C, oh, ow)[Q]  # frees the full output
                xq = x.view(N * C, 1, H, W)[Q]
                run = lambda t, dt, f: upfirdn2d(t.to(dt), f, impl="ref", **kw)[:, 0]  # noqa: E731
                c = compare(y, run(xq, dtype, f4), run(xq, torch.float64, f4), run(xq.abs(), torch.float64, f4.abs()),
                            dtype)
            row.update(c, wrt=c.get("wrt", "y"), detail=f"{len(Q) if i >= 2 else len(P)} planes compared")
            if calls[0] == 0:
                row.update(ok=False, detail="impl='fused' called no kernel: it fell back to the reference")
            y = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()


def print_parity(rows, verbose=False):
    """A readable summary of parity rows: the worst row per (op, dtype, order), every failure, and what was
    skipped."""
    fmt = lambda v: "-" if v is None else (f"{v:.2f}" if v < 1e4 else f"{v:.1e}")  # noqa: E731
    line = "{:4s} {:9s} {:8s} {:5s} {:>5s} {:>4s} | {:>9s} {:>9s} {:>7s} | {}"
    groups, reasons = {}, {}
    for r in rows:
        if r["skipped"] is None:
            groups.setdefault((r["device"], r["op"], r["dtype"], r["order"]), []).append(r)
        else:
            reasons.setdefault((r["device"], r["op"], r["dtype"], r["skipped"]), []).append(r)
    for k, ((dev, op, dt, order), rs) in enumerate(groups.items()):
        if k == 0:
            print(line.format(*"dev op dtype order rows fail err err(ref) tol".split(), "worst: case / layout / wrt"))
        w = max(rs, key=_badness)
        print(line.format(dev, op, dt, order, str(len(rs)), str(sum(not r["ok"] for r in rs)), fmt(w["err"]),
                          fmt(w["err_ref"]), fmt(w["tol"]), f"{w['case']} / {w['layout']} / {w['wrt']}"))
    for r in rows:
        if r["ok"] is False or (verbose and r["skipped"] is None):
            print(f"  {'ok' if r['ok'] else 'FAIL':4s}", *map(r.get, ("device", "op", "dtype", "order", "wrt", "case")),
                  f"[{r['layout']}] err {fmt(r['err'])} (ref {fmt(r['err_ref'])}) tol {fmt(r['tol'])} {r['detail']}")
    for (dev, op, dt, why), rs in reasons.items():
        print(f"  skipped {dev} {op} {dt} ({len(rs)} rows): {why}")


def main(argv=None):
    """Build every fused op, check parity (and > 2^31 elements) and time them per device; 0 when all passed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cuda-build", action="store_true",
                        help="also compile the CUDA extensions when no GPU is present (compile check only)")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds for the parity rows per device")
    parser.add_argument("--large", action="store_true", help="also run the >2^31-element check on CPU (~48 GiB)")
    parser.add_argument("--verbose", action="store_true", help="print every parity row")
    args = parser.parse_args(argv)
    ok = True
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), default ops impl '{dispatch.default_impl()}' "
          f"(GANFORGE_OPS_IMPL={os.environ.get('GANFORGE_OPS_IMPL', '')!r}), cache {_build.cache_root()}")
    print(f"ninja: {shutil.which('ninja') or 'NOT FOUND'}; CUDA toolkit: {_build.find_cuda_home() or 'NOT FOUND'}; "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')!r}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    built = {}  # build (both ops of a device in parallel)
    for dev in devices + ([] if torch.cuda.is_available() or not args.cuda_build else [torch.device("cuda")]):
        t0 = time.time()
        for op, result in dispatch.load_all(dev.type).items():  # the ops of a device build in parallel
            built[op, dev.type] = not isinstance(result, Exception)
            if built[op, dev.type]:
                print(f"[build] {op:9s} {dev.type:4s}: built/loaded ({time.time() - t0:.1f} s for all ops)")
            else:
                ok = False
                print(f"[build] {op:9s} {dev.type:4s}: NOT BUILT: {result}")
    print(f"[parity] err = max |fused - float64 truth| / (eps x magnitude); ok when err <= max({K_REF:g} x err of "
          f"the reference in the same dtype, 4 (half types) or 8 (float32/64))")

    # Parity, the large-tensor check and a short benchmark on each device.
    for dev in devices:
        t0 = time.time()
        rows = run_parity(dev, budget_s=args.budget)
        print(f"[parity] {dev.type}: {sum(r['skipped'] is None for r in rows)} rows in {time.time() - t0:.1f} s")
        print_parity(rows, args.verbose)
        large = check_large_tensor(dev, budget_s=args.budget, force=args.large)
        print(f"[large] {dev.type}: > 2^31 elements")
        print_parity(large, verbose=True)
        ok = ok and all(r["ok"] is not False for r in rows + large)
        shape = [2, 64, 64, 64] if dev.type == "cpu" else [8, 256, 128, 128]
        f4 = setup_filter([1, 3, 3, 1], device=dev)
        for op, fn, nb in [("bias_act", lambda x, i, b: bias_act(x, b, act="lrelu", clamp=256, impl=i), shape[1]),
                           ("upfirdn2d", lambda x, i, b: upfirdn2d(x, f4, padding=2, impl=i), 0)]:
            try:
                r = bench_ops.bench_case(op, fn, shape, nb, dev, torch.float32, rep_budget=0.1)
            except (RuntimeError, _build.BuildError) as e:
                print(f"[bench]  {op:9s} {dev.type:4s}: not timed: {e}")
            else:
                print(f"[bench]  {op:9s} {dev.type:4s} fwd+bwd {shape}: ref {r['ms_ref_fwd_bwd']:.2f} ms, fused "
                      f"{r['ms_fused_fwd_bwd']:.2f} ms, speed-up {r['ms_ref_fwd_bwd'] / r['ms_fused_fwd_bwd']:.2f}x")
    print("all fused ops built and match the reference" if ok else
          "SOME FUSED OPS ARE UNAVAILABLE OR WRONG: impl='auto' uses the reference for them (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
