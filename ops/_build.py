"""Builds the fused-op extensions on first use (ninja), cached by a hash of sources, toolchain and flags, under a lock."""
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

# torch.utils.cpp_extension, imported without its "No CUDA runtime is found" log line (find_cuda_home finds the
# toolkit itself).
_logger = logging.getLogger("torch.utils.cpp_extension")
_level = _logger.level
_logger.setLevel(logging.ERROR)
try:
    from torch.utils import cpp_extension
finally:
    _logger.setLevel(_level)

# Directory of the op sources (ops/*.cpp, *.cu, *.h).
SRC_DIR = Path(__file__).resolve().parent

# Host and device compiler flags; part of the cache key. The CUDA flags keep IEEE math: no --use_fast_math (its
# tanh.approx.f32 is ~2^-11 relative, thousands of float32 ulps), no flush-to-zero and no approximate division: the
# kernels are bandwidth-bound, so accurate math costs no time, and check_ops' float32 bound (ops/tolerance.py) holds.
CFLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3", "-DGF_WITH_CUDA"]

# PTX instructions that only fast math emits (approximate tanh/sin/cos/log2, approximate and "full-range" fast
# division); CUDA's accurate libm never uses them (tests/test_ops_ptx.py checks the generated PTX).
FAST_MATH_PTX = ("tanh.approx", "sin.approx", "cos.approx", "lg2.approx", "div.approx", "div.full")

# Per-process results: loaded modules and failure reasons, by (name, cuda).
_modules = {}
_failures = {}


class BuildError(RuntimeError):
    """A build that could not happen or failed; the message says why (and where the log is)."""


