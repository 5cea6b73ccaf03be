"""Convert a folder or zip of arbitrary images (or the embedded synthetic set) into a ganforge dataset."""
import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile

import numpy as np
import PIL.Image
import PIL.ImageOps

from training.data.dataset import _FileSource
from training.errors import run_cli
from training.data.synthetic import SyntheticDataset
from training.io.files import atomic_open

# Resampling filters selectable with --filter.
FILTERS = {"box": PIL.Image.Resampling.BOX, "lanczos": PIL.Image.Resampling.LANCZOS}

# Help text shown after the options: output format, conversions and transforms.
DESCRIPTION = """\
Writes square RGB PNGs as 00000/img00000000.png, 00000/img00000001.png, ... (1000 per folder) plus a
dataset.json with {"labels": [[name, class], ...], "class_names": {name: class, ...}} (--labels from-folders) or
{"labels": null}; this is the format
training/data/dataset.py's ImageDataset reads. Every image is converted to 8-bit RGB: grayscale is replicated,
16-bit is scaled down, and images with transparency (RGBA, LA, palette) are composited over black.
JPEG EXIF orientation is applied. Unreadable files are skipped with a warning.

Transforms (--transform):
  center-crop       crop the largest centered square, then resize to the resolution (default)
  center-crop-wide  crop a centered 2:1 (width:height) box, resize to R x R/2 and center it on a black R x R canvas
  pad               resize so that the longer side is R, then pad to a square with black

--dest ending in .zip writes a zip (atomically: temporary file, then rename; an existing zip is replaced);
any other --dest is a folder that must not exist yet or be empty.
--source synthetic[:R] dumps the embedded synthetic dataset (with its shape classes as labels unless
--labels none).
"""


