"""The record file names of a run directory (training/io/records.py): written and found again through one place."""
import json

from training.io import checkpoint as ckpt
from training.io.records import (append_metric_jsonl, best_files, best_path, metric_files, metric_path, read_stats,
                                 stats_path, update_best)
from training.report.page import read_metrics

# Metric names as parse_metric makes them, and one with the best file's suffix inside it (the two globs must not mix).
NAMES = ["fid50k_full", "kid10k_full", "swd2k-best"]


# A record of `name` as the metrics module makes one.
def result(name, value):
    return {"metric": name, "value": value, "detector_hash": "h", "resolution": 32, "dataset_resolution": 32}


# The files on disk carry the documented names; every reader finds each metric under the name it was written with.
def test_written_records_are_found_by_name(tmp_path):
    run = tmp_path / "run"
    written = {}
    for i, name in enumerate(NAMES):
        for kimg, value in ((4, 10.0 + i), (8, 5.0 + i)):
            record = append_metric_jsonl(str(run), result(name, value), f"network-snapshot-{kimg:06d}.safetensors",
                                         kimg)
            update_best(str(run), record)
            written.setdefault(name, []).append(record)
    stats_path(run).write_text(json.dumps({"Progress/kimg": 8.0}) + "\n")
    on_disk = sorted(p.name for p in run.iterdir())
    assert on_disk == sorted(["stats.jsonl"] + [f"metric-{n}.jsonl" for n in NAMES]
                             + [f"metric-{n}-best.json" for n in NAMES])
    assert metric_files(run) == [(n, metric_path(run, n)) for n in sorted(NAMES)]
    assert best_files(run) == [(n, best_path(run, n)) for n in sorted(NAMES)]
    assert read_metrics(run) == written
    assert ckpt.best_metrics(run) == {n: rows[-1] for n, rows in written.items()}
    assert read_stats(run) == [{"Progress/kimg": 8.0}]


# checkpoint.best_metrics keys a best record without a "metric" by the name in its file name and leaves out a file
# that is not JSON.
def test_best_metrics_names_from_the_path(tmp_path):
    best_path(tmp_path, "fid10").write_text(json.dumps({"value": 3.0, "kimg": 4}))
    best_path(tmp_path, "kid10").write_text("{not json")
    assert ckpt.best_metrics(tmp_path) == {"fid10": {"value": 3.0, "kimg": 4}}
