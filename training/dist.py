"""Distributed concerns in one place: every other module talks to Accelerate through these helpers."""
import os
import pickle
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs

# The process-wide Accelerator (None until `init` is called; single-process helpers still work without it).
_accelerator = None


def init(mixed_precision: str = "no", cpu: bool = False):
    """Create (once) the Accelerator for this process; `mixed_precision` is 'no', 'fp16' or 'bf16'."""
    global _accelerator
    if _accelerator is None:
        # A bounded collective timeout, so that ranks waiting on a dead peer fail instead of hanging forever.
        timeout = timedelta(seconds=float(os.environ.get("GANFORGE_DIST_TIMEOUT", "600")))
        _accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu,
                                   kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
    return _accelerator


def accelerator():
    """The Accelerator, or None when running without one."""
    return _accelerator


def reset():
    """Forget the Accelerator and Accelerate's per-process settings (mixed precision), keeping the process group:
    tests and scripts/gpu_check.py run several trainings in one process, with different mixed precision."""
    global _accelerator
    _accelerator = None
    AcceleratorState._reset_state(reset_partial_state=False)


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def device() -> torch.device:
    """The device this process computes on."""
    if _accelerator is not None:
        return _accelerator.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def print0(*args, **kwargs):
    """Print from rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier():
    if is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks, in place, and return it."""
    if is_initialized() and get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


# Reused float64 device buffers of sum_to_host, by (device, length).
_host_sum_buffers = {}


def sum_to_host(values) -> list:
    """Sum a few numbers over ranks and bring them to the host with one read: `values` are Python numbers or 0-dim
    device tensors. Numbers enter a reused device buffer with fill_ (the number is a kernel argument, not a host-to-
    device copy); with one process and no tensor among them nothing touches the device. Every rank must call it
    together with the same number of values."""
    multi = is_initialized() and get_world_size() > 1
    if not multi and not any(isinstance(v, torch.Tensor) for v in values):
        return [float(v) for v in values]
    dev = device()
    buf = _host_sum_buffers.get((dev, len(values)))
    if buf is None:
        buf = _host_sum_buffers[dev, len(values)] = torch.zeros([len(values)], dtype=torch.float64, device=dev)
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            buf[i].copy_(v.detach())
        else:
            buf[i].fill_(float(v))
    all_reduce_sum(buf)
    return buf.tolist()


def shutdown() -> None:
    """Leave the process group (at the end of a run): without it, a gloo rank can abort at interpreter exit ("terminate
    called without an active exception") while its peer still tears down."""
    if is_initialized():
        torch.distributed.destroy_process_group()


def end_process(status=0):
    """End this process with `status` (an exit code, None for 0, or a message for 1, as sys.exit takes). A process that
    was part of a process group leaves it and ends without the interpreter's teardown (os._exit, after flushing its
    output): even after destroy_process_group, a gloo rank aborted at interpreter finalization about one run in 30
    here (SIGABRT, "terminate called without an active exception", with no Python frame left), which turns a
    finished run into a failed one under a launcher."""
    if not is_initialized():
        sys.exit(status)
    shutdown()
    if isinstance(status, str):
        print(status, file=sys.stderr)
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if status is None else int(status))


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all ranks, in place, and return it."""
    if is_initialized() and get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        t.div_(get_world_size())
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from all ranks along dim 0 (sizes may differ per rank); rank order is preserved."""
    if not (is_initialized() and get_world_size() > 1):
        return t
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(get_world_size())]
    torch.distributed.all_gather(sizes, n)
    max_n = int(max(s.item() for s in sizes))
    padded = torch.zeros((max_n,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in range(get_world_size())]
    torch.distributed.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)], dim=0)


