"""Convert an official StyleGAN2-ADA / StyleGAN3 (StyleGAN2 networks) pickle into a ganforge snapshot, safely."""
import argparse
import json
import os

from training.errors import UserError, report, run_cli
from training.io import official
from training.io.checkpoint import save_snapshot


def convert(in_pkl, out_path) -> dict:
    """Convert an official pickle into a ganforge snapshot at `out_path` (training.io.checkpoint.save_snapshot).

    Returns official.build_networks()'s result, so that callers can report the config and any renamed keys.
    """
    nets = official.build_networks(in_pkl)
    # The snapshot stores the config as JSON: numpy arrays (e.g. in training_set_kwargs) become lists.
    config = json.loads(json.dumps(nets['config'], default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o)))
    save_snapshot(out_path, nets['G'], nets['D'], nets['G_ema'], config)
    return nets


def main(argv=None):
    """Command-line entry point: 0 on success; a refused or invalid file gives one `error:` line and 2 (a failed
    write: 1)."""
    parser = argparse.ArgumentParser(description='Convert an official network-snapshot-*.pkl into a ganforge '
                                                 'snapshot (.safetensors) without executing anything in the pickle.')
    parser.add_argument('in_pkl', help='official network pickle (stylegan2-ada-pytorch or stylegan3 StyleGAN2)')
    parser.add_argument('out', help='output ganforge snapshot path, e.g. network-snapshot-000000.safetensors')
    args = parser.parse_args(argv)
    try:
        if not os.path.isfile(args.in_pkl):
            raise UserError(f'input pickle not found: {args.in_pkl}')
        nets = convert(args.in_pkl, args.out)
    except UserError as e:
        return report(e)
    present = [k for k in ('G', 'D', 'G_ema') if nets[k] is not None]
    renamed = nets['config']['renamed']
    print(f'wrote {args.out}: {", ".join(present)}; renamed keys: '
          f'{", ".join(f"{a} -> {b}" for a, b in renamed.items()) if renamed else "none"}')
    return 0


if __name__ == '__main__':
    run_cli(main)
