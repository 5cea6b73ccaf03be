"""Image helpers: float [-1, 1] tensors to uint8, grids of samples, PNG written atomically."""
import io
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from training.io.files import atomic_write


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1] (N, C, H, W) to uint8 (N, H, W, C) numpy."""
    img = (img.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return img.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, grid_w: int, grid_h: int) -> np.ndarray:
    """Tile N images into a grid of `grid_w` x `grid_h` (row-major) as one uint8 array (H, W, C)."""
    n, h, w, c = images.shape
    if n < grid_w * grid_h:
        images = np.concatenate([images, np.zeros([grid_w * grid_h - n, h, w, c], images.dtype)])
    images = images[: grid_w * grid_h].reshape(grid_h, grid_w, h, w, c)
    return images.transpose(0, 2, 1, 3, 4).reshape(grid_h * h, grid_w * w, c)


def save_png(array: np.ndarray, path) -> None:
    """Save a uint8 (H, W, C) array as PNG, atomically."""
    if array.shape[-1] == 1:
        array = array[..., 0]
    img = PIL.Image.fromarray(array)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()))


def save_image_grid(img: torch.Tensor, path, grid_size) -> None:
    """Save float images in [-1, 1] as a grid PNG."""
    grid_w, grid_h = grid_size
    save_png(make_grid(to_uint8(img), grid_w, grid_h), path)
