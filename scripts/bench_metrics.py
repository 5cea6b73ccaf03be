"""Throughput of Inception feature extraction (images/s) at 32 and 256 px input in each input convention (NVIDIA's
resize in NCHW as NVIDIA's network computes, clean-fid's PIL resize, pytorch-fid's in channels_last), against a plain
forward."""
import argparse
import time


import torch

from training.eval.inception import Detector, FIDInceptionV3


def throughput(cases, rounds: int) -> list:
    """Best images/s of each case over `rounds` interleaved timed calls (after one warm-up call each); interleaving and
    taking the best keeps the ratios meaningful on a machine shared with other jobs."""
    for fn, x in cases:
        fn(x)
    best = [0.0] * len(cases)
    for _ in range(rounds):
        for k, (fn, x) in enumerate(cases):
            t0 = time.perf_counter()
            fn(x)
            best[k] = max(best[k], x.shape[0] / (time.perf_counter() - t0))
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4, help="images per call")
    p.add_argument("--rounds", type=int, default=3,
                   help="timed calls per row, interleaved, after one warm-up call (the best is printed)")
    p.add_argument("--device", default="cpu", help="torch device to time on (cpu, cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    # Random weights: the cost does not depend on their values.
    det = Detector(FIDInceptionV3(), "state_dict", "random-weights", "0" * 64, dev)
    nv = Detector(FIDInceptionV3(), "nvidia_state_dict", "random-weights", "0" * 64, dev)
    g = torch.Generator().manual_seed(0)
    # Baseline: the same network on float pixels already at 299 px (no uint8 conversion, no resize).
    x299 = (torch.rand(args.batch, 3, 299, 299, generator=g) * 255).to(dev)
    names, cases = ["forward, float 299 px (baseline)"], [(lambda x: det.net(x), x299)]
    for res in (32, 256):
        img = torch.randint(0, 256, (args.batch, 3, res, res), dtype=torch.uint8, generator=g).to(dev)
        names.append(f"pytorch-fid: features(uint8 {res} px)")
        cases.append((det.features, img))
        for convention in nv.conventions:
            names.append(f"{convention}: features(uint8 {res} px)")
            cases.append((lambda x, c=convention: nv.features(x, convention=c), img))
    with torch.no_grad():
        ips = throughput(cases, args.rounds)
    base = ips[0]
    print(f"device={dev} threads={torch.get_num_threads()} batch={args.batch} rounds={args.rounds}")
    print(f"{'case':<44s} {'images/s':>10s} {'ratio':>7s}")
    for name, v in zip(names, ips):
        print(f"{name:<44s} {v:>10.2f} {v / base:>7.3f}")


if __name__ == "__main__":
    main()
