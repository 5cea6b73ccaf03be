"""Chooses between a fused kernel and the reference path for each op ('auto' | 'fused' | 'ref')."""
import os

# Process-wide default implementation; `GANFORGE_OPS_IMPL` or `set_default_impl` (from the config) override it.
_default_impl = os.environ.get("GANFORGE_OPS_IMPL", "auto")

# Loaders of the fused ops by name, registered by the ops that have a kernel (None until one is registered).
_loaders = {}


# Set the default for every op ('auto', 'fused' or 'ref').
def set_default_impl(impl: str) -> None:
    global _default_impl
    if impl not in ("auto", "fused", "ref"):
        raise ValueError(f"ops impl must be 'auto', 'fused' or 'ref', got {impl!r}")
    _default_impl = impl


def default_impl() -> str:
    return _default_impl


# Register `loader(x) -> callable or None` for op `name`; it returns the fused function usable for tensor x.
def register(name: str, loader) -> None:
    _loaders[name] = loader


# The fused function for `name` and tensor `x`, or None to use the reference path.
def get_fused(name: str, x, impl=None):
    impl = impl or _default_impl
    if impl == "ref":
        return None
    loader = _loaders.get(name)
    if loader is None:
        if impl == "fused":
            raise RuntimeError(f"ops.{name}: impl='fused' requested but no fused kernel exists for this op")
        return None
    return loader(x, strict=(impl == "fused"))
