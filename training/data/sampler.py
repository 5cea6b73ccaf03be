"""Sampling: the endless, resumable, rank-sharded stream of dataset items (a sequence of seeded permutations), and
labels for generated images."""
import numpy as np
import torch


class InfiniteSampler(torch.utils.data.Sampler):
    """Item k of rank r is position k * world + r of the endless stream perm(seed, 0) ++ perm(seed, 1) ++ ...; so the
    ranks never overlap, and `start` (items already consumed by this rank) resumes the stream exactly."""
    def __init__(self, size: int, rank: int = 0, num_replicas: int = 1, seed: int = 0, shuffle: bool = True,
                 start: int = 0):
        if size <= 0:
            raise ValueError(f"InfiniteSampler: dataset is empty (size {size})")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"InfiniteSampler: rank {rank} not in [0, {num_replicas})")
        self.size = size
        self.rank = rank
        self.num_replicas = num_replicas
        self.seed = seed
        self.shuffle = shuffle
        self.start = start
        self._epoch = None
        self._perm = None

    def index_at(self, pos: int) -> int:
        """The dataset index at global stream position `pos`."""
        epoch, offset = divmod(pos, self.size)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            self._perm = np.random.RandomState((self.seed + epoch) % (2 ** 32)).permutation(self.size)
            self._epoch = epoch
        return int(self._perm[offset])

    def __iter__(self):
        k = self.start
        while True:
            yield self.index_at(k * self.num_replicas + self.rank)
            k += 1


def sample_labels(dataset, n: int, device) -> torch.Tensor:
    """Labels for generated samples, drawn from the dataset's label distribution (zeros [N, 0] when
    unconditional); on CUDA they travel from pinned memory without blocking."""
    if dataset.label_dim == 0:
        return torch.zeros([n, 0], device=device)
    idx = np.random.randint(len(dataset), size=n)
    labels = torch.from_numpy(np.stack([dataset.get_label(i) for i in idx]))
    if device.type == "cuda":
        labels = labels.pin_memory()
    return labels.to(device, non_blocking=True)
