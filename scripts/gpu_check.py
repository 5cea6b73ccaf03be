"""Checks a GPU machine in one command within a time budget: op builds, parity and speed first, then training speed.

On a bare GPU machine (torch preinstalled, no package index), from the repository's root, with the wheels that
scripts/gpu_wheels.sh put into .whl/ (hydra-core, omegaconf, antlr4) carried along:

  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu_check.py --device cuda --out gpu-check --budget 360

(`make gpu-check` does both.) The op parts import only `ops` and run even when `training` cannot be imported; the
training rows then say why not. Report: <out>/gpu-check.md (at most 12,000 characters) and <out>/gpu-check.json.
"""
import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import torch

import gpu_check_ops
import gpu_check_report
from ops import dispatch

try:  # the training rows need training (and Hydra); without it the op parts still run and the rows say why not
    import gpu_check_training
    from training import dist
    TRAINING_MISSING = None
except Exception as e:  # noqa: BLE001 - any import failure (a missing package, a broken module) is reported
    gpu_check_training = dist = None
    TRAINING_MISSING = f"not run: training cannot be imported ({type(e).__name__}: {e})"
try:  # the one atomic writer and error line (standard library only); without training: plain writes and prints
    from training.errors import UserError, report as report_error
    from training.io.files import atomic_write
except Exception:  # noqa: BLE001
    UserError = report_error = atomic_write = None

# The training rows in plan order: (preset, px on a GPU, ops impl, precision). The reference rows come last and none
# runs at 1024 px (it would take the budget of everything else).
TRAINING_ROWS = [("paper256", 256, "fused", "num_fp16_res=4"), ("paper256", 256, "fused", "mixed_precision=bf16"),
                 ("stylegan2", 1024, "fused", "num_fp16_res=4"), ("paper256", 256, "ref", "num_fp16_res=4"),
                 ("paper256", 256, "ref", "mixed_precision=bf16"), ("stylegan2", 1024, "ref", "num_fp16_res=4")]

# Each stage's weight in sharing what is left of the budget (see `share`); the 1024 px run also has a floor of a
# quarter of the budget and at least 90 s on a GPU (its first minibatches alone take tens of seconds).
WEIGHTS = {"parity": 0.8, "op_speed": 1.0, "train paper256": 1.5, "train stylegan2": 2.5, "syncs": 0.5,
           "train ref": 1.0, "large": 0.5}


def share(left: float, weights: list, floors: list) -> float:
    """Seconds for the first of the remaining stages: its weight's share of what is left once the floors of the
    later stages are set aside, raised to its own floor, and never more than is left."""
    free = max(left - sum(floors[1:]), 0.0)
    return max(0.0, min(left, max(free * weights[0] / sum(weights), floors[0])))


class Plan:
    """The stages in order, each run in its share of the total budget (builds included: they run first and take
    what they take); stage records (name, budget_s, seconds, status) go into report['stages']."""
    def __init__(self, budget_s: float, stages: list):
        self.budget_s, self.stages, self.start, self.records = budget_s, stages, time.perf_counter(), []

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def run(self) -> None:
        """Run the stages (name, weight, floor, fn(budget_s) -> status) in order."""
        for i, (name, _, _, stage_fn) in enumerate(self.stages):
            budget = None if i == 0 else share(self.left(), [s[1] for s in self.stages[i:]],
                                               [s[2] for s in self.stages[i:]])
            t0 = time.perf_counter()
            print(f"[gpu_check] {name} (budget {'-' if budget is None else f'{budget:.0f} s'}) ...", flush=True)
            try:
                status = stage_fn(budget)
            except Exception as e:  # noqa: BLE001 - a stage's crash is its row's error; the check goes on
                status = f"error: {type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            seconds = time.perf_counter() - t0
            self.records.append(dict(name=name, budget_s=None if budget is None else round(budget, 1),
                                     seconds=round(seconds, 1), status=status))
            print(f"[gpu_check] {name}: {status} ({seconds:.1f} s)", flush=True)


