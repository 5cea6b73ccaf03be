"""Project real images into a generator's latent space (W or W+), batched and multi-process, resumable, with metrics."""
import argparse
import io
import json
import os
import time
import uuid
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

from training import dist
from training.config import parse_bool
from training.errors import run_cli
from training.io.checkpoint import atomic_write, load_snapshot
from training.io.images import save_png, to_uint8
from training.eval.lpips import PerceptualWeightsNotFound, load_lpips
from training.eval.projector import (FALLBACK_LABEL, check_full_resolution, compute_w_stats, lpips_input,
                                project, psnr, ssim)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def list_targets(target: str) -> list:
    """The target files: one image, or the images directly inside a folder, sorted by name (stems must be unique, since
    they name the outputs)."""
    p = Path(target)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
    else:
        raise SystemExit(f"--target {target}: no such file or folder")
    if not files:
        raise SystemExit(f"--target {target}: no images ({', '.join(IMAGE_EXTS)}) in this folder")
    seen = {}
    for f in files:
        try:
            with PIL.Image.open(f) as img:
                img.verify()
        except Exception as e:  # PIL raises many types for files that are not intact images.
            raise SystemExit(f"--target {f}: not a readable image ({type(e).__name__}); expected an image file "
                             f"({', '.join(IMAGE_EXTS)}) or a folder of them")
        if f.stem in seen:
            raise SystemExit(f"--target {target}: {seen[f.stem].name} and {f.name} would both write "
                             f"{f.stem}_*; rename one")
        seen[f.stem] = f
    return files


def load_target(path, res: int, channels: int) -> np.ndarray:
    """Center-crop an image file to a square and resize it to `res` px (Lanczos): uint8 [C, res, res]."""
    img = PIL.Image.open(path)
    img = img.convert("RGB" if channels == 3 else "L")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((res, res), PIL.Image.LANCZOS)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@torch.no_grad()
def render(G, ws: torch.Tensor, device) -> np.ndarray:
    """Render ws one at a time with G's constant noise, as generate.py --projected-w does, so the PNG is reproducible:
    uint8 [N, C, H, W]."""
    return np.stack([to_uint8(G.synthesis(w.to(device), noise_mode="const"))[0].transpose(2, 0, 1)
                     for w in ws.split(1)])


