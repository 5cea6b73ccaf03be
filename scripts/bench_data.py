"""Benchmark images/s through the training loader per worker count, next to the rate one GPU consumes."""
import argparse
import io
import json
import os
import tempfile
import time
import zipfile

import numpy as np
import PIL.Image
import torch

from training.data.dataset import ImageDataset
from training.data.loader import default_num_workers, make_loader
from training.data.sampler import InfiniteSampler
from training.data.synthetic import SyntheticDataset

# Images/s one GPU consumes: (source, resolution) -> rate. NVIDIA's published StyleGAN2-ADA timings on 8 A100s
# (paper256: 2.47 s/kimg, i.e. 19.8 s/kimg = 50.6 img/s per GPU; stylegan2 at 1024 px: 14.57 s/kimg, i.e.
# 116.6 s/kimg = 8.6 img/s per GPU) and our H200 targets (paper256 at 10 s/kimg, stylegan2 1024 px at 58 s/kimg).
GPU_RATES = {("A100 (NVIDIA)", 256): 1000 / 19.8, ("A100 (NVIDIA)", 1024): 1000 / 116.6,
             ("H200 target", 256): 1000 / 10.0, ("H200 target", 1024): 1000 / 58.0}


def parse_args(argv=None):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--res", type=int, nargs="+", default=[256, 1024], help="resolutions (px)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="worker counts to measure (default: 0 1 2 and the default count)")
    p.add_argument("--datasets", nargs="+", default=["synthetic", "zip"], choices=["synthetic", "zip"],
                   help="the embedded synthetic set (decoded in memory) and/or a zip of PNGs (read and decoded)")
    p.add_argument("--seconds", type=float, default=2.0, help="measured time per row, after a warm-up batch")
    p.add_argument("--batch", type=int, default=8, help="images per batch (per-GPU batch)")
    p.add_argument("--zip-images", type=int, default=16, help="distinct PNGs in the zip (read over and over)")
    p.add_argument("--png-noise", type=float, default=6.0,
                   help="std of Gaussian noise added before PNG encoding, so files are photo-sized (126 KB at 256 "
                        "px, 2 MB at 1024 px at 6); 0 stores the bare synthetic images, which compress ~30x better")
    p.add_argument("--processes", type=int, default=1, help="training processes per node, for the default count")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device whose loader settings (pinning) are used; the default count is always the GPU one")
    return p.parse_args(argv)


def write_zip(folder: str, res: int, n: int, noise: float) -> str:
    """Write `n` synthetic images as dataset_tool.py stores them (stored zip of PNGs named 00000/img00000000.png, with
    dataset.json class labels) and return the zip's path."""
    path = os.path.join(folder, f"synthetic{res}.zip")
    src = SyntheticDataset(resolution=res, num_images=n, num_classes=6)
    rng = np.random.RandomState(0)
    labels = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for i in range(n):
            img = src[i][0].transpose(1, 2, 0)
            if noise > 0:
                img = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            PIL.Image.fromarray(img).save(buf, format="PNG", compress_level=6)
            name = f"{i // 1000:05d}/img{i:08d}.png"
            zf.writestr(name, buf.getvalue())
            labels.append([name, src.get_class(i)])
        zf.writestr("dataset.json", json.dumps({"labels": labels}))
    return path


def measure(dataset, workers: int, batch: int, seconds: float, device: torch.device) -> float:
    """Images/s through make_loader: one warm-up batch (worker start-up), then as many batches as fit in `seconds`.
    """
    sampler = InfiniteSampler(len(dataset), seed=0)
    loader = make_loader(dataset, sampler, batch, workers, device, seed=0)
    img, _ = next(loader)
    assert img.dtype == torch.uint8
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(loader)[0].shape[0]
    rate = n / (time.perf_counter() - t0)
    del loader  # Shuts its workers down before the next row starts its own.
    return rate


def main(argv=None):
    """Measure every dataset, resolution and worker count and print the table."""
    args = parse_args(argv)
    device = torch.device(args.device)
    default = default_num_workers("cuda", args.processes)
    counts = sorted(set(args.workers if args.workers is not None else [0, 1, 2, default]))
    print(f"{os.cpu_count()} cores; default workers for a GPU with {args.processes} process(es) per node: {default}; "
          f"batch {args.batch}; {args.seconds:g} s per row; zip PNG noise std {args.png_noise:g}")
    for res in args.res:
        print(f"a GPU consumes at {res} px: " + ", ".join(f"{src} {rate:.1f} img/s"
                                                       for (src, r), rate in GPU_RATES.items() if r == res))
    print(f"{'dataset':<10} {'res':>5} {'workers':>8} {'img/s':>8} {f'vs {counts[0]}':>6}   default keeps up with")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.datasets:
            for res in args.res:
                if kind == "synthetic":  # Enough images that the in-memory cache is off: every image is rendered.
                    ds = SyntheticDataset(resolution=res, num_images=1 << 20, num_classes=6)
                else:
                    ds = ImageDataset(write_zip(tmp, res, args.zip_images, args.png_noise), use_labels=True)
                base = None
                for w in counts:
                    rate = measure(ds, w, args.batch, args.seconds, device)
                    base = rate if base is None else base
                    mark = " (default)" if w == default else ""
                    keeps = ""
                    if w == default:
                        keeps = "   " + "   ".join(
                            f"{src}: {'keeps up' if rate >= need else 'TOO SLOW'} ({rate / need:.1f}x)"
                            for (src, r), need in GPU_RATES.items() if r == res)
                    print(f"{kind:<10} {res:>5} {w:>8} {rate:>8.1f} {rate / base:>5.2f}x{mark}{keeps}", flush=True)


if __name__ == "__main__":
    main()