def _stage_status(rows) -> str:
    """A stage's status from its rows: 'complete', or how many rows were not, with the first reason."""
    bad = [r["status"] for r in rows if r.get("status") != "complete"]
    return "complete" if not bad else f"{len(rows) - len(bad)} of {len(rows)} complete; first other: {bad[0][:150]}"


def compute_dtype(row: dict, cuda: bool) -> torch.dtype:
    """The dtype the ops see in a row's highest resolutions: bfloat16 under mixed_precision=bf16, float16 in the
    num_fp16_res blocks on CUDA (float32 on CPU, where the blocks stay float32)."""
    if row["precision"] == "mixed_precision=bf16":
        return torch.bfloat16
    return torch.float16 if cuda and row["precision"] == "num_fp16_res=4" else torch.float32


def training_row(preset, res, impl, precision, device, small) -> dict:
    """A training row before its run: what runs at which size (on CPU: 32 and 64 px, batch 8, few channels)."""
    run_res = (32 if res <= 256 else 64) if small else res
    batch, batch_gpu = (8, 8) if small else (32, 32 if res <= 256 else 8)
    return dict(preset=preset, resolution=res, run_resolution=run_res, ops=impl, precision=precision, batch=batch,
                batch_gpu=batch_gpu, device=str(device))


def build_plan(report: dict, device: torch.device, budget_s: float, small: bool, tmp: str) -> Plan:
    """The check's stages in the order they matter: builds, parity, op speed, the fused training rows (paper256 in
    float16 and bf16, stylegan2@1024 in float16), the reference rows, host syncs, tensors over 2^31 elements."""
    cuda = device.type == "cuda"
    min_run = 15.0 if cuda else 3.0  # less than this cannot time a run: the row says 'budget' instead
    min_syncs = 10.0 if cuda else 20.0  # three minibatches of a tiny model, every phase due
    min_large = 30.0  # on CUDA: several 4 GiB float16 tensors and their float64 comparisons
    floor_1024 = max(0.25 * budget_s, 90.0 if cuda else 0.0)

    def env(_):
        report["env"] = gpu_check_ops.check_env(device)
        return report["env"]["status"]

    def parity(b):
        report["parity"] = gpu_check_ops.parity(device, b)
        return _stage_status(report["parity"])

    def op_speed(b):
        report["op_speed"] = gpu_check_ops.op_speed(device, b, small)
        if cuda:
            torch.cuda.empty_cache()  # the training runs' peak memory is theirs alone
        return _stage_status(report["op_speed"])

    def train(row):
        def run(b):
            row["budget_s"] = round(b, 1)
            if TRAINING_MISSING:
                row["status"] = TRAINING_MISSING
            elif row["resolution"] > 256 and row["ops"] == "ref":
                row["status"] = "dropped: reference rows run at 256 px only (the fused row is the 1024 px number)"
            elif row["ops"] == "fused" and gpu_check_ops.fused_unavailable(device, compute_dtype(row, cuda)):
                why = gpu_check_ops.fused_unavailable(device, compute_dtype(row, cuda))
                row["status"] = f"skipped: a fused op is unavailable for this precision here ({why})"
            elif b < min_run:
                row["status"] = f"budget: {b:.0f} s left for this run, it needs at least {min_run:.0f} s"
            else:
                warmup, count = ((1, 3) if small else (3, 16)) if row["resolution"] <= 256 else \
                    ((1, 2) if small else (1, 8))  # 1024 px: fewer warm-up steps, a shorter window
                gpu_check_training.time_run(row, device, b, warmup, count, os.path.join(tmp, f"run{len(rows)}"),
                                            small)
            return row["status"]
        rows.append(row)
        return run

    def syncs(b):
        if TRAINING_MISSING:
            report["syncs"] = {"status": TRAINING_MISSING, "ok": False}
        elif b < min_syncs:
            report["syncs"] = {"status": f"budget: {b:.0f} s left, counting needs about {min_syncs:.0f} s"}
        else:
            report["syncs"] = gpu_check_training.count_syncs(device, os.path.join(tmp, "syncs"))
        return report["syncs"]["status"]

    def large(b):
        if cuda and b < min_large:  # its first comparison alone takes tens of seconds
            report["large"] = [dict(op="(all)", order="(all)",
                                    status=f"budget: {b:.0f} s left, the check needs about {min_large:.0f} s")]
        else:
            report["large"] = gpu_check_ops.large(device, b)
        return _stage_status(report["large"])

    rows = report["training"] = []
    stages = [("op builds", 0, 0, env), ("op parity", WEIGHTS["parity"], 0, parity),
              ("op speed", WEIGHTS["op_speed"], 0, op_speed)]
    for preset, res, impl, precision in TRAINING_ROWS:
        row = training_row(preset, res, impl, precision, device, small)
        weight = WEIGHTS["train ref"] if impl == "ref" else WEIGHTS[f"train {preset}"]
        drop = res > 256 and impl == "ref"
        stage = (f"train {preset}@{res} {impl} {precision}", 0.0 if drop else weight,
                 floor_1024 if res > 256 and not drop else 0.0, train(row))
        stages.append(stage)
    stages += [("host syncs", WEIGHTS["syncs"], 0, syncs), ("tensors over 2^31 elements", WEIGHTS["large"], 0, large)]
    return Plan(budget_s, stages)


