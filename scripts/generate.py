"""Generate images from a snapshot (at its progressive stage, if any): per seed, or a style-mixing grid."""
import argparse
import re
from pathlib import Path

import numpy as np
import torch

from training.data.dataset import class_names
from training.errors import UserError, run_cli
from training.io.checkpoint import load_snapshot
from training.io.images import make_grid, save_png, to_uint8


def parse_range(text: str, option: str = "--seeds") -> list:
    """"0-3,7" -> [0, 1, 2, 3, 7]; anything else (a word, a descending range, nothing at all) is a UserError naming
    `option`."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise UserError(f"{option}={text}: the range {a}-{b} is empty (ranges count up: {b}-{a})")
            out.extend(range(a, b + 1))
        elif re.fullmatch(r"\s*\d+\s*", part):
            out.append(int(part))
        elif part.strip():
            raise UserError(f"{option}={text}: {part.strip()!r} is not a number or a range like 0-7 (expected e.g. "
                            f"0-7,42)")
    if not out:
        raise UserError(f"{option}={text!r} names no numbers (expected e.g. 0-7,42)")
    return out


def seed_to_z(seed: int, z_dim: int) -> torch.Tensor:
    """z for a seed: the official convention, numpy RandomState(seed).randn(z_dim), so seeds interchange."""
    return torch.from_numpy(np.random.RandomState(seed).randn(1, z_dim)).float()


def make_label(G, class_idx, device) -> torch.Tensor:
    """One-hot label for `class_idx` (an error when G is conditional and no class is given, or the reverse)."""
    c = torch.zeros([1, G.c_dim], device=device)
    if G.c_dim > 0:
        if class_idx is None:
            raise UserError(f"this generator is conditional ({G.c_dim} classes): pass --class")
        if not 0 <= class_idx < G.c_dim:
            raise UserError(f"--class {class_idx} out of range [0, {G.c_dim})")
        c[0, class_idx] = 1
    elif class_idx is not None:
        print("warning: --class ignored, the generator is unconditional")
    return c


# --class takes an index or a class name from the training data's dataset.json (written by dataset_tool.py
# --labels from-folders), found through the snapshot's recorded data.path.
def class_index(text, snap: dict, network) -> int | None:
    """The class index that --class `text` names (None when not given)."""
    if text is None or re.fullmatch(r"\d+", text):
        return None if text is None else int(text)
    path = ((snap.get("config") or {}).get("data") or {}).get("path")
    names = class_names(path) if path else None
    if not names:
        raise UserError(f"--class {text}: a class name needs the training data's dataset.json with class_names, and "
                        f"{network} records {'no data.path' if not path else repr(path) + ' without them'}; give the "
                        f"class index instead")
    if text not in names:
        raise UserError(f"--class {text}: no such class in {path} (classes: "
                        f"{', '.join(f'{n}={i}' for n, i in sorted(names.items(), key=lambda x: x[1]))})")
    return names[text]


@torch.no_grad()
def generate_images(G, seeds, outdir, truncation_psi=1.0, class_idx=None, noise_mode="const", device="cpu"):
    """Images for seeds, written as seed%04d.png; returns the uint8 arrays."""
    c = make_label(G, class_idx, device)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    arrays = []
    for seed in seeds:
        img = G(seed_to_z(seed, G.z_dim).to(device), c, truncation_psi=truncation_psi, noise_mode=noise_mode)
        arr = to_uint8(img)[0]
        save_png(arr, outdir / f"seed{seed:04d}.png")
        arrays.append(arr)
    return arrays


@torch.no_grad()
def generate_from_w(G, npz_path, outdir, noise_mode="const", device="cpu"):
    """Render saved ws (an .npz with key 'w' of shape [1, num_ws, w_dim], the official projector layout)."""
    data = np.load(npz_path)
    if "w" not in data:
        raise UserError(f"{npz_path}: no key 'w' (expected an array of shape [1, {G.num_ws}, {G.w_dim}])")
    ws = torch.from_numpy(data["w"]).float().to(device)
    if ws.ndim != 3 or ws.shape[1:] != (G.num_ws, G.w_dim):
        raise UserError(f"{npz_path}: 'w' has shape {tuple(ws.shape)}, expected [N, {G.num_ws}, {G.w_dim}]")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    arrays = []
    for i, w in enumerate(ws.split(1)):
        arr = to_uint8(G.synthesis(w, noise_mode=noise_mode))[0]
        save_png(arr, outdir / f"proj{i:02d}.png")
        arrays.append(arr)
    return arrays


@torch.no_grad()
def style_mixing_grid(G, row_seeds, col_seeds, styles, outpath, truncation_psi=1.0, class_idx=None,
                      noise_mode="const", device="cpu"):
    """Style mixing grid (StyleGAN fig. 3): rows take coarse styles (ws[:cols]) from row seeds, the rest from columns.
    """
    bad = [i for i in styles if not 0 <= i < G.num_ws]
    if bad:
        raise UserError(f"--mix-styles: ws index {bad[0]} out of range: this generator has {G.num_ws} ws, indices "
                        f"0-{G.num_ws - 1}")
    c = make_label(G, class_idx, device)
    seeds = sorted(set(row_seeds + col_seeds))
    ws = {s: G.mapping(seed_to_z(s, G.z_dim).to(device), c, truncation_psi=truncation_psi) for s in seeds}
    img = {s: to_uint8(G.synthesis(ws[s], noise_mode=noise_mode))[0] for s in seeds}
    blank = np.zeros_like(img[seeds[0]])
    tiles = [blank] + [img[s] for s in col_seeds]
    for r in row_seeds:
        tiles.append(img[r])
        for col in col_seeds:
            w = ws[col].clone()
            w[:, styles] = ws[r][:, styles]
            tiles.append(to_uint8(G.synthesis(w, noise_mode=noise_mode))[0])
    save_png(make_grid(np.stack(tiles), len(col_seeds) + 1, len(row_seeds) + 1), outpath)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--network", required=True, help="snapshot (.safetensors, or an official .pkl)")
    p.add_argument("--outdir", required=True)
    p.add_argument("--seeds", default="0-7", help="e.g. 0-7,42")
    p.add_argument("--trunc", type=float, default=1.0, help="truncation psi")
    p.add_argument("--class", dest="class_idx", default=None,
                   help="class (conditional G): an index, or a class name from the dataset's dataset.json")
    p.add_argument("--noise-mode", default="const", choices=["const", "random", "none"])
    p.add_argument("--projected-w", default=None, help="render the ws of a projection .npz instead of seeds")
    p.add_argument("--mix-rows", default=None, help="style mixing: row seeds, e.g. 0-3")
    p.add_argument("--mix-cols", default=None, help="style mixing: column seeds, e.g. 10-13")
    p.add_argument("--mix-styles", default="0-5", help="style mixing: ws indices taken from the rows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    seeds = parse_range(args.seeds) if not (args.projected_w or args.mix_rows) else None
    mix = ((parse_range(args.mix_rows, "--mix-rows"), parse_range(args.mix_cols or "0-3", "--mix-cols"),
            parse_range(args.mix_styles, "--mix-styles")) if args.mix_rows else None)
    snap = load_snapshot(args.network, device=args.device)
    G = snap["G_ema"]
    if G is None:
        raise UserError(f"{args.network}: holds no G_ema")
    class_idx = class_index(args.class_idx, snap, args.network)
    res, alpha = getattr(G, "stage", (G.img_resolution, 1.0))  # load_snapshot applied a recorded stage
    if res < G.img_resolution or alpha < 1:
        print(f"{args.network}: taken during the progressive schedule at stage {res} px (fade {alpha:.2f}) of "
              f"{G.img_resolution} px; generating {res}x{res} images")
    kimg = snap.get("meta", {}).get("cur_nimg")
    print(f"Generating at {res}x{res} px from {args.network}" + (f" ({kimg / 1000:.1f} kimg)" if kimg else ""))
    if args.projected_w:
        generate_from_w(G, args.projected_w, args.outdir, args.noise_mode, args.device)
    elif args.mix_rows:
        style_mixing_grid(G, *mix, Path(args.outdir) / "stylemix.png", args.trunc, class_idx, args.noise_mode,
                          args.device)
    else:
        generate_images(G, seeds, args.outdir, args.trunc, class_idx, args.noise_mode, args.device)
    print(f"Wrote {args.outdir}")


if __name__ == "__main__":
    run_cli(main)