def save_gif(frames, path, duration_ms: int = 80) -> None:
    """Save frames (uint8 [H, W, C]) as a looping GIF, atomically."""
    imgs = [PIL.Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=duration_ms, loop=0)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def save_mp4(frames, path, fps: int = 10, bitrate: str = "16M") -> None:
    """Save frames (uint8 [H, W, C], C = 1 or 3, even sides) as an H.264 mp4 with the ffmpeg binary that imageio-ffmpeg
    ships, at NVIDIA's fps (10) and bitrate (16M); written to a temporary name in the same folder, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.mp4")
    writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", bitrate=bitrate,
                                macro_block_size=1, ffmpeg_log_level="error")
    try:
        for f in frames:
            writer.append_data(np.repeat(f, 3, axis=2) if f.shape[-1] == 1 else f)
    finally:
        writer.close()
    os.replace(tmp, path)


def nvidia_aliases(outdir: Path, name: str, video: bool) -> list:
    """For a single target image: (ganforge file, NVIDIA's name) pairs, NVIDIA's projector writing target.png,
    proj.png, projected_w.npz and proj.mp4 (the same layout: w [1, num_ws, w_dim] under key `w`)."""
    pairs = [(f"{name}_target.png", "target.png"), (f"{name}_proj.png", "proj.png"),
             (f"{name}_w.npz", "projected_w.npz")] + ([(f"{name}_proj.mp4", "proj.mp4")] if video else [])
    return [(outdir / a, outdir / b) for a, b in pairs]


def image_metrics(target: np.ndarray, proj: np.ndarray, perceptual) -> dict:
    """PSNR, SSIM and (when available) LPIPS of one target/projection pair of uint8 [C, H, W] arrays."""
    out = {"psnr": float(psnr(target[None], proj[None])[0]), "ssim": float(ssim(target[None], proj[None])[0]),
           "lpips": None}
    if perceptual is not None:
        with torch.no_grad():
            a = lpips_input(torch.from_numpy(target[None]).float())
            b = lpips_input(torch.from_numpy(proj[None]).float())
            out["lpips"] = float(perceptual(a, b)[0])
    return out


def is_done(outdir: Path, name: str) -> bool:
    """Whether a target's outputs are complete (the .npz is written last, so its presence means the rest is there).
    """
    return (outdir / f"{name}_w.npz").is_file() and (outdir / f"{name}_proj.png").is_file()


def gather_parts(outdir: Path, token: str, payload: dict, poll_s: float = 0.5):
    """Merge the ranks' results through files in outdir, not a collective: ranks finish up to a whole batch apart
    (minutes at high resolution), longer than a collective's timeout. Returns all payloads on rank 0, else None."""
    rank, world = dist.get_rank(), dist.get_world_size()
    atomic_write(outdir / f".projection-{token}-rank{rank}.json", lambda f: f.write(json.dumps(payload).encode()))
    if rank != 0:
        return None
    paths = [outdir / f".projection-{token}-rank{r}.json" for r in range(world)]
    start = last = time.monotonic()
    while not all(p.is_file() for p in paths):
        time.sleep(poll_s)
        if time.monotonic() - last > 60:
            last = time.monotonic()
            missing = [r for r, p in enumerate(paths) if not p.is_file()]
            print(f"rank 0: waiting {last - start:.0f} s for ranks {missing} to finish", flush=True)
    parts = [json.loads(p.read_text()) for p in paths]
    for p in paths:
        p.unlink()
    return parts


def main(argv=None):
    """Project the targets (see --help); NVIDIA's option spellings are accepted. Returns 0."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--network", required=True, help="snapshot (.safetensors) or official .pkl")
    p.add_argument("--target", required=True, help="an image, or a folder of images")
    p.add_argument("--outdir", required=True)
    p.add_argument("--steps", "--num-steps", dest="steps", type=int, default=1000,
                   help="optimization steps per target (--num-steps: NVIDIA's spelling)")
    p.add_argument("--w-plus", action="store_true", help="optimize one w per layer (W+) instead of one w (W)")
    p.add_argument("--batch", type=int, default=8, help="targets optimized together per process")
    p.add_argument("--seed", type=int, default=303,
                   help="target i uses seed + i (i: index in the sorted folder); default 303, NVIDIA's")
    p.add_argument("--loss", default="lpips", choices=["lpips", "fallback"],
                   help="lpips (needs VGG16 weights) or fallback (pixel + D features, not LPIPS)")
    p.add_argument("--vgg16", default=None, help="NVIDIA vgg16.pt, or torchvision vgg16-397923af.pth")
    p.add_argument("--lpips-lin", default=None, help="LPIPS linear layers vgg.pth (with torchvision's VGG16)")
    p.add_argument("--save-video", type=parse_bool, nargs="?", const=True, default=False, metavar="BOOL",
                   help="also write <name>_proj.mp4 and <name>_progress.gif (target | projection); a bare "
                        "--save-video means true")
    p.add_argument("--video-every", type=int, default=None,
                   help="video/GIF frame interval in steps (default steps/50; 1 = every step, as NVIDIA's video)")
    p.add_argument("--w-avg-samples", type=int, default=10000, help="z samples that estimate w_avg and w_std")
    p.add_argument("--noise-reg", type=float, default=1e5, help="noise regularization weight")
    p.add_argument("--class", dest="class_idx", type=int, default=None, help="class label (conditional G)")
    p.add_argument("--device", default=None, help="default: this process's device")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        raise SystemExit(f"--steps and --batch must be >= 1, got {args.steps} and {args.batch}")

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init()
    device = torch.device(args.device) if args.device else dist.device()
    rank, world = dist.get_rank(), dist.get_world_size()
    outdir = Path(args.outdir)
    if Path(args.target).is_dir() and outdir.resolve() == Path(args.target).resolve():
        raise SystemExit("--outdir must differ from the --target folder (outputs would become targets)")
    files = list_targets(args.target)
    names = [f.stem for f in files]

    snap = load_snapshot(args.network, device=device)
    G = snap["G_ema"] if snap["G_ema"] is not None else snap["G"]
    if G is None:
        raise SystemExit(f"{args.network}: holds no generator (G_ema or G)")
    try:
        check_full_resolution(G, str(args.network))
    except ValueError as e:
        raise SystemExit(str(e))
    G = G.eval()
    D = snap["D"].eval() if (args.loss == "fallback" and snap["D"] is not None) else None
    c = None
    if G.c_dim > 0:
        if args.class_idx is None or not 0 <= args.class_idx < G.c_dim:
            raise SystemExit(f"this generator is conditional ({G.c_dim} classes): pass --class in [0, {G.c_dim})")
        c = torch.nn.functional.one_hot(torch.tensor(args.class_idx), G.c_dim).float()

    # LPIPS: required for the lpips loss; for the fallback loss only a metric, used when found without download.
    perceptual = None
    try:
        perceptual = load_lpips(args.vgg16, args.lpips_lin, device=device,
                                allow_download=None if args.loss == "lpips" else False)
    except PerceptualWeightsNotFound as e:
        if args.loss == "lpips":
            raise SystemExit(str(e))
        dist.print0("LPIPS metric off (no weights found locally); projecting with the fallback loss.")

    outdir.mkdir(parents=True, exist_ok=True)
    done = [i for i, n in enumerate(names) if is_done(outdir, n)]
    token = dist.broadcast_object(uuid.uuid4().hex[:12])  # names this run's result parts
    dist.barrier()  # every rank has listed what is done before anyone writes
    todo = [i for i in range(len(files)) if i not in set(done)]
    mine = todo[rank::world]
    dist.print0(f"Projecting {len(todo)} of {len(files)} targets ({len(done)} already done) on {world} "
                f"process(es), {args.steps} steps, {'W+' if args.w_plus else 'W'}, loss {args.loss}")
    res, channels = G.img_resolution, G.img_channels
    w_stats = compute_w_stats(G, args.w_avg_samples, c, device)
    every = args.video_every or max(1, args.steps // 50)

    records = []
    batches = [mine[k:k + args.batch] for k in range(0, len(mine), args.batch)]
    loss_label = None
    for b, batch in enumerate(batches):
        targets = np.stack([load_target(files[i], res, channels) for i in batch])
        frames = [[] for _ in batch]
        bar = tqdm(total=args.steps, desc=f"batch {b + 1}/{len(batches)} ({len(batch)} targets)",
                   disable=not dist.is_main(), leave=False)

        def on_step(step, info):
            bar.update(1)
            if step % 10 == 0 or step == args.steps - 1:  # (reading the loss synchronizes a GPU)
                bar.set_postfix(dist=f"{float(info['dist'].mean()):.4f}")
            if args.save_video and (step % every == 0 or step == args.steps - 1):
                imgs = render(G, info["w"], device)
                for j in range(len(batch)):
                    frames[j].append(np.concatenate([targets[j], imgs[j]], axis=2).transpose(1, 2, 0))

        r = project(G, torch.from_numpy(targets), num_steps=args.steps, w_space="w+" if args.w_plus else "w",
                    regularize_noise_weight=args.noise_reg, loss=args.loss, perceptual=perceptual, D=D,
                    seed=args.seed, indices=batch, c=c, device=device, progress=on_step, w_stats=w_stats)
        bar.close()
        loss_label = r["loss_kind"]
        projs = render(G, r["w"], device)
        for j, i in enumerate(batch):
            name = names[i]
            save_png(targets[j].transpose(1, 2, 0), outdir / f"{name}_target.png")
            if args.save_video:
                save_gif(frames[j], outdir / f"{name}_progress.gif")
                save_mp4(frames[j], outdir / f"{name}_proj.mp4")
            save_png(projs[j].transpose(1, 2, 0), outdir / f"{name}_proj.png")
            w = r["w"][j:j + 1].numpy().astype(np.float32)
            atomic_write(outdir / f"{name}_w.npz", lambda f, w=w: np.savez(f, w=w))
            records.append(dict(name=name, file=files[i].name, index=i, rank=rank, resumed=False,
                                loss=float(r["dist"][j]), noise_reg=float(r["reg"][j]),
                                **image_metrics(targets[j], projs[j], perceptual)))

    # Targets done by an earlier run: metrics again from their files, the loss from the earlier projection.json.
    old, old_settings = {}, {}
    if (outdir / "projection.json").is_file():
        try:
            old_doc = json.loads((outdir / "projection.json").read_text())
            old = {rec["name"]: rec for rec in old_doc["images"]}
            old_settings = old_doc.get("settings", {})
        except (ValueError, KeyError, TypeError):
            old, old_settings = {}, {}
    for i in done[rank::world]:
        name = names[i]
        proj = np.asarray(PIL.Image.open(outdir / f"{name}_proj.png"), dtype=np.uint8)
        proj = proj[None] if proj.ndim == 2 else proj.transpose(2, 0, 1)
        prev = old.get(name, {})
        records.append(dict(name=name, file=files[i].name, index=i, rank=prev.get("rank"), resumed=True,
                            loss=prev.get("loss"), noise_reg=prev.get("noise_reg"),
                            **image_metrics(load_target(files[i], res, channels), proj, perceptual)))

    gathered = gather_parts(outdir, token, dict(records=records, loss_label=loss_label))
    if dist.is_main():
        images = sorted((rec for g in gathered for rec in g["records"]), key=lambda rec: rec["index"])
        labels = [g["loss_label"] for g in gathered if g["loss_label"]]
        loss_label = labels[0] if labels else old_settings.get(
            "loss", "lpips" if args.loss == "lpips" else FALLBACK_LABEL)
        settings = dict(network=str(args.network), target=str(args.target), steps=args.steps,
                        w_space="w+" if args.w_plus else "w", batch=args.batch, seed=args.seed,
                        loss=loss_label, lpips_weights=perceptual.source if perceptual is not None else None,
                        initial_lr=0.1, lr_rampup=0.05, lr_rampdown=0.25, initial_noise_factor=0.05,
                        noise_ramp_length=0.75, regularize_noise_weight=args.noise_reg,
                        w_avg_samples=args.w_avg_samples, w_std=w_stats[1], resolution=res,
                        num_ws=G.num_ws, w_dim=G.w_dim, world_size=world, class_idx=args.class_idx)
        valid = [rec for rec in images if rec["psnr"] is not None]
        summary = {k: float(np.mean([rec[k] for rec in valid])) if valid and all(rec[k] is not None for rec in valid)
                   else None for k in ("psnr", "ssim", "lpips")}
        doc = dict(settings=settings, summary=summary, images=images)
        atomic_write(outdir / "projection.json", lambda f: f.write(json.dumps(doc, indent=2).encode()))
        if Path(args.target).is_file():  # one target: also NVIDIA's file names, for tools that expect them
            for src, dst in nvidia_aliases(outdir, names[0], args.save_video):
                if src.is_file() and src != dst:
                    atomic_write(dst, lambda f, src=src: f.write(src.read_bytes()))
        print(f"Wrote {len(images)} projections to {outdir} (mean PSNR {summary['psnr']}, SSIM {summary['ssim']}, "
              f"LPIPS {summary['lpips']})")
    return 0


if __name__ == "__main__":
    run_cli(main, dist.end_process)
