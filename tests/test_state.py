"""TrainState: a symmetric save/load round trip with every field compared, and states written by earlier versions."""
import dataclasses
import json
import shutil

import pytest
import torch

from helpers import ROOT, assert_same, run_train
from networks.factory import build_networks
from training.config import AugConfig, ModelConfig, ScheduleConfig, TrainConfig
from training.augment import make_adaptive_p, make_augment_pipe
from training.loss import StyleGAN2Loss
from training.phases import make_phases
from training.schedule import make_schedule
from training.errors import ResumeError
from training.state import Counters, TrainState

# A training state written by ganforge at commit d85b71e, with the overrides below.
LEGACY = ROOT / "tests/data/training-state-d85b71e.pt"
LEGACY_ARGS = ["model=tiny", "train=test", "log.progress=false", "data.resolution=16", "data.num_images=64",
               "model.channel_base=64", "model.channel_max=8", "model.z_dim=8", "model.w_dim=8", "model.map_layers=1",
               "metrics=none", "train.ops_impl=ref", "aug=ada", "aug.p=0.1", "train.cpu_threads=1",
               "train.tick_kimg=0.008"]


# A TrainState for `config` (a plain config dict, as stored in training states; `requested`: the config as asked for,
# default the same) at `resolution` px: networks from `seed`, phases, loss, ADA; with `schedule` (a ScheduleConfig),
# progressive networks and that schedule.
def make_state(config: dict, seed: int, schedule=None, resolution: int = 16, requested=None) -> TrainState:
    model, train = ModelConfig(**config["model"]), TrainConfig(**config["train"])
    aug = AugConfig(**{k: v for k, v in config["aug"].items() if k in {f.name for f in dataclasses.fields(AugConfig)}})
    torch.manual_seed(seed)
    G, D, G_ema = build_networks(model, resolution, 3, 0, grow=schedule is not None)
    loss = StyleGAN2Loss(G, D, r1_gamma=train.r1_gamma, pl_weight=train.pl_weight)
    phases = make_phases(G, D, train, use_pl=train.pl_weight != 0, use_r1=loss.has_d_reg)
    pipe = make_augment_pipe(aug)
    ada = make_adaptive_p(aug, pipe, batch_size=train.batch_size)
    return TrainState(G, D, G_ema, phases, loss, pipe, ada, None, config=config, requested=requested or config,
                      schedule=make_schedule(schedule, resolution, train) if schedule is not None else None)


# A training state written by main at commit 92f0dc8 (the training core before training/run.py, ADA in
# training/data/, the stage held by TrainState), half-way through the fade-in of 16 px with ADA's p at 0.016.
PREVIOUS = ROOT / "tests/data/training-state-92f0dc8.pt"
PREVIOUS_ARGS = ["model=tiny", "train=test", "log.progress=false", "model.channel_base=64", "model.channel_max=8",
                 "model.z_dim=8", "model.w_dim=8", "model.map_layers=1", "data.num_images=64", "metrics=none",
                 "train.ops_impl=ref", "train.cpu_threads=1", "train.tick_kimg=0.016", "aug=ada", "aug.ada_kimg=1",
                 "aug.ada_interval=2", "data.max_size=32", "schedule=prog32", "schedule.boundaries_kimg=[0.032,0.064]",
                 "schedule.fade_kimg=0.032", "schedule.batch_size=[16,8,8]", "aug.ada_target=0.2"]


# The legacy state's config, for building a matching TrainState.
@pytest.fixture(scope="module")
def legacy():
    return torch.load(LEGACY, map_location="cpu", weights_only=True)


# state_dict -> load_state_dict -> state_dict gives back every field: networks, both Adams (after real steps),
# counters, path-length mean, ADA's p, r_t and pending statistic, the pipe's buffer, the stage, the timing, the
# config; the RNG state saved for this rank comes back as the one to start from. A state from other weights loads
# over it. The schedule puts 16 px at fade 0.5 at 1234 images (8 px, then 16 px from 1000 images over 468).
def test_train_state_round_trip(legacy):
    config = json.loads(legacy["config"])
    schedule = ScheduleConfig(enabled=True, start_res=8, boundaries_kimg=[1.0], fade_kimg=0.468)
    a = make_state(config, seed=1, schedule=schedule)
    for ph in a.phases:  # real optimizer state: one Adam step on every parameter
        for p in ph.module.parameters():
            p.grad = torch.randn_like(p)
        ph.opt.step()
    a.counters = Counters(cur_nimg=1234, cur_tick=5, batch_idx=77, tick_start_nimg=1000, skipped_steps=2,
                          sampler_pos=616, metrics_nimg=800, nonfinite_streak=1)
    a.loss.pl_mean.fill_(0.375)
    a.ada.accumulate(torch.tensor([1.0, -2.0, 3.0]))
    a.ada.update(3.0, 4)
    a.ada.accumulate(torch.tensor([0.5, 0.25]))
    for net in a.nets.values():
        net.set_stage(16, 0.5)
    a.timing = {"total_sec": 123.5, "tick_sec": 4.25}
    saved = a.state_dict()
    assert {"G", "D", "G_ema", "opt", "phases", "counters", "pl_mean", "rng", "fingerprints", "world_size", "config",
            "config_requested", "augment_pipe", "ada", "stage", "timing", "format", "version"} == set(saved)

    b = make_state(config, seed=2, schedule=schedule)
    for net in b.nets.values():
        net.set_stage(8, 1.0)
    assert not torch.equal(next(b.G.parameters()), next(a.G.parameters()))
    b.load_state_dict(saved, "round trip")
    again = b.state_dict()
    assert_same(b.rng, saved["rng"][0], "rng")
    saved.pop("rng"), again.pop("rng")  # the RNG of the moment, not a field that loads into the networks
    assert assert_same(saved, again) > 50
    assert b.counters == a.counters and b.ada.p == a.ada.p and b.stage == a.stage and b.timing == a.timing
    assert a.stage == {"resolution": 16, "alpha": 0.5} and all(n.stage == (16, 0.5) for n in b.nets.values())


