"""Builds and loads the fused ops, and chooses a kernel or the reference path per call ('auto' checks first)."""
import concurrent.futures
import contextlib
import functools
import os
import time
import warnings

import torch

from ops import _build
from ops.tolerance import REF_DTYPE, compare

# The valid implementations: 'auto' = the fused kernel where it built, supports the tensor and passed its first-call
# self-check (values and derivatives against the reference; on CUDA also faster), else the reference with one
# warning saying why; 'fused' = the fused kernel, raising when it is unavailable or fails the self-check; 'ref' =
# always the reference PyTorch code (nothing is built).
IMPLS = ("auto", "fused", "ref")

# The sources (in ops/) of each op's extension, by op name and device type: the CPU-only build, and the CUDA build
# (its .cpp files also hold the CPU kernels). The extension's kernel function is named as the op.
SOURCES = {"bias_act": {"cpu": ["bias_act.cpp"], "cuda": ["bias_act.cpp", "bias_act.cu"]},
           "upfirdn2d": {"cpu": ["upfirdn2d.cpp", "upfirdn2d_gpu.cpp"],
                         "cuda": ["upfirdn2d.cpp", "upfirdn2d_gpu.cpp", "upfirdn2d.cu"]}}

# The ops with a fused kernel.
OPS = tuple(SOURCES)

