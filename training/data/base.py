"""What every ganforge dataset shares: items, optional mirrored copies, shapes and the label conventions."""
import operator

import numpy as np
import torch


class BaseDataset(torch.utils.data.Dataset):
    """Square images as (uint8 [C,R,R] array, float32 [label_dim] label) items, with an optional mirrored half.

    Items 0 .. n-1 are the dataset's n images, in the order of their raw indices; with `xflip`, items n .. 2n-1
    are the same images mirrored left-right. Negative indices count from the end; others raise IndexError.
    Unlabeled datasets give labels of shape [0]. Every item is a fresh array that the caller may modify.

    A subclass sets `xflip`, `_res` (the side in pixels) and `_num_channels`, and implements `raw_size`,
    `_num_items()`, `_raw_image(raw)`, `_label_size()` and `_raw_label(raw)`; `_raw_index(i)` maps its i-th
    image to a raw index (by default the identity).
    """

    xflip = False

    @property
    def raw_size(self) -> int:
        """Number of images (raw indices) the source holds, before any subset and mirroring."""
        raise NotImplementedError

    # Number of images in use (without the mirrored half).
    def _num_items(self) -> int:
        raise NotImplementedError

    # The raw index of image `i` (0 <= i < _num_items()).
    def _raw_index(self, i: int) -> int:
        return i

    # The image at a raw index as uint8 [C,R,R]; it may be shared (a cache): items are copies of it.
    def _raw_image(self, raw: int) -> np.ndarray:
        raise NotImplementedError

    # The length of the labels (0: unlabeled).
    def _label_size(self) -> int:
        raise NotImplementedError

    # The label at a raw index as a fresh float32 [label_dim] array (called only for labeled datasets).
    def _raw_label(self, raw: int) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._num_items() * (2 if self.xflip else 1)

    @property
    def resolution(self) -> int:
        return self._res

    @property
    def num_channels(self) -> int:
        return self._num_channels

    @property
    def image_shape(self) -> list[int]:
        return [self._num_channels, self._res, self._res]

    @property
    def label_shape(self) -> list[int]:
        return [self._label_size()]

    @property
    def label_dim(self) -> int:
        return self.label_shape[0]

    @property
    def has_labels(self) -> bool:
        return self.label_dim != 0

    # Map a dataset index (including the mirrored half) to a raw index.
    def _raw(self, idx) -> int:
        idx = operator.index(idx)
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for a dataset of {len(self)} images")
        return int(self._raw_index((idx % len(self)) % self._num_items()))

    # The label at a raw index, for any dataset (shape [0] when unlabeled).
    def _label(self, raw: int) -> np.ndarray:
        return self._raw_label(raw) if self._label_size() else np.zeros([0], dtype=np.float32)

    def get_label(self, idx) -> np.ndarray:
        """The label of item `idx`: float32 [label_dim] (shape [0] when unlabeled)."""
        return self._label(self._raw(idx))

    def __getitem__(self, idx):
        """Item `idx` as (uint8 [C,R,R] image, float32 [label_dim] label), mirrored in the second half."""
        raw = self._raw(idx)
        img = self._raw_image(raw)
        if operator.index(idx) % len(self) >= self._num_items():
            img = img[:, :, ::-1]
        return np.array(img, dtype=np.uint8, order="C"), self._label(raw)
