"""Chooses between an op's fused kernel and its reference path ('auto' | 'fused' | 'ref') and warns on fallback."""
import os
import warnings

from ops import _build

# The valid implementations: 'auto' = fused where it built and supports the tensor, else reference (one warning
# per op and process saying why); 'fused' = fused or raise; 'ref' = always the reference PyTorch code.
IMPLS = ("auto", "fused", "ref")


class Unavailable(RuntimeError):
    """Raised by an op's loader when its fused kernel cannot run on a tensor; the message says why."""


# Validate an impl name (from the config, the environment or a call).
def _checked(impl: str, source: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"ops impl must be 'auto', 'fused' or 'ref', got {impl!r} (from {source})")
    return impl


# Process-wide default implementation; `GANFORGE_OPS_IMPL` or `set_default_impl` (from the config) override it.
_default_impl = _checked(os.environ.get("GANFORGE_OPS_IMPL", "auto"), "GANFORGE_OPS_IMPL")

# Fused functions a loader returned, by (loader, device type, dtype): the per-call fast path. Keyed by the loader
# itself, so that a replaced loader (tests) is asked again.
_bound = {}

# Ops that already warned about falling back to the reference in this process.
_warned = set()


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
    """Forget warnings given, builds tried or loaded and fused functions bound (tests; a changed environment)."""
    _warned.clear()
    _bound.clear()
    _build.reset_cache()


def get_fused(name: str, x, impl, loader):
    """The fused function of op `name` for tensor x, or None to use the reference path.

    impl is 'auto', 'fused', 'ref' or None (the default). `loader(x)` is the op's own: it returns the fused function
    (with the reference function's signature) or raises Unavailable saying why it cannot run on x; then 'auto'
    warns once and returns None, and 'fused' raises RuntimeError with the reason.
    """
    impl = _default_impl if impl is None else _checked(impl, f"the impl argument of ops.{name}")
    if impl == "ref":
        return None
    key = (loader, x.device.type, x.dtype)
    fused = _bound.get(key)
    if fused is not None:
        return fused
    try:
        fused = _bound[key] = loader(x)
        return fused
    except Unavailable as e:
        message = f"ops.{name}: fused kernel unavailable on {x.device.type} ({e})"
    if impl == "fused":
        raise RuntimeError(f"{message}; impl='fused' was requested")
    warn_once(name, f"{message}; using the reference implementation (run scripts/check_ops.py)")
    return None