# Dtypes each device's kernels handle.
SUPPORTED_DTYPES = {"cpu": (torch.float32, torch.float64),
                    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


# Validate an impl name (from the config, the environment or a call).
def _checked(impl: str, source: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"ops impl must be 'auto', 'fused' or 'ref', got {impl!r} (from {source})")
    return impl


# Process-wide default implementation; `GANFORGE_OPS_IMPL` or `set_default_impl` (from the config) override it.
_default_impl = _checked(os.environ.get("GANFORGE_OPS_IMPL", "auto"), "GANFORGE_OPS_IMPL")

# Extensions that can run, by (op, device type, dtype): the per-call fast path.
_loaded = {}

# Self-check decisions by (op, fused function, device, dtype, layout, variant, needs grad): the record of
# decisions() plus "use" (bool). Made once per key and process; later calls only look the key up. Keyed by the
# fused function itself, so that a replaced one (tests) is checked again.
_decisions = {}

# Whether `kernel` self-checks (scripts/check_ops.py turns it off: it measures the kernels itself).
_self_check = True

# Ops (or op + key) that already warned in this process.
_warned = set()

# Timed repeats per path on CUDA (after one warm-up call): the minimum is kept.
TIMING_REPEATS = 3


def set_default_impl(impl: str) -> None:
    """Set the default implementation of every op: 'auto', 'fused' or 'ref'."""
    global _default_impl
    _default_impl = _checked(impl, "set_default_impl")


def default_impl() -> str:
    """The current default implementation ('auto', 'fused' or 'ref')."""
    return _default_impl


def warn_once(name: str, message: str) -> None:
    """Warn (RuntimeWarning) once per process for op `name`: later fallbacks of the same op stay silent."""
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(message, RuntimeWarning, stacklevel=3)  # names the op function that fell back


def reset() -> None:
    """Forget warnings given, builds tried or loaded and self-check decisions (tests; a changed environment)."""
    _warned.clear()
    _loaded.clear()
    _decisions.clear()
    _build.reset_cache()


def decisions() -> list:
    """The self-check decisions made so far in this process, one dict per (op, device, dtype, layout, variant,
    grad): impl ('fused' or 'ref'), reason, err / tol (eps units, ops.tolerance) and wrt (the worst output),
    ms_fused / ms_ref (CUDA only, else None) and decided_by ('rank 0' under torch.distributed, else 'this
    process')."""
    return [{k: v for k, v in d.items() if k not in ("use", "agrees")} for d in _decisions.values()]


def describe(d: dict) -> str:
    """One line for a decision of decisions(): what, the path taken and why."""
    what = " ".join(str(d[k]) for k in ("op", "device", "dtype", "layout", "variant") if d[k])
    return f"{what}{' (with gradients)' if d['grad'] else ''}: {d['impl']}, {d['reason']} [{d['decided_by']}]"


@contextlib.contextmanager
def self_checks(enabled: bool):
    """Turn the first-call self-check on or off while active (check_ops compares the kernels on its own)."""
    global _self_check
    old, _self_check = _self_check, enabled
    try:
        yield
    finally:
        _self_check = old


def memory_layout(x) -> str:
    """'contiguous', 'channels_last' (4-D) or 'strided': the layout the kernels see (part of the decision key)."""
    if x.is_contiguous():
        return "contiguous"
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def load(op: str, device_type: str):
    """The extension of `op` for 'cpu' or 'cuda', built on first use; raises _build.BuildError saying why not."""
    return _build.load_extension(op, SOURCES[op][device_type], cuda=(device_type == "cuda"))


def unavailable_reason(op: str, x):
    """Why the fused `op` cannot run on x (device, dtype or the build), or None when it can."""
    dev = x.device.type
    if dev not in SUPPORTED_DTYPES:
        return f"no fused kernel for device '{dev}'"
    if x.dtype not in SUPPORTED_DTYPES[dev]:
        return f"no fused kernel for {x.dtype} on {dev}"
    try:
        load(op, dev)
    except _build.BuildError as e:
        return f"build failed: {e}"
    return None


def kernel(name: str, x, impl, ref, fused, args, kwargs=None, variant: str = "", takes: bool = True, linear=False,
           magnitude=None):
    """The extension of op `name` to run this call with (as `fused(ext, *args, **kwargs)`), or None to run
    `ref(*args, **kwargs)`: the one place an op chooses its path.

    impl is 'auto', 'fused', 'ref' or None (the default). Where the kernel cannot run on x (unavailable_reason),
    'auto' warns once and returns None and 'fused' raises RuntimeError with the reason. `takes`: whether the kernel
    takes this call's arguments (else None, silently: the reference validates them). The first call per (device,
    dtype, memory layout, `variant`, needs-grad) self-checks `fused` against `ref` on the call's own args: see
    _decide. `linear`: the op is linear in each tensor argument, so the magnitude an error is measured against is
    the sum of |terms| (the reference on |inputs|), else |truth|; `magnitude(truth)` may give other magnitudes for
    some outputs ({name: tensor}, e.g. sums of |terms| for a bias gradient; names as in _derivatives).
    """
    impl = _default_impl if impl is None else _checked(impl, f"the impl argument of ops.{name}")
    if impl == "ref":
        return None
    key = (name, x.device.type, x.dtype)
    ext = _loaded.get(key)
    if ext is None:
        why = unavailable_reason(name, x)
        if why is not None:
            message = f"ops.{name}: fused kernel unavailable on {x.device.type} ({why})"
            if impl == "fused":
                raise RuntimeError(f"{message}; impl='fused' was requested")
            warn_once(name, f"{message}; using the reference implementation (run scripts/check_ops.py)")
            return None
        ext = _loaded[key] = load(name, x.device.type)
    if not takes or x.numel() == 0:
        return None
    if not _self_check:
        return ext
    kwargs = kwargs or {}
    grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    dkey = (name, fused, str(x.device), x.dtype, memory_layout(x), variant, grad)
    d = _decisions.get(dkey)
    if d is None:
        check = functools.partial(fused, ext)
        d = _decisions[dkey] = _decide(name, dkey, check, ref, args, kwargs, grad, (linear, magnitude))
    if d["use"]:
        return ext
    what = f"ops.{name} on {d['device']} {d['dtype']} {d['layout']} {variant}".rstrip()
    if impl == "fused":
        if d["agrees"]:
            return ext
        raise RuntimeError(f"{what}: fused kernel {d['reason']}; impl='fused' was requested")
    warn_once(f"{name}:{dkey[2:]}", f"{what}: fused kernel {d['reason']}; using the reference")
    return None


def load_all(device_type: str):
    """Build (or load) every op's extension for a device type at once, in threads so that their compilers run in
    parallel; returns {op: module or the BuildError} (the tools: check_ops, bench_ops, gpu_check, tests)."""
    with concurrent.futures.ThreadPoolExecutor(len(OPS)) as pool:
        futures = {op: pool.submit(load, op, device_type) for op in OPS}
    return {op: (f.exception() or f.result()) for op, f in futures.items()}


@contextlib.contextmanager
def kernel_calls(op: str, device_type: str):
    """Count calls into the compiled function of `op` while active (yields a one-element list), by wrapping the
    attribute of the loaded extension (restored on exit): proves that impl='fused' really ran the kernel and did not
    fall back to the reference. Raises _build.BuildError when the extension cannot build."""
    ext = load(op, device_type)
    orig = getattr(ext, op)
    calls = [0]

    def counted(*args):
        calls[0] += 1
        return orig(*args)
    setattr(ext, op, counted)
    try:
        yield calls
    finally:
        setattr(ext, op, orig)


# The first-call self-check of one key, made by rank 0 (under torch.distributed) and broadcast, so that every rank
# uses the same path. Runs fused and reference on the call's own inputs in its dtype and the reference in float64
# (the truth): forward, and where the call needs gradients the plain backward and, with create_graph, the first
# and second derivatives (as R1 and path-length regularization need); compares them by ops.tolerance's rule (the
# one check_ops uses). On CUDA it also times both (forward, plus backward where needed) and keeps the fused kernel
# only when it is faster; on CPU agreement alone decides (docs/gpu.md, "Troubleshooting: custom ops").
def _decide(name, dkey, fused, ref, args, kwargs, grad, scaling):
    _, _, device, dtype, layout, variant, _ = dkey
    record = {"op": name, "device": device, "dtype": str(dtype).replace("torch.", ""), "layout": layout,
              "variant": variant, "grad": grad, "impl": "ref", "reason": "", "err": None, "tol": None, "wrt": None,
              "ms_fused": None, "ms_ref": None, "decided_by": "this process"}
    dist = _dist()
    if dist is None or dist.get_rank() == 0:
        record.update(_self_check_record(fused, ref, args, kwargs, grad, dtype, scaling))
    if dist is not None:
        box = [record]
        dist.broadcast_object_list(box, src=0)
        record = dict(box[0], decided_by="rank 0")
    record["use"] = record["impl"] == "fused"
    record["agrees"] = record["err"] is not None and record["err"] <= record["tol"]
    return record


# torch.distributed when a process group is initialized, else None.
def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


# The comparison (and on CUDA the timing) of one self-check: the decision fields of the record.
def _self_check_record(fused, ref, args, kwargs, grad, dtype, scaling):
    with torch.random.fork_rng(devices=[]):  # the check draws no numbers from the run's generators
        try:
            worst = _compare_paths(fused, ref, args, kwargs, grad, dtype, scaling)
        except Exception as e:  # noqa: BLE001 - a kernel that raises is a kernel that failed its check
            return {"reason": f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    out = {"err": worst["err"], "tol": worst["tol"], "wrt": worst["wrt"]}
    if not worst["ok"]:
        return dict(out, reason=f"disagrees with the reference: error {worst['err']:.3g} eps units in "
                                f"{worst['wrt']} against a tolerance of {worst['tol']:.3g}")
    dev = next(a.device for a in args if isinstance(a, torch.Tensor))
    if dev.type != "cuda":
        return dict(out, impl="fused", reason="agrees with the reference (not timed on CPU)")
    ms_f, ms_r = (_time(fn, args, kwargs, grad) for fn in (fused, ref))
    out.update(ms_fused=ms_f, ms_ref=ms_r)
    if ms_f >= ms_r:
        return dict(out, reason=f"is slower than the reference: {ms_f:.3f} ms vs {ms_r:.3f} ms "
                                f"({ms_f / ms_r:.2f}x)")
    return dict(out, impl="fused", reason=f"agrees and is {ms_r / ms_f:.2f}x faster ({ms_f:.3f} vs {ms_r:.3f} ms)")


# Forward, plain gradients and (create_graph) first and second derivatives of fn on copies of args; returns
# {output name: tensor}. The incoming gradient and the direction of the second derivative are fixed random tensors
# (seeded generators of their own), rounded to `noise_dtype` so that every path gets the same values; `absolute`
# takes their absolute values (magnitudes of a linear op).
def _derivatives(fn, args, kwargs, grad, noise_dtype, absolute=False):
    idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad] if grad else []
    leaves = [args[i].detach().requires_grad_(True) for i in idx]
    call = list(args)
    for i, t in zip(idx, leaves):
        call[i] = t
    with torch.set_grad_enabled(bool(idx)):
        y = fn(*call, **kwargs)
    out = {"y": y.detach()}
    if not idx:
        return out
    gy = _noise(y, 0, noise_dtype, absolute)
    g = torch.autograd.grad(y, leaves, gy, retain_graph=True)
    out.update({f"d{i}": t.detach() for i, t in zip(idx, g)})
    g1 = torch.autograd.grad(y, leaves, gy, create_graph=True)
    out.update({f"d{i}(create_graph)": t.detach() for i, t in zip(idx, g1)})
    g2 = [None] * len(leaves)  # a first derivative that does not depend on the inputs: zero second derivative
    if g1[0].requires_grad:
        g2 = torch.autograd.grad((g1[0] * _noise(g1[0], 1, noise_dtype, absolute)).sum(), leaves, allow_unused=True)
    out.update({f"d2 d{i}": (torch.zeros_like(t) if d is None else d.detach()) for i, t, d in zip(idx, leaves, g2)})
    return out


# A standard-normal tensor shaped like t, in t's dtype, from a generator seeded with `seed`, rounded to `dtype`.
def _noise(t, seed, dtype, absolute=False):
    gen = torch.Generator(device=t.device).manual_seed(seed)
    r = torch.randn(t.shape, generator=gen, device=t.device, dtype=torch.float64)
    return (r.abs() if absolute else r).to(dtype).to(t.dtype)


# args with every floating-point tensor in `dtype` (layout kept).
def _cast(args, dtype):
    return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


# Fused, reference (same dtype; float32 for float64, ops.tolerance.REF_DTYPE) and float64 truth on the call's own
# inputs; returns the worst comparison (failures first, then by err / tol) with its output's name as wrt.
def _compare_paths(fused, ref, args, kwargs, grad, dtype, scaling):
    dev = next(a.device for a in args if isinstance(a, torch.Tensor))
    rd = REF_DTYPE.get(dtype, dtype)
    with torch.autocast(dev.type, enabled=False):
        truth = _derivatives(ref, _cast(args, torch.float64), kwargs, grad, rd)
        linear, magnitude = scaling
        scale = truth if not linear else _derivatives(ref, [a.abs() if isinstance(a, torch.Tensor) else a for a in
                                                            _cast(args, torch.float64)], kwargs, grad, rd, True)
        scale = dict(scale, **(magnitude(truth) if magnitude else {}))
    out = _derivatives(fused, args, kwargs, grad, rd)
    base = _derivatives(ref, _cast(args, rd), kwargs, grad, rd)
    worst = None
    for name, t in truth.items():
        c = dict(_compare_one(out.get(name), base.get(name), t, scale[name], dtype, rd), wrt=name)
        if worst is None or (not c["ok"], c["err"] / c["tol"]) > (not worst["ok"], worst["err"] / worst["tol"]):
            worst = c
    return worst


# One output against the truth by ops.tolerance.compare where the truth is finite; a missing output, another shape
# or non-finite values elsewhere than in the truth (NaN from a broken kernel) is an infinite error.
def _compare_one(out, base, truth, scale, dtype, ref_dtype):
    fail = {"err": float("inf"), "err_ref": 0.0, "tol": 1.0, "ok": False, "max_abs": float("inf")}
    if out is None or out.shape != truth.shape:
        return fail
    fin = torch.isfinite(truth)
    if not torch.equal(fin, torch.isfinite(out)):
        return fail
    ref_f = base[fin] if base is not None and base.shape == truth.shape else None
    return compare(out[fin], ref_f, truth[fin], scale[fin], dtype, ref_dtype)


# Milliseconds of one call of fn on args (forward, plus a backward for calls that need gradients), the minimum of
# TIMING_REPEATS synchronized runs after a warm-up.
def _time(fn, args, kwargs, grad):
    idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad] if grad else []
    call = list(args)
    for i in idx:
        call[i] = args[i].detach().requires_grad_(True)

    def once():
        with torch.set_grad_enabled(bool(idx)):
            y = fn(*call, **kwargs)
            if idx:
                torch.autograd.grad(y, [call[i] for i in idx], torch.ones_like(y))
    best = float("inf")
    for k in range(TIMING_REPEATS + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        once()
        torch.cuda.synchronize()
        if k:
            best = min(best, (time.perf_counter() - t0) * 1e3)
    return best
