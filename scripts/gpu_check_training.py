"""The training rows of scripts/gpu_check.py: timed runs of the real presets and the host-sync count per minibatch."""
import traceback

import torch

from training.config import compose_config
from probes import CountMinibatch, TimeMinibatches, run_with_probe

# NVIDIA's published StyleGAN2-ADA speeds (8 A100s) per GPU, and ganforge's targets for one H200 (s/kimg).
REFERENCE_SEC_PER_KIMG = {"paper256": (2.47 * 8, 10.0), "stylegan2": (14.57 * 8, 58.0)}

# The precisions a row can ask for: its overrides. num_fp16_res=4 is the presets' own float16 in the four highest
# resolutions (channels-last there); mixed_precision=bf16 is Accelerate's autocast over float32 layers.
PRECISIONS = {"num_fp16_res=4": ["model.num_fp16_res=4", "train.mixed_precision=no"],
              "mixed_precision=bf16": ["model.num_fp16_res=0", "train.mixed_precision=bf16"],
              "fp32": ["model.num_fp16_res=0", "train.mixed_precision=no"]}


def overrides(preset: str, res: int, impl: str, precision: str, batch: int, batch_gpu: int, run_dir: str,
              small: bool) -> list:
    """The overrides of one timed run: the preset at `res` px, augmentation on at a fixed p = 0.2 (so that its cost
    is in the number), lazy R1 and path length at the preset's intervals, nothing written but the run folder."""
    args = [f"model={preset}", f"data.resolution={res}", f"data.num_images={256 if res > 256 else 1024}",
            "metrics=none", "log.progress=false", "aug=fixed", "aug.p=0.2", "train.kimg=100000",
            "train.tick_kimg=100000", "train.snap=0", "train.image_snap=0", f"train.ops_impl={impl}",
            f"train.batch_size={batch}", f"train.batch_gpu={batch_gpu}", f"run_dir={run_dir}"]
    args += PRECISIONS[precision]
    if small:  # the CPU rehearsal: the same presets with few channels, one thread
        args += ["model.channel_base=512", "model.channel_max=32", "train.cpu_threads=1"]
    return args


def time_run(row: dict, device: torch.device, budget_s: float, warmup: int, count: int, run_dir: str,
             small: bool) -> dict:
    """Time one training run in this process (sec/kimg over `count` minibatches after `warmup`, peak memory) within
    `budget_s` seconds from the start of its config on, and fill in `row`: its result and a status that is
    'complete' or says why not (budget, out of memory, error text)."""
    probe = TimeMinibatches(warmup, count, budget_s, device)
    try:
        cfg = compose_config(overrides(row["preset"], row["run_resolution"], row["ops"], row["precision"],
                                       row["batch"], row["batch_gpu"], run_dir, small))
        row.update(aug=f"{cfg.aug.mode} p={cfg.aug.p:g}", mixed_precision=cfg.train.mixed_precision,
                   num_fp16_res=cfg.model.num_fp16_res)
        result = run_with_probe(cfg, probe).result
    except torch.cuda.OutOfMemoryError as e:
        row["status"] = f"out of memory: {str(e).splitlines()[0][:200]}"
        return row
    except Exception as e:  # noqa: BLE001 - a failing run is a finding: report it and go on
        row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        row["traceback"] = traceback.format_exc()[-2000:]
        return row
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row.update(result)
    nvidia, target = REFERENCE_SEC_PER_KIMG[row["preset"]]
    row.update(nvidia_a100_sec_per_kimg=nvidia, target_sec_per_kimg=target)
    if result["complete"]:
        row["status"] = "complete"
    elif not result["minibatches"]:
        row["status"] = f"budget: {budget_s:.0f} s spent before the first timed minibatch (after {warmup} warm-up)"
    else:
        row["status"] = (f"budget: window cut to {result['minibatches']} of {count} minibatches after "
                         f"{budget_s:.0f} s (lazy regularization not fully amortized)")
    return row


def count_syncs(device: torch.device, run_dir: str) -> dict:
    """Host syncs in one minibatch with every phase due (ADA at p = 0.5): the Python-level counter and, on CUDA, every
    synchronizing call that torch.cuda.set_sync_debug_mode reports; status 'complete' or the error."""
    args = ["model=tiny", "train=test", "model.channel_base=256", "model.channel_max=32", "data.num_images=256",
            "metrics=none", "log.progress=false", "aug=ada", "aug.p=0.5", "aug.sync_free=true",
            "train.r1_interval=2", "train.pl_interval=2", "train.tick_kimg=1", "train.kimg=1", "train.snap=0",
            "train.image_snap=0", f"run_dir={run_dir}"]
    try:
        probe = run_with_probe(compose_config(args), CountMinibatch(2))
    except Exception as e:  # noqa: BLE001 - reported in the row
        return {"status": f"error: {type(e).__name__}: {str(e)[:300]}", "ok": False,
                "traceback": traceback.format_exc()[-2000:]}
    c = probe.counter
    out = dict(reads=c.reads, copies=c.copies, sites=[f"{n} x {site}" for site, n in c.sites.most_common(8)],
               cuda_syncs=probe.cuda_syncs, cuda_messages=probe.cuda_messages[:8], target="<= 2 reads, 0 copies",
               status="complete")
    out["ok"] = c.reads <= 2 and c.copies == 0
    return out

