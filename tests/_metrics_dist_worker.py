"""Worker for test_metrics: FID/KID/SWD of a tiny generator against an array dataset, run with 1 or 2 processes."""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import dist  # noqa: E402


# A TorchScript-able stand-in for the Inception detector with its calling convention (uint8 NCHW in,
# features out); `dim` features from an 8x8 area-resized image through a fixed random projection and tanh.
class TinyDetector(torch.nn.Module):
    def __init__(self, dim: int = 2048, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(3 * 8 * 8, dim, generator=g) / 8.0)
        self.register_buffer("b", torch.randn(dim, generator=g) * 0.1)

    def forward(self, img: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = img.to(torch.float32) / 127.5 - 1.0
        x = torch.nn.functional.adaptive_avg_pool2d(x, (8, 8))
        f = torch.tanh(x.flatten(1) @ self.w + self.b)
        if return_features:
            return f
        return torch.softmax(f, dim=1)


# A tiny generator with the G(z, c, truncation_psi=, noise_mode=) -> [-1,1] NCHW interface.
class TinyG(torch.nn.Module):
    def __init__(self, z_dim: int = 8, c_dim: int = 0, res: int = 16, channels: int = 3):
        super().__init__()
        self.z_dim, self.c_dim, self.res, self.channels = z_dim, c_dim, res, channels
        self.fc = torch.nn.Linear(z_dim + c_dim, channels * res * res)

    def forward(self, z, c, truncation_psi=1, noise_mode="const"):
        x = torch.cat([z, c], 1) if self.c_dim else z
        return torch.tanh(self.fc(x) * truncation_psi).view(-1, self.channels, self.res, self.res)


# A dataset of in-memory uint8 [C,H,W] arrays with the project's dataset interface.
class ArrayDataset:
    def __init__(self, images, labels=None, name="arrays"):
        self.images = images
        self.labels = labels if labels is not None else np.zeros((len(images), 0), np.float32)
        self.name, self.resolution, self.label_dim = name, images.shape[-1], self.labels.shape[1]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


# Deterministic random images for the dataset.
def make_images(n: int, res: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, res, res), dtype=np.uint8)


# FID and KID of TinyG against 31 array images with the detector at `det_path` (uneven shares over 2 ranks,
# several batches, a last partial batch); also how many images each rank ran through the detector.
def run_metrics(det_path: str) -> dict:
    from training.eval.inception import load_detector
    from training.eval.metrics import calc_metric
    detector = load_detector(det_path, allow_download=False)
    calls = [0]
    inner = detector.features

    def counting(img):
        calls[0] += img.shape[0]
        return inner(img)
    detector.features = counting
    torch.manual_seed(0)
    G = TinyG()
    dataset = ArrayDataset(make_images(31))
    fid = calc_metric("fid25", G, dataset, detector, batch_size=5, cache_dir=False)
    kid = calc_metric("kid25_full", G, dataset, detector, batch_size=5, cache_dir=False, kid_subsets=10)
    swd = calc_metric("swd25", G, dataset, None, batch_size=5, cache_dir=False)  # needs no detector
    per_rank = dist.all_gather_cat(torch.tensor([calls[0]], device=dist.device())).tolist()
    return dict(fid=fid, kid=kid, swd=swd, images_per_rank=per_rank, world_size=dist.get_world_size())


# argv: detector path, output json; rank 0 writes the result of run_metrics.
def main():
    det_path, out_path = sys.argv[1], sys.argv[2]
    dist.init()
    result = run_metrics(det_path)
    if dist.is_main():
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.end_process(0)


if __name__ == "__main__":
    main()
