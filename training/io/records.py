"""Metric and stats records on disk: their file names, JSON lines read and appended, the best record per metric."""
import json
import os
import time
from pathlib import Path

from training.io.files import atomic_write

# The per-tick stats of a run (one JSON line per tick) in its run directory.
STATS_FILE = "stats.jsonl"
# A metric's records are metric-<name>.jsonl (every evaluation) and metric-<name>-best.json (the best so far).
METRIC_PREFIX, METRIC_SUFFIX, BEST_SUFFIX = "metric-", ".jsonl", "-best.json"


def stats_path(run_dir) -> Path:
    """<run_dir>/stats.jsonl."""
    return Path(run_dir) / STATS_FILE


def metric_stem(name: str) -> str:
    """The stem shared by the files of metric `name` ("metric-<name>"); the report page names its plots with it."""
    return f"{METRIC_PREFIX}{name}"


def metric_path(run_dir, name: str) -> Path:
    """<run_dir>/metric-<name>.jsonl, the records of metric `name`."""
    return Path(run_dir) / f"{metric_stem(name)}{METRIC_SUFFIX}"


def best_path(run_dir, name: str) -> Path:
    """<run_dir>/metric-<name>-best.json, the best record of metric `name`."""
    return Path(run_dir) / f"{metric_stem(name)}{BEST_SUFFIX}"


def metric_files(run_dir) -> list:
    """The metric-<name>.jsonl files of `run_dir` as [(name, path)], sorted by path."""
    paths = sorted(Path(run_dir).glob(f"{METRIC_PREFIX}*{METRIC_SUFFIX}"))
    return [(p.name[len(METRIC_PREFIX):-len(METRIC_SUFFIX)], p) for p in paths]


def best_files(run_dir) -> list:
    """The metric-<name>-best.json files of `run_dir` as [(name, path)], sorted by path."""
    paths = sorted(Path(run_dir).glob(f"{METRIC_PREFIX}*{BEST_SUFFIX}"))
    return [(p.name[len(METRIC_PREFIX):-len(BEST_SUFFIX)], p) for p in paths]


# One JSON object per line of `path`: blank lines are skipped, and so is an unfinished last line (no newline yet:
# a run may be writing it); any other line that is not a JSON object raises ValueError naming the file and line.
def read_jsonl(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                continue
            raise ValueError(f"{path}: line {number}: not valid JSON ({e.msg}); expected one JSON object per "
                             f"line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_stats(run_dir) -> list:
    """The lines of <run_dir>/stats.jsonl as dicts (read_jsonl's rules; [] when there is none)."""
    path = stats_path(run_dir)
    return read_jsonl(path) if path.is_file() else []


def metric_label(record: dict) -> str:
    """The metric's name for display: with "@<res>px" when the record is at a stage below the dataset's resolution
    (fid50k_full@16px), else the plain name."""
    res, full = record.get("resolution"), record.get("dataset_resolution")
    if res is not None and full is not None and int(res) < int(full):
        return f"{record['metric']}@{int(res)}px"
    return str(record["metric"])


def append_metric_jsonl(run_dir: str, result: dict, snapshot, kimg) -> dict:
    """Append one result to <run_dir>/metric-<name>.jsonl (append + flush + fsync, one line per write) with the
    snapshot and kimg; call from the main process. Returns the written record."""
    record = dict(result, snapshot=None if snapshot is None else os.path.basename(str(snapshot)),
                  kimg=kimg, timestamp=time.time())
    os.makedirs(run_dir, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(metric_path(run_dir, result["metric"]), "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return record


def update_best(run_dir: str, record: dict) -> bool:
    """Keep the best (lowest: FID, KID) record per metric in <run_dir>/metric-<name>-best.json; True if `record` is.

    Compared only at the same resolution: a record at a higher resolution than the best replaces it, one at a lower
    resolution (an earlier progressive stage) never does; at the same, one from another detector or against another
    real set (mirrored or not; a record without `mirror` was not) replaces it (the numbers are not comparable), else
    the lower value wins. No resolution compares as the same. Atomic write."""
    path = best_path(run_dir, record["metric"])
    best = None
    if os.path.isfile(path):
        with open(path) as f:
            best = json.load(f)
    if best is not None:
        rb, rr = best.get("resolution"), record.get("resolution")
        if rb is not None and rr is not None and int(rb) != int(rr):
            if int(rr) < int(rb):
                return False
        elif (best.get("detector_hash") == record.get("detector_hash")
              and bool(best.get("mirror", False)) == bool(record.get("mirror", False))
              and best["value"] <= record["value"]):
            return False
    atomic_write(path, lambda f: json.dump(record, f, sort_keys=True, indent=1), mode="w")
    return True