def passed(report: dict) -> bool:
    """Whether the check passes: every op built, no stage crashed, no parity or large-tensor failure, every training
    row complete or cut by the budget (no error, no out of memory, not unrunnable), the host-sync target met (or its
    count left out for the budget). Speed is reported, not judged."""
    if not report.get("env", {}).get("ok"):
        return False
    bad = lambda s: s.startswith(("FAIL", "error", "out of memory", "not run"))  # noqa: E731
    rows = report.get("stages", []) + report.get("parity", []) + report.get("large", []) + report.get("training", [])
    syncs = report.get("syncs", {})
    return not any(bad(r.get("status", "error")) for r in rows) and (
        syncs.get("ok", False) or syncs.get("status", "").startswith("budget"))


# Write a report file: atomically where training's writer is importable.
def write_text(path: str, text: str) -> None:
    if atomic_write is not None:
        atomic_write(path, lambda f: f.write(text), mode="w")
    else:
        with open(path, "w") as f:
            f.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--budget", type=float, default=360.0,
                        help="seconds for the whole check, op builds included (default 360)")
    parser.add_argument("--quick", action="store_true", help="small sizes (always on CPU): a rehearsal of the plan")
    parser.add_argument("--out", default="gpu-check", help="folder for gpu-check.md and gpu-check.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        message = f"--device cuda, but torch {torch.__version__} sees no CUDA device"
        if report_error is not None:
            return report_error(UserError(message))
        print(f"error: {message}", file=sys.stderr)
        return 2
    small = args.quick or device.type == "cpu"
    if device.type == "cpu":
        torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("GANFORGE_OFFLINE", "1")
    dispatch.set_default_impl("auto")
    report = {"command": " ".join(["python", "scripts/gpu_check.py"] + (argv if argv is not None else sys.argv[1:])),
              "budget_s": args.budget, "device": str(device), "small": small}
    with tempfile.TemporaryDirectory() as tmp:
        plan = build_plan(report, device, args.budget, small, tmp)
        plan.run()
    report["stages"] = plan.records
    report["auto_decisions"] = gpu_check_ops.auto_decisions()
    report["total_s"] = time.perf_counter() - plan.start
    report["ok"] = passed(report)
    md = gpu_check_report.markdown(report)
    write_text(os.path.join(args.out, "gpu-check.json"), json.dumps(report, indent=1, default=str))
    write_text(os.path.join(args.out, "gpu-check.md"), md)
    print(md)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    code = main()
    if dist is None:
        sys.exit(code)
    dist.end_process(code)  # leaves a process group cleanly where a run made one