def to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """Bring any PIL image to 8-bit RGB (see DESCRIPTION for the rules)."""
    img = PIL.ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if arr.max(initial=0) > 255 else 1.0
        img = PIL.Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        img = PIL.Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        black = PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return PIL.Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def transform(img: PIL.Image.Image, mode: str, res: int, resample) -> PIL.Image.Image:
    """Apply one of the --transform geometries and return an R x R RGB image."""
    w, h = img.size
    if mode == "center-crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return img.crop((left, top, left + s, top + s)).resize((res, res), resample)
    if mode == "center-crop-wide":
        cw, ch = (w, w // 2) if w <= 2 * h else (2 * h, h)
        cw, ch = max(cw, 1), max(ch, 1)
        left, top = (w - cw) // 2, (h - ch) // 2
        wide = img.crop((left, top, left + cw, top + ch)).resize((res, res // 2), resample)
        canvas = PIL.Image.new("RGB", (res, res))
        canvas.paste(wide, (0, (res - res // 2) // 2))
        return canvas
    if mode == "pad":
        scale = res / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = PIL.Image.new("RGB", (res, res))
        canvas.paste(img.resize((nw, nh), resample), ((res - nw) // 2, (res - nh) // 2))
        return canvas
    raise ValueError(f"unknown transform {mode!r}")


def out_name(i: int) -> str:
    """Name of the i-th output image, as in the official format."""
    s = f"{i:08d}"
    return f"{s[:5]}/img{s}.png"


def parse_args(argv=None):
    """Parse the command line; `argv=None` reads sys.argv."""
    p = argparse.ArgumentParser(description=__doc__, epilog=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="folder or .zip of images, or synthetic[:resolution]")
    p.add_argument("--dest", required=True, help="output .zip, or a new/empty folder")
    p.add_argument("--resolution", type=int, default=None,
                   help="output side, a power of two (default: 32 for synthetic, else the first image's side "
                        "if it is square and a power of two; every other image is then resized to it, and the "
                        "tool says how many)")
    p.add_argument("--transform", choices=["center-crop", "center-crop-wide", "pad"], default="center-crop")
    p.add_argument("--filter", choices=sorted(FILTERS), default="lanczos", help="resampling filter")
    p.add_argument("--labels", choices=["from-folders", "none"], default=None,
                   help="from-folders: each immediate subfolder of --source is a class (sorted names -> 0, 1, ...); "
                        "default: none (synthetic: its shape classes)")
    p.add_argument("--max-images", type=int, default=None, help="stop after this many images")
    return p.parse_args(argv)


def synthetic_items(spec: str, args):
    """Yield (label or None, RGB image) from the synthetic dataset."""
    res = args.resolution
    if ":" in spec:
        text = spec.split(":", 1)[1]
        if not text.isdigit():
            raise SystemExit(f"error: --source {spec!r}: expected synthetic or synthetic:<resolution>")
        if res is not None and res != int(text):
            raise SystemExit(f"error: --source {spec} conflicts with --resolution {res}")
        res = int(text)
    ds = SyntheticDataset(resolution=res or 32)
    n = len(ds) if args.max_images is None else min(len(ds), args.max_images)
    for i in range(n):
        label = None if args.labels == "none" else ds.get_class(i)
        yield label, PIL.Image.fromarray(ds[i][0].transpose(1, 2, 0)), None


def file_items(src: _FileSource, args, classes: dict):
    """Yield (label, image or None, warning) for each image file of a folder/zip source, in sorted order."""
    for name in src.image_names():
        label = None
        if args.labels == "from-folders":
            label = classes[name.split("/")[0]]
        try:
            img = PIL.Image.open(io.BytesIO(src.read(name)))
            img.load()
            yield label, img, None
        except Exception as e:  # Any decoding failure: skip the file and say why.
            yield label, None, f"warning: skipping unreadable {src.where(name)} ({type(e).__name__}: {e})"


# Give the staged folder the permissions a normal mkdir would (mkdtemp makes it private).
def _chmod_default(path: str, mode: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


# Zip destination (stored, since PNGs are already compressed): built in an atomic file (training.io.files), which
# appears at `dest` complete, or not at all.
class _ZipWriter:
    def __init__(self, dest: str):
        self.out = atomic_open(dest)
        self.zf = zipfile.ZipFile(self.out.file, "w", compression=zipfile.ZIP_STORED)

    def write(self, name: str, data: bytes):
        self.zf.writestr(name, data)

    def commit(self):
        self.zf.close()  # (writes the central directory; the file itself stays open for the commit)
        self.out.commit()

    def abort(self):
        try:
            self.zf.close()
        finally:
            self.out.discard()


# Folder destination: staged in a hidden sibling folder, renamed into place at the end.
class _FolderWriter:
    def __init__(self, dest: str):
        if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
            raise SystemExit(f"error: --dest {dest} exists and is not an empty folder; choose a new path")
        self.dest = dest
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(dest)))

    def write(self, name: str, data: bytes):
        path = os.path.join(self.tmp, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def commit(self):
        if os.path.isdir(self.dest):
            os.rmdir(self.dest)  # Empty (checked above); rename cannot replace it on every platform.
        _chmod_default(self.tmp, 0o777)
        os.replace(self.tmp, self.dest)

    def abort(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


def main(argv=None) -> int:
    """Convert --source into --dest; returns 0 on success (raises SystemExit with a message on bad input)."""
    args = parse_args(argv)
    res = args.resolution
    if res is not None and (res < 1 or res & (res - 1)):
        raise SystemExit(f"error: --resolution must be a power of two, got {res}")
    synthetic = args.source == "synthetic" or args.source.startswith("synthetic:")
    classes = {}
    if synthetic:
        items = synthetic_items(args.source, args)
        res = None  # Rendered at the requested size; no resampling.
    else:
        src = _FileSource(args.source)
        names = src.image_names()
        if src.outside:
            print(f"warning: skipping {len(src.outside)} zip member(s) whose path leaves the archive (../ or "
                  f"absolute), e.g. {src.outside[0]}", file=sys.stderr)
        if not names:
            raise SystemExit(f"error: no images found in {args.source}")
        if args.labels == "from-folders":
            loose = [n for n in names if "/" not in n]
            if loose:
                raise SystemExit(f"error: --labels from-folders: {src.where(loose[0])} is not inside a class "
                                 f"subfolder (every image must be under <source>/<class name>/)")
            classes = {c: i for i, c in enumerate(sorted({n.split("/")[0] for n in names}))}
            print("classes: " + ", ".join(f"{c}={i}" for c, i in classes.items()))
        items = file_items(src, args, classes)

    writer = _ZipWriter(args.dest) if args.dest.lower().endswith(".zip") else _FolderWriter(args.dest)
    labels, skipped, resized = [], 0, 0
    try:
        for label, img, warning in items:
            if args.max_images is not None and len(labels) >= args.max_images:
                break
            if img is None:
                print(warning, file=sys.stderr)
                skipped += 1
                continue
            img = to_rgb(img)
            if res is None and not synthetic:
                w, h = img.size
                if w != h or w & (w - 1):
                    raise SystemExit(f"error: the first image is {w}x{h}; pass --resolution (a power of two)")
                res = w
                print(f"--resolution not given: {res} px, the first image's size; images of other sizes are resized "
                      f"to it ({args.transform}, {args.filter})")
            if not synthetic:
                resized += img.size != (res, res)
                img = transform(img, args.transform, res, FILTERS[args.filter])
            buf = io.BytesIO()
            img.save(buf, format="PNG", compress_level=6)
            name = out_name(len(labels))
            writer.write(name, buf.getvalue())
            labels.append([name, label])
        if not labels:
            raise SystemExit(f"error: no readable images in {args.source}")
        meta = {"labels": labels if labels[0][1] is not None else None}
        if classes:
            meta["class_names"] = classes
        writer.write("dataset.json", json.dumps(meta).encode("utf-8"))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    n_cls = len(classes) if classes else (len({l for _, l in labels}) if labels[0][1] is not None else 0)
    print(f"wrote {len(labels)} images ({n_cls} classes) to {args.dest}; skipped {skipped} unreadable file(s)"
          + (f"; resized {resized} to {res}x{res}" if not synthetic else ""))
    if classes:
        print("labels: train with data.use_labels=true for a class-conditional model; generate.py --class <name> "
              "takes these names")
    return 0


if __name__ == "__main__":
    run_cli(main)