def cache_root() -> Path:
    """Where builds are cached: $GANFORGE_OPS_CACHE or ~/.cache/ganforge/ops."""
    root = os.environ.get("GANFORGE_OPS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "ganforge" / "ops"


def reset_cache() -> None:
    """Forget loaded modules and failures (tests use it to rebuild or to re-trigger a failure)."""
    _modules.clear()
    _failures.clear()


# Whether $GANFORGE_OPS_FORCE_BUILD_FAILURE ('1'/'all' or a comma-separated list of op names) covers `name`.
def _forced_failure(name: str) -> bool:
    value = os.environ.get("GANFORGE_OPS_FORCE_BUILD_FAILURE", "").strip()
    if value in ("", "0"):
        return False
    return value in ("1", "all") or name in [v.strip() for v in value.split(",")]


def find_cuda_home():
    """The CUDA toolkit root that has a real nvcc and headers, or None. PyTorch's own guess takes the parent of
    the first `nvcc` on PATH, which is wrong for wrapper scripts (e.g. /usr/local/bin/nvcc -> /usr/local)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and (
                os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
                or list(Path(home).glob("targets/*/include/cuda_runtime.h"))):
            return home
    return None


# Make ninja findable when it is installed in this interpreter's environment but the venv is not activated.
def _ensure_ninja_on_path() -> None:
    if shutil.which("ninja"):
        return
    bindir = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(bindir, "ninja")):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


# Hash of everything that changes the binary: sources, headers, flags, toolchain and versions.
def _build_key(name, sources, cuda, cuda_home):
    h = hashlib.sha256()
    files = sorted(set(Path(s).resolve() for s in sources) | set(SRC_DIR.glob("*.h")))
    for path in files:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    # SRC_DIR too: the generated build.ninja names the sources by path, so two checkouts with equal sources must not
    # share a build folder (each would rewrite it and make ninja rebuild the other's).
    meta = [name, str(cuda), str(SRC_DIR), torch.__version__, str(torch.version.cuda), sys.version, sysconfig.get_platform(),
            " ".join(CFLAGS + LDFLAGS), os.environ.get("CXX", "")]
    if cuda:
        meta += [" ".join(CUDA_CFLAGS), cuda_home or "", os.environ.get("TORCH_CUDA_ARCH_LIST", "")]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.is_available():
            meta += [str(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
    h.update("\n".join(meta).encode())
    return h.hexdigest()


# The first compiler error line of a build log (for the one-line warning).
def _first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pattern in ("error:", "error"):
        for line in lines:
            if pattern in line.lower() and "error building extension" not in line.lower():
                return line[:300]
    return lines[-1][:300] if lines else "unknown error"


def load_extension(name: str, sources, cuda: bool):
    """Build (or load from the cache) extension `name` from `sources` (paths relative to ops/ or absolute); with
    `cuda`, the .cu sources are compiled by nvcc for the GPU present or $TORCH_CUDA_ARCH_LIST. Raises BuildError."""
    key = (name, bool(cuda))
    module = _modules.get(key)
    if module is not None:  # the per-call fast path
        return module
    if _forced_failure(name):
        raise BuildError("build failure forced by GANFORGE_OPS_FORCE_BUILD_FAILURE")
    if key in _failures:
        raise BuildError(_failures[key])
    try:
        module = _build(name, [str(SRC_DIR / s) for s in sources], cuda)
    except BuildError as e:
        _failures[key] = str(e)
        raise
    _modules[key] = module
    return module


# The uncached build: checks the toolchain, then torch.utils.cpp_extension.load under a file lock.
def _build(name, sources, cuda):
    _ensure_ninja_on_path()
    if not cpp_extension.is_ninja_available():
        raise BuildError("ninja is not installed or not on PATH (pip install ninja)")
    cuda_home = None
    if cuda:
        if torch.version.cuda is None:
            raise BuildError("this PyTorch build has no CUDA support")
        cuda_home = find_cuda_home()
        if cuda_home is None:
            raise BuildError("no CUDA toolkit found: nvcc is not on PATH and CUDA_HOME is unset or has no bin/nvcc")
        # cpp_extension reads its module-level CUDA_HOME (guessed at import); point it at the real toolkit.
        cpp_extension.CUDA_HOME = cuda_home
        os.environ["CUDA_HOME"] = cuda_home
    for s in sources:
        if not os.path.isfile(s):
            raise BuildError(f"source file missing: {s}")
    digest = _build_key(name, sources, cuda, cuda_home)
    module_name = f"gf_{name}_{'cuda' if cuda else 'cpu'}_{digest[:12]}"
    build_dir = cache_root() / module_name
    build_dir.mkdir(parents=True, exist_ok=True)
    log_path = build_dir / "build.log"
    with _file_lock(build_dir.with_suffix(".lock")):
        try:
            return cpp_extension.load(
                name=module_name, sources=sources, build_directory=str(build_dir), verbose=False,
                # Fresh lists: cpp_extension appends its own flags to the lists it is given.
                extra_cflags=CFLAGS + (["-DGF_WITH_CUDA"] if cuda else []), extra_ldflags=list(LDFLAGS),
                extra_cuda_cflags=list(CUDA_CFLAGS) if cuda else None, extra_include_paths=[str(SRC_DIR)],
                with_cuda=cuda)
        except Exception as e:  # compiler or linker error, missing headers, import failure
            log_path.write_text(f"{type(e).__name__}: {e}\n")
            raise BuildError(f"compiling {module_name} failed: {_first_error(str(e))} (full log: {log_path})") from e


# The C++ standard torch's extension builder passes to nvcc (c++20 in recent releases, c++17 before).
def _cuda_std():
    text = Path(cpp_extension.__file__).read_text()
    return "-std=c++20" if "-std=c++20" in text else "-std=c++17"


def compile_cuda(source: str, arch: str, what: str = "ptx", extra_flags=()) -> str:
    """Compile one .cu of ops/ for `arch` (e.g. 'sm_90') with the extension's CUDA flags (plus `extra_flags`) and
    return the PTX text (what='ptx') or ptxas' -v report of registers, shared memory and spills (what='ptxas').
    Cached under cache_root()/cuda by a hash of the sources and flags; raises BuildError without nvcc."""
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise BuildError("no CUDA toolkit found (nvcc)")
    incs = cpp_extension.include_paths("cuda") + [sysconfig.get_paths()["include"], str(SRC_DIR)]
    flags = list(CUDA_CFLAGS) + list(extra_flags) + [_cuda_std(), f"-arch={arch}", "-DTORCH_API_INCLUDE_EXTENSION_H",
                                                      "-DTORCH_EXTENSION_NAME=gf_probe"]
    flags += list(cpp_extension.COMMON_NVCC_FLAGS) + [f"-I{i}" for i in incs]
    src = SRC_DIR / source
    h = hashlib.sha256("\n".join(flags + [what, torch.__version__, cuda_home]).encode())
    for path in [src] + sorted(SRC_DIR.glob("*.h")):
        h.update(path.read_bytes())
    out_dir = cache_root() / "cuda"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = out_dir / f"{src.stem}_{arch}_{what}_{h.hexdigest()[:16]}.txt"
    if result.is_file():
        return result.read_text()
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    tmp = out_dir / f"{result.stem}.{os.getpid()}"
    if what == "ptx":
        cmd = [nvcc, "-ptx", str(src), "-o", str(tmp)] + flags
    else:
        cmd = [nvcc, "-cubin", str(src), "-o", str(tmp), "-Xptxas", "-v"] + flags
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"nvcc failed on {source} for {arch}: {_first_error(proc.stderr + proc.stdout)}")
    text = tmp.read_text() if what == "ptx" else proc.stderr + proc.stdout
    tmp.unlink(missing_ok=True)
    result.with_suffix(f".{os.getpid()}").write_text(text)
    os.replace(result.with_suffix(f".{os.getpid()}"), result)  # atomic: concurrent tests see whole files only
    return text


# An exclusive fcntl lock on `path`: concurrent ranks/processes on one machine build once, the others wait and then
# load the finished build.
@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
