"""Counts what makes a GPU wait for the host: reads of tensor values and Python numbers made into tensors."""
import collections
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods and functions that copy values to the host: on CUDA each one waits for the stream to drain.
_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
          torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__complex__, torch.Tensor.cpu,
          torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.unique, torch.unique}

# Functions that turn host data (Python numbers, lists, arrays) into a tensor: on CUDA a blocking copy from pageable
# memory (torch.full and full_like of a number only fill, but they stand for the same habit and are counted too).
_COPIES = {torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.Tensor.new_tensor, torch.full, torch.full_like}

# Source files whose calls are not device syncs to remove: the optimizers' step counters (CPU tensors by design)
# and the data loader's collation of a CPU batch (it reaches the GPU by one pinned, non-blocking copy).
_EXCLUDED = tuple(os.sep + os.path.join(*parts) + os.sep for parts in (("torch", "optim"), ("torch", "utils", "data")))


# The first stack frame outside torch's own Python files and this module: the call site to report.
def _call_site() -> str:
    frame = sys._getframe(2)
    here = os.path.abspath(__file__)
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != here and not path.startswith(torch_dir):
            return f"{os.path.relpath(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


# True when the innermost non-mode frame is inside an excluded torch file (the optimizer's own step counter).
def _excluded() -> bool:
    frame = sys._getframe(2)
    here = os.path.abspath(__file__)
    while frame is not None and os.path.abspath(frame.f_code.co_filename) == here:
        frame = frame.f_back
    return frame is not None and any(p in frame.f_code.co_filename for p in _EXCLUDED)


# Whether an index holds a boolean tensor (x[mask] gathers by nonzero(mask): a read of the mask).
def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


# Whether a call to a copying function gets host data (not a tensor already).
def _from_host(func, args, kwargs) -> bool:
    if func in (torch.full, torch.full_like):
        value = args[1] if len(args) > 1 else kwargs.get("fill_value")
        return not isinstance(value, torch.Tensor)
    data = args[0] if args else kwargs.get("data")
    if func is torch.Tensor.new_tensor:
        data = args[1] if len(args) > 1 else kwargs.get("data")
    return not isinstance(data, torch.Tensor)


class HostSyncCounter(TorchFunctionMode):
    """Count host reads (`.item()`, `bool`/`float`/`int` of a tensor, `.tolist()`, `.cpu()`, `.numpy()`, `nonzero`,
    boolean-mask indexing, `.to('cpu')`) and host-to-tensor copies (`torch.tensor`/`as_tensor`/`full` of host data)
    made in Python while active; calls from torch.optim (the optimizers' CPU step counters) and torch.utils.data (a
    loader's CPU-side collation) are left out. On CPU these calls are cheap, but each one stalls a GPU's queue, so
    counting them on CPU finds the stalls before a GPU run does. `sites` maps 'kind file:line' to counts. Use: `with
    HostSyncCounter() as c: ...`, then c.reads, c.copies. Reads inside C++ (e.g. a CUDA kernel's own checks) are
    invisible here; torch.cuda.set_sync_debug_mode sees those on a GPU (scripts/gpu_check.py)."""
    def __init__(self):
        super().__init__()
        self.reads = 0
        self.copies = 0
        self.sites = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = None
        if func in _READS:
            kind = "read"
        elif func is torch.Tensor.__getitem__ and len(args) > 1 and _has_bool_index(args[1]):
            kind = "read"
        elif func is torch.Tensor.to and _to_host(args, kwargs):
            kind = "read"
        elif func in _COPIES and _from_host(func, args, kwargs):
            kind = "copy"
        if kind is not None and not _excluded():
            if kind == "read":
                self.reads += 1
            else:
                self.copies += 1
            self.sites[f"{kind} {_call_site()}"] += 1
        return func(*args, **kwargs)

    def summary(self, top: int = 10) -> str:
        """A short report: the totals and the busiest call sites."""
        lines = [f"{self.reads} host reads, {self.copies} host-to-tensor copies"]
        lines += [f"  {n:4d}  {site}" for site, n in self.sites.most_common(top)]
        return "\n".join(lines)


# Whether a Tensor.to call moves a tensor off its device to the CPU.
def _to_host(args, kwargs) -> bool:
    target = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            target = a
    if target is None:
        return False
    return torch.device(target).type == "cpu" and args[0].device.type != "cpu"