# A state whose networks do not match the model, or which lacks a field, is refused naming the file and the part.
def test_train_state_refuses_mismatches(legacy):
    config = json.loads(legacy["config"])
    saved = make_state(config, seed=1).state_dict()
    wider = dict(config, model=dict(config["model"], channel_max=16))
    # The config diff is checked first (the state's owner refuses a change of what is trained, naming the key) ...
    with pytest.raises(ResumeError, match=r"(?s)x.pt: the config differs .*model.channel_max: 8 → 16"):
        make_state(wider, seed=1).load_state_dict(saved, "x.pt")
    # ... and networks that do not fit the file are refused naming the keys, whatever the config says.
    mismatched = make_state(wider, seed=1)
    mismatched.config = mismatched.requested = config
    with pytest.raises(ResumeError, match=r"x.pt: G: .*mis-shaped keys \[synthesis.b4.const: file \(8, 4, 4\) vs network \(16, 4, 4\)"):
        mismatched.load_state_dict(saved, "x.pt")
    with pytest.raises(ResumeError, match=r"x.pt: not a ganforge training state \(no pl_mean\)"):
        make_state(config, seed=1).load_state_dict({k: v for k, v in saved.items() if k != "pl_mean"}, "x.pt")
    tampered = dict(saved, fingerprints=[{**saved["fingerprints"][0], "D": "0" * 64}])
    with pytest.raises(ResumeError, match="x.pt: the loaded D do not reproduce"):
        make_state(config, seed=1).load_state_dict(tampered, "x.pt")


# A training state written by ganforge at commit d85b71e loads field by field, and saving it
# again gives back every field it had.
def test_loads_a_state_written_by_an_earlier_version(legacy):
    state = make_state(json.loads(legacy["config"]), seed=3)
    state.load_state_dict(legacy, LEGACY.name)
    assert state.counters == Counters(**legacy["counters"])
    assert state.ada.p == legacy["ada"]["p"] and float(state.loss.pl_mean) == float(legacy["pl_mean"])
    again = state.state_dict()
    for key in ("G", "D", "G_ema", "opt", "counters", "pl_mean", "augment_pipe", "ada", "world_size", "phases",
                "fingerprints"):
        assert_same(again[key], legacy[key], key)
    assert json.loads(again["config"]) == json.loads(legacy["config"])


# The training script continues a run from `state_file` (copied into run_dir=run) with `args` to `kimg`; returns the
# output and the final training state.
def continue_run(tmp_path, state_file, args, kimg):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(state_file, run / "training-state-000000.pt")
    proc = run_train([*args, f"train.kimg={kimg}", "run_dir=run"], tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, torch.load(run / "training-state-000000.pt", weights_only=True)


# ... and the training script continues that run from it.
def test_training_resumes_from_an_earlier_version(tmp_path):
    out, final = continue_run(tmp_path, LEGACY, LEGACY_ARGS, 0.032)
    assert "Resuming from run/training-state-000000.pt at 0.016 kimg" in out
    assert final["counters"]["cur_nimg"] == 32 and final["format"] == "ganforge-training-state"


# The state of the previous layout loads field by field: the networks go to its stage, p is the exact host value
# (not the pipe's float32 buffer), and saving it again gives back every field it had.
def test_loads_a_state_of_the_previous_layout():
    previous = torch.load(PREVIOUS, map_location="cpu", weights_only=True)
    config = json.loads(previous["config"])
    state = make_state(config, seed=3, schedule=ScheduleConfig(**config["schedule"]), resolution=32,
                       requested=json.loads(previous["config_requested"]))
    state.load_state_dict(previous, PREVIOUS.name)
    assert state.counters == Counters(**previous["counters"]) and state.stage == {"resolution": 16, "alpha": 0.5}
    assert all(net.stage == (16, 0.5) for net in state.nets.values())
    assert state.ada.p == previous["ada"]["p"] == 0.016 and float(state.augment_pipe.p) != 0.016
    again = state.state_dict()
    previous.pop("rng"), again.pop("rng")
    for key in ("sha256", "best_metrics"):  # the file's own checksum; the run directory's records
        previous.pop(key)
    assert set(again) == set(previous) and assert_same(again, previous) > 100


# ... and the training script continues it to the end of the schedule's last fade.
def test_training_continues_a_state_of_the_previous_layout(tmp_path):
    out, final = continue_run(tmp_path, PREVIOUS, PREVIOUS_ARGS, 0.08)
    assert "Resuming from run/training-state-000000.pt at 0.048 kimg" in out and "Stage 2: 32 px from 0.064 kimg" in out
    assert final["counters"]["cur_nimg"] == 80 and final["stage"] == {"resolution": 32, "alpha": 0.5}
    assert final["ada"]["p"] == pytest.approx(float(final["augment_pipe"]["p"]), rel=1e-6)
