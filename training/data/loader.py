"""The training data iterator (a seeded, order-keeping DataLoader over the sampler) and its default worker count."""
import os

import torch

# Most loader workers per training process. One worker (one core) decodes ~900 photo-sized PNGs/s at 256 px and
# ~70/s at 1024 px, and renders the synthetic set at ~2000 and ~600 img/s (scripts/bench_data.py), so 8 supply
# tens of times what one H200 consumes (targets: 100 img/s at 256 px, 17.2 img/s at 1024 px). More would only add
# start-up time at each loader (re)start, shared memory for batches in flight and processes (64 already on an
# 8-GPU node), without feeding the GPU any faster; data.num_workers overrides it for slow decoders.
MAX_WORKERS = 8

# Batches each worker prepares ahead, and the fewest batches kept in flight over all workers.
PREFETCH_PER_WORKER = 2
MIN_BATCHES_IN_FLIGHT = 4

# Workers per process when training on the CPU: the step itself keeps every core busy with intra-op threads, and
# a worker only competes with it. Measured on 2 idle cores (scripts/train.py model=tiny train=quick train.kimg=1,
# sec/kimg, median of 4-5 runs): 4.19 with 0 workers, 4.33 with 1, 4.39 with 2. So load in the main process.
CPU_WORKERS = 0


def local_process_count() -> int:
    """Training processes on this machine: torchrun (and so `accelerate launch --multi_gpu`) sets LOCAL_WORLD_SIZE in
    each of them; 1 when it is not set (a single process)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


# The cores this process may run on (its affinity mask where the OS has one, else all of them).
def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_num_workers(device_type: str, local_processes: int) -> int:
    """Worker processes per training process for data.num_workers=null: on an accelerator, the cores of this process's
    share of the machine less one for the process itself (which launches the kernels and pins memory), at least 1 (a
    worker overlaps loading with the GPU's step even on a shared core) and at most MAX_WORKERS; on the CPU,
    CPU_WORKERS."""
    if device_type == "cpu":
        return CPU_WORKERS
    share = _cores() // max(1, int(local_processes))
    return max(1, min(MAX_WORKERS, share - 1))


def make_loader(dataset, sampler, batch_size: int, num_workers: int, device: torch.device, seed: int):
    """An endless iterator of (uint8 images [N, C, H, W], float32 labels [N, L]) CPU tensors in exactly the sampler's
    order, whatever num_workers is (workers hand back batches in the order they were asked for). Images stay uint8
    (a quarter of the bytes to copy and pin; the loop scales them to [-1, 1] on the device), pinned when the device
    is CUDA so the copy can overlap. The loader draws its workers' base seed from its own generator seeded with
    `seed`, never from the global RNG (exact resume depends on that). Workers run at 1 torch thread each, watch
    their parent (they exit within ~5 s of it being killed), and are shut down when the iterator is dropped (the
    loop drops it for a new one when a progressive stage changes the batch). Workers persist (the sampler is
    endless, so this only matters if the loader is ever iterated again) and keep 2 batches each, at least 4 in all,
    ahead."""
    num_workers = int(num_workers)
    if num_workers < 0:
        raise ValueError(f"make_loader: num_workers must be >= 0, got {num_workers}")
    workers = num_workers > 0
    prefetch = max(PREFETCH_PER_WORKER, -(-MIN_BATCHES_IN_FLIGHT // num_workers)) if workers else None
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=int(batch_size),
                                         num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
                                         persistent_workers=workers, prefetch_factor=prefetch,
                                         generator=torch.Generator().manual_seed(int(seed)))
    return iter(loader)
