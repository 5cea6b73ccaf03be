#!/usr/bin/env bash
# Puts into .whl/ (git-ignored) the wheels that a bare GPU machine lacks for scripts/gpu_check.py and training:
# hydra-core, omegaconf and antlr4-python3-runtime (its image has Python 3.12, torch 2.11, accelerate, numpy, scipy,
# pillow, safetensors, tqdm, pyyaml, matplotlib, tensorboard, imageio, ninja, nvcc). Everything else ganforge
# imports on that path is there. Not there, and not needed by the check: wandb (log.trackers=[wandb] only) and
# imageio-ffmpeg (scripts/project.py's video): pass such names as arguments to fetch them too.
# The same as ../shared/gpu/wheels.sh, done here so that it also works in a git worktree (where .git is a file).
# Run it from anywhere, on a machine with PyPI; then carry .whl/ and run `make gpu-check` there (see docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
for p in hydra-core==1.3.8 'omegaconf>=2.3,<2.4' "$@"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dest" "$p"
done
# antlr4-python3-runtime 4.9.x (omegaconf's parser) is published as source only: build its pure-Python wheel here.
python3 -m pip wheel -q --no-deps -w "$dest" 'antlr4-python3-runtime==4.9.3'
ls -1 "$dest"
