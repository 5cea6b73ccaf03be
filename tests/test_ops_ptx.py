"""The CUDA kernels keep IEEE math: no fast-math flags, no fast-math-only PTX instructions (compiled here by nvcc)."""
import collections
import re

import pytest

from ops import _build

_NVCC = _build.find_cuda_home()
needs_nvcc = pytest.mark.skipif(_NVCC is None, reason="nvcc not found (no CUDA toolkit): cannot compile to PTX")

# PTX approximate instructions that CUDA's accurate libm does use, as building blocks after an exact range reduction
# (expf, tanhf: documented 2-ulp bounds; the double-precision division's first reciprocal). Every other .approx
# (and div.full) comes from fast math only.
ACCURATE_LIBM_APPROX = {"ex2.approx.ftz.f32", "ex2.approx.f32", "rcp.approx.ftz.f32", "rcp.approx.ftz.f64"}


def _entries(ptx: str) -> dict:
    """{kernel's mangled name: Counter of its .approx / div.full instructions} of a PTX file."""
    out = {}
    for part in re.split(r"\n\s*//\s*\.globl\s+", ptx)[1:]:
        name = part.split()[0]
        out[name] = collections.Counter(re.findall(r"\b([a-z0-9]+\.(?:approx|full)[.a-z0-9]*)", part))
    return out


# fp32 kernels: a (possibly namespaced) kernel template whose first template argument is float, e.g.
# _Z15bias_act_kernelIfLi3E... or _ZN12_GLOBAL__N_16kernelIfE...
def _is_fp32(name: str) -> bool:
    i = 3 if name.startswith("_ZN") else 2
    while i < len(name) and name[i].isdigit():
        j = i
        while name[j].isdigit():
            j += 1
        i = j + int(name[i:j])
    return name[i:i + 2] == "If"


def test_cuda_flags_have_no_fast_math():
    """No fast-math flag (or its parts: approximate division/sqrt, flush-to-zero) reaches nvcc."""
    flags = " ".join(_build.CUDA_CFLAGS)
    for bad in ("use_fast_math", "prec-div=false", "prec-sqrt=false", "ftz=true", "fmad=false"):
        assert bad not in flags, bad
    assert "-DGF_WITH_CUDA" in _build.CUDA_CFLAGS


@needs_nvcc
@pytest.mark.parametrize("source", ["bias_act.cu", "upfirdn2d.cu"])
def test_ptx_has_no_fast_math_instructions(source):
    """Every kernel of the source, compiled to PTX for sm_90 with the extension's flags, uses only accurate math:
    none of _build.FAST_MATH_PTX, and of the approximate instructions only those CUDA's accurate expf/tanhf (and
    double division) are made of; the fp32 kernels are there and checked too."""
    entries = _entries(_build.compile_cuda(source, "sm_90", "ptx"))
    assert entries, f"no kernels found in the PTX of {source}"
    assert any(_is_fp32(n) for n in entries), f"no float32 kernel found in {source}: {sorted(entries)[:4]}"
    for name, counts in entries.items():
        found = set(counts)
        assert not {i for i in found if i.startswith(_build.FAST_MATH_PTX)}, (name, counts)
        assert found <= ACCURATE_LIBM_APPROX, (name, counts)


@needs_nvcc
def test_ptx_check_detects_fast_math():
    """The same check on a --use_fast_math build of bias_act.cu finds tanh.approx.f32 in the float32 tanh kernel
    and fast division in the sigmoid one: the check above can fail."""
    entries = _entries(_build.compile_cuda("bias_act.cu", "sm_90", "ptx", ["--use_fast_math"]))
    fp32 = {n: c for n, c in entries.items() if _is_fp32(n)}
    assert any(c["tanh.approx.f32"] for c in fp32.values())
    assert any(i.startswith(("div.approx", "div.full")) for c in fp32.values() for i in c) or \
        any(c["rcp.approx.ftz.f32"] > 0 and not c["tanh.approx.f32"] for c in fp32.values())


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_bias_act_kernels_build_without_warnings_or_spills(arch):
    """ptxas -v on every bias_act kernel (9 activations x 4 dtypes x 2 walks x 2 vector widths): no warning, no
    register spill and no stack frame (the 16-byte packs and per-lane sums stay in registers)."""
    report = _build.compile_cuda("bias_act.cu", arch, "ptxas")
    entries = re.split(r"ptxas info\s*: Compiling entry function '", report)[1:]
    assert len(entries) == 144, len(entries)
    assert "warning" not in report.lower()
    for e in entries:
        props = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", e)
        assert props and props.groups() == ("0", "0", "0"), e[:300]
        assert int(re.search(r"Used (\d+) registers", e).group(1)) <= 64, e[:300]
