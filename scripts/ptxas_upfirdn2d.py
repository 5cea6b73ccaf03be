"""Compiles ops/upfirdn2d.cu with nvcc -Xptxas -v per arch: warnings, each kernel's registers, smem and spills."""
import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from torch.utils import cpp_extension

from ops import _build

ROOT = Path(__file__).resolve().parent.parent

# Device flags: torch's own (half operators off, relaxed constexpr) and the build's, without fast math.
FLAGS = ["-O3", "-std=c++20", "-DGF_WITH_CUDA", "-Xcompiler", "-fPIC", "-Xptxas", "-v,-warn-spills,-warn-lmem-usage",
         *cpp_extension.COMMON_NVCC_FLAGS]


def compile_report(arch: str, cuda_home: str, extra=()):
    """nvcc's output for sm_<arch>: (warning lines, rows of kernel, registers, smem bytes, stack, spill st/ld)."""
    inc = cpp_extension.include_paths("cuda") + [str(ROOT / "ops"), sysconfig.get_paths()["include"]]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [os.path.join(cuda_home, "bin", "nvcc"), "-c", str(ROOT / "ops" / "upfirdn2d.cu"), "-o",
               os.path.join(tmp, "u.o"), f"-gencode=arch=compute_{arch},code=sm_{arch}", *FLAGS, *extra,
               *[f"-I{p}" for p in inc]]
        out = subprocess.run(cmd, capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise SystemExit(f"error: nvcc failed for sm_{arch}:\n{text[-3000:]}")
    warnings = [ln for ln in text.splitlines() if "warning" in ln.lower()]
    rows, name = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            stack, st, ld = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            smem = re.search(r"(\d+) bytes smem", line)
            rows.append((name, int(m.group(1)), int(smem.group(1)) if smem else 0, stack, st, ld))
            name = None
    return warnings, rows


def pretty(mangled: str) -> str:
    """A short readable kernel name: the tiled variant's template arguments, or the general kernel's types."""
    filt = shutil.which("c++filt")
    name = subprocess.run([filt, mangled], capture_output=True, text=True).stdout.strip() if filt else mangled
    m = re.search(r"GfUfdTiled<([^>]*)>", name)
    if m:
        t, up, down, f, sep, cl = [a.strip() for a in m.group(1).split(",")]
        t = t.replace("c10::", "")
        kind = f"{'sep' if sep == 'true' else '2-D'} {'CL' if cl == 'true' else 'NCHW'}"
        return f"tiled {t} up{up} down{down} {f}-tap {kind}"
    m = re.search(r"upfirdn2d_general_kernel<([^>]*)>", name)
    return f"general {m.group(1).replace('c10::', '')}" if m else name[:80]


def main(argv=None):
    """Compile for each arch and print the table; 1 if nvcc warned or any kernel spills."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", nargs="+", default=["80", "90"], help="compute capabilities, e.g. 80 90")
    args = parser.parse_args(argv)
    cuda_home = _build.find_cuda_home()
    if cuda_home is None:
        raise SystemExit("error: no CUDA toolkit found (set CUDA_HOME)")
    bad = False
    for arch in args.arch:
        warnings, rows = compile_report(arch, cuda_home)
        print(f"sm_{arch}: {len(rows)} kernels, {len(warnings)} warnings")
        for w in warnings:
            print(f"  {w}")
        print(f"  {'kernel':44s} {'regs':>4s} {'smem B':>7s} {'stack':>5s} {'spill st/ld':>11s}")
        for name, regs, smem, stack, st, ld in sorted(rows, key=lambda r: pretty(r[0])):
            print(f"  {pretty(name):44s} {regs:4d} {smem:7d} {stack:5d} {st:5d}/{ld:<5d}")
        bad |= bool(warnings) or any(r[4] or r[5] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
