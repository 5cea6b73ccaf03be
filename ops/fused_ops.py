"""Every fused op at once, for the tools (check_ops, bench_ops, gpu_check, tests): build all, availability, probes."""
import concurrent.futures
import contextlib

from ops import _fused, bias_act, upfirdn2d

# The op modules with a fused kernel, by op name; each has load(device_type) and its kernel function named as the
# op in the extension. No op module imports this one.
OPS = {"bias_act": bias_act, "upfirdn2d": upfirdn2d}

# Dtypes each device's kernels handle.
SUPPORTED_DTYPES = _fused.SUPPORTED_DTYPES


def load(op: str, device_type: str):
    """The extension of `op` for 'cpu' or 'cuda'; raises _build.BuildError with the reason."""
    return OPS[op].load(device_type)


def load_all(device_type: str):
    """Build (or load) every op's extension for a device type at once, in threads so that their compilers run in
    parallel; returns {op: module or the BuildError}."""
    with concurrent.futures.ThreadPoolExecutor(len(OPS)) as pool:
        futures = {op: pool.submit(load, op, device_type) for op in OPS}
    return {op: (f.exception() or f.result()) for op, f in futures.items()}


def unavailable_reason(op: str, x):
    """Why the fused `op` cannot run on x (device, dtype, or the build), or None when it can."""
    return _fused.unavailable_reason(OPS[op].load, x)


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