def reduce_grads(params):
    """Average the gradients of `params` over ranks as one flat buffer (the manual equivalent of DDP's all-reduce,
    which we use because R1 needs double backward through D and DDP does not support it). The gradients become views
    of the flat buffer (nothing is copied back), which is returned (None when no parameter has a gradient)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return None
    flat = torch.cat([p.grad.flatten() for p in params])
    if is_initialized() and get_world_size() > 1:
        all_reduce_mean(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad = flat[offset:offset + n].view_as(p.grad)
        offset += n
    return flat


def broadcast_module(module: torch.nn.Module) -> None:
    """Make every rank hold rank 0's parameters and buffers."""
    if not (is_initialized() and get_world_size() > 1):
        return
    for t in list(module.parameters()) + list(module.buffers()):
        torch.distributed.broadcast(t.data, src=0)


def broadcast_object(obj):
    """Broadcast a picklable object from rank 0 (plain data only: numbers, strings, lists, dicts)."""
    if not (is_initialized() and get_world_size() > 1):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def rank0_decides(fn, *errors):
    """Run `fn()` on rank 0 alone and give its outcome to every rank: its value, or the error it raised.

    Every rank calls `rank0_decides(fn, SomeError, ...)` together. Rank 0 calls `fn()` (no arguments: bind them
    with a lambda or functools.partial); its return value, which must be picklable plain data, is broadcast and
    returned on every rank. If `fn` raises an exception of one of the types in `errors`, every rank raises it:
    rank 0 the original, the others an exception of the same type made from the same arguments (so with the same
    message). Any other exception is raised by rank 0 as it is and by the others as a RuntimeError that names
    it, so that no rank waits for a broadcast that never comes. Without a process group (one process) this is
    simply `fn()`: the same value, the same exception.
    """
    if not (is_initialized() and get_world_size() > 1):
        return fn()
    outcome, failure = None, None
    if is_main():
        try:
            outcome = ("value", fn())
        except BaseException as e:
            failure = e
            listed = [t for t in errors if isinstance(e, t)]
            if not listed:
                outcome = ("other", f"{type(e).__name__}: {e}")
            else:
                try:  # The exception's own type and arguments, if they pickle (a class at module level).
                    pickle.loads(pickle.dumps((type(e), e.args)))
                    outcome = ("error", (type(e), e.args, str(e)))
                except Exception:  # Else the listed type it is an instance of, with its message.
                    outcome = ("error", (listed[0], (str(e),), str(e)))
    outcome = broadcast_object(outcome)
    if failure is not None:
        raise failure
    kind, payload = outcome
    if kind == "value":
        return payload
    if kind == "other":
        raise RuntimeError(f"rank 0 failed: {payload}")
    cls, args, message = payload
    try:
        error = cls(*args)
    except Exception:
        error = cls(message)
    raise error


def all_gather_object(obj) -> list:
    """Gather a picklable object from every rank into a list indexed by rank (plain data only)."""
    if not (is_initialized() and get_world_size() > 1):
        return [obj]
    out = [None] * get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# The buffers that training changes (each rank from its own batch): the mapping network's running mean w_avg and
# the spectral-norm power-iteration vectors. Constant buffers (noise maps, filters) are left alone.
CHANGING_BUFFERS = ("w_avg", "sn_u", "sn_v")


def changing_buffers(module: torch.nn.Module) -> list:
    """A module's buffers that training changes, in a fixed order."""
    return [b for name, b in module.named_buffers() if name.rsplit(".", 1)[-1] in CHANGING_BUFFERS]


def sync_buffers(module: torch.nn.Module) -> None:
    """Average the buffers that training changes over ranks (w_avg follows each rank's batch; averaging keeps every
    rank bit-identical), one flat all-reduce per dtype, each in its own dtype."""
    if not (is_initialized() and get_world_size() > 1):
        return
    by_dtype = {}
    for b in changing_buffers(module):
        by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():
        flat = torch.cat([b.detach().flatten() for b in bufs])
        all_reduce_mean(flat)
        torch._foreach_copy_(bufs, [v.view_as(b) for v, b in zip(flat.split([b.numel() for b in bufs]), bufs)])
