"""Trackers: TensorBoard events equal to stats.jsonl and the grids across a kill and resume; wandb run ids."""
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from faults import train_script
from helpers import PY, ROOT, TINY, script_env
from training.config import LogConfig
from training.report.trackers import WANDB_ID_FILE, open_trackers, resolve

TRACKED = TINY + ["log.trackers=[tensorboard,wandb]"]


# A training subprocess with wandb offline and every wandb folder inside `cwd` (no network, nothing in $HOME).
def train(args, cwd, extra_env=None):
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    env = script_env(cwd, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(cwd / "wandb-dir"),
                     WANDB_CACHE_DIR=str(cwd / "wandb-cache"), WANDB_CONFIG_DIR=str(cwd / "wandb-config"),
                     WANDB_DATA_DIR=str(cwd / "wandb-data"), **(extra_env or {}))
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([PY, train_script(ROOT, env)] + args, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def check(proc):
    assert proc.returncode == 0, f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def offline_runs(run_dir, run_id):
    return sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))


# Ticks of 32 images, a checkpoint every 2 ticks (64, 128), killed at 112 images after tick 3 (96) was reported:
# the rerun resumes from 64, stats.jsonl drops tick 3 and the rerun reports ticks 3 and 4 again.
@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("tracked") / "a"
    args = TRACKED + ["run_dir=run", "train.kimg=0.128", "train.snap=2"]
    proc = train(args, cwd, {"GANFORGE_TEST_KILL_AT_NIMG": "112"})
    assert proc.returncode == -9, proc.stderr[-3000:]
    run_dir = cwd / "run"
    ticks = [json.loads(line)["Progress/tick"] for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert ticks == [0, 1, 2, 3]
    first_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    proc = check(train(args, cwd))
    assert "Resuming from" in proc.stdout
    return run_dir, first_id


def test_tensorboard_events_match_stats_and_grids(killed_and_resumed):
    run_dir, _ = killed_and_resumed
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [s["Progress/tick"] for s in stats] == [0, 1, 2, 3, 4]
    steps = [round(s["Progress/kimg"] * 1000) for s in stats]
    assert steps == [0, 32, 64, 96, 128]
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    numeric = {k for s in stats for k, v in s.items() if isinstance(v, (int, float)) and k != "timestamp"}
    assert {"Loss/G/loss", "Loss/D/loss_real", "Progress/kimg", "Timing/sec_per_kimg"} <= numeric
    assert numeric <= set(tags["scalars"]), numeric - set(tags["scalars"])
    # Every tick once (the killed session's tick 3 is hidden by the rerun's purge_step), with stats.jsonl's values.
    for key in numeric:
        logged = {e.step: e.value for e in events.Scalars(key)}
        expected = {step: s[key] for step, s in zip(steps, stats) if key in s}
        assert [e.step for e in events.Scalars(key)] == sorted(expected), key
        for step, value in expected.items():
            assert logged[step] == pytest.approx(value, rel=1e-6, abs=1e-30), (key, step)
    # One grid per tick (train.image_snap=1); the last one is the fakes png the run wrote last.
    images = events.Images("fakes")
    assert [im.step for im in images] == steps
    last = np.asarray(PIL.Image.open(io.BytesIO(images[-1].encoded_image_string)))
    assert np.array_equal(last, np.asarray(PIL.Image.open(run_dir / "fakes000000.png")))
    assert (images[-1].width, images[-1].height) == (4 * 32, 2 * 32)


def test_wandb_id_is_kept_on_resume_and_new_for_another_run(killed_and_resumed, tmp_path):
    run_dir, first_id = killed_and_resumed
    assert len(first_id) >= 8 and (run_dir / WANDB_ID_FILE).read_text().strip() == first_id
    assert len(offline_runs(run_dir, first_id)) == 2  # the killed session and the resumed one, one wandb run
    # A run with the same folder name under another parent: another wandb run.
    other = tmp_path / "b" / "run"
    check(train(TINY + ["run_dir=run", "train.kimg=0.032", "log.trackers=[wandb]"], tmp_path / "b"))
    other_id = (other / WANDB_ID_FILE).read_text().strip()
    assert other_id != first_id and len(offline_runs(other, other_id)) == 1
    assert not (other / "tensorboard").exists()


def test_resolve_combines_trackers_and_wandb_mode():
    assert resolve(LogConfig()) == (None, False)
    assert resolve(LogConfig(trackers=["tensorboard"])) == (None, True)
    assert resolve(LogConfig(trackers=["wandb"])) == ("offline", False)
    assert resolve(LogConfig(wandb="online", trackers=["wandb", "tensorboard"])) == ("online", True)
    assert resolve(LogConfig(wandb="offline")) == ("offline", False)
    with pytest.raises(ValueError, match="log.trackers"):
        resolve(LogConfig(trackers=["mlflow"]))
    with pytest.raises(ValueError, match="log.wandb"):
        resolve(LogConfig(wandb="on"))


def test_nothing_configured_is_a_no_op_and_missing_wandb_is_named(tmp_path, monkeypatch):
    trackers = open_trackers(LogConfig(), {}, tmp_path, purge_step=0)
    assert not trackers
    trackers.log_scalars({"Loss/G/loss": 1.0}, 0)
    trackers.log_images("fakes", np.zeros([4, 4, 3], np.uint8), 0)
    trackers.finish()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(ImportError, match=r"log\.trackers=\['wandb'\].*log\.wandb=disabled"):
        open_trackers(LogConfig(trackers=["wandb"]), {}, tmp_path, purge_step=0)
    assert not (tmp_path / WANDB_ID_FILE).exists()
