"""Chooses between a fused kernel and the reference path for each op ('auto' | 'fused' | 'ref')."""
import os
import warnings

# The valid implementations: 'auto' = fused where it built and supports the tensor, else reference (one warning
# per op and process saying why); 'fused' = fused or raise; 'ref' = always the reference PyTorch code.
IMPLS = ("auto", "fused", "ref")


# Validate an impl name (from the config, the environment or a call).
def _checked(impl: str, source: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"ops impl must be 'auto', 'fused' or 'ref', got {impl!r} (from {source})")
    return impl


# Process-wide default implementation; `GANFORGE_OPS_IMPL` or `set_default_impl` (from the config) override it.
_default_impl = _checked(os.environ.get("GANFORGE_OPS_IMPL", "auto"), "GANFORGE_OPS_IMPL")

# Loaders of the fused ops by name, registered by ops/_fused.py (imported on first use).
_loaders = {}
_fused_imported = False

# Ops that already warned about falling back to the reference in this process.
_warned = set()


# Set the default for every op ('auto', 'fused' or 'ref').
def set_default_impl(impl: str) -> None:
    global _default_impl
    _default_impl = _checked(impl, "set_default_impl")


# The current default implementation.
def default_impl() -> str:
    return _default_impl


# Register `loader(x, strict) -> callable or None` for op `name`; it returns the fused function usable for tensor x
# (with the reference function's signature), None to use the reference, or raises when `strict` and it can't.
def register(name: str, loader) -> None:
    _loaders[name] = loader


# Warn once per process for `name` (an op): later fallbacks of the same op stay silent.
def warn_once(name: str, message: str) -> None:
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


# Forget warnings already given and builds already tried or loaded (tests; a changed environment).
def reset() -> None:
    from ops import _build
    _warned.clear()
    _build.reset_cache()
    if _fused_imported:
        import ops._fused
        ops._fused.reset()


# Import the module that registers the fused kernels (lazily: it is only needed when an op is called).
def _ensure_registered() -> None:
    global _fused_imported
    if not _fused_imported:
        _fused_imported = True
        import ops._fused  # noqa: F401


# The fused function for `name` and tensor `x`, or None to use the reference path.
def get_fused(name: str, x, impl=None):
    impl = _default_impl if impl is None else _checked(impl, f"the impl argument of ops.{name}")
    if impl == "ref":
        return None
    _ensure_registered()
    loader = _loaders.get(name)
    if loader is None:
        if impl == "fused":
            raise RuntimeError(f"ops.{name}: impl='fused' requested but no fused kernel exists for this op")
        return None
    return loader(x, strict=(impl == "fused"))
