"""The parity rule of fused ops vs the reference (check_ops and the self-checking dispatch share it)."""
import math

import torch

# The tolerance rule (see `compare`): errors are measured against a float64 truth computed from the same rounded
# inputs, in units of the dtype's eps times each element's magnitude ("eps units": 1 is one to two ulps there).
# The fused result passes when err <= max(K_REF * err of the reference path in the same dtype, ULPS[dtype]).
# In half precision the kernels compute in float and round once (0.5 eps units); in float32/float64 they compute in
# the dtype itself with the accurate libm (expf, tanhf: up to 2 ulps each, compounded in derivative formulas), hence
# a wider floor.
K_REF = 4.0
ULPS = {torch.float16: 4.0, torch.bfloat16: 4.0, torch.float32: 8.0, torch.float64: 8.0}
# Magnitudes below FLOOR x the tensor's RMS magnitude count as that floor (see `ulp_error`).
FLOOR = 1.0 / 16
# The dtype the reference runs in for the tolerance, where not the dtype itself (see `compare`).
REF_DTYPE = {torch.float64: torch.float32}


def ulp_error(out, truth, scale, dtype) -> float:
    """Max over elements of |out - truth| / (eps * max(|scale|, FLOOR * rms(scale))), in eps units (inf for NaN).
    The floor: entries far below the tensor's typical size come from cancellation (x + b ~ 0, 1 - tanh^2, taps of
    both signs), where only an absolute accuracy relative to the typical magnitude is meaningful."""
    if truth.numel() == 0:
        return 0.0
    s = scale.double().abs()
    floor = max(FLOOR * s.square().mean().sqrt().item(), torch.finfo(torch.float64).tiny)
    e = ((out.double() - truth.double()).abs() / s.clamp(min=floor)).max().item()
    return math.inf if math.isnan(e) else e / torch.finfo(dtype).eps


def compare(fused, ref, truth, scale, dtype, ref_dtype=None) -> dict:
    """The rule: ok when err(fused) <= max(K_REF * err(ref), ULPS). Why: the reference path in the same dtype
    shows the accuracy that PyTorch itself reaches for this op and data (several roundings in half precision,
    cancellation in some derivative formulas), and the fused kernel (math in float, one rounding) must be no
    worse than a small multiple of it; ULPS eps units of the magnitude is the floor every correct kernel meets (a
    one-ulp difference in float16 at |y| ~ 100 is 0.0625 absolute but under 1 eps unit), while a wrong tap, index
    or derivative is off by O(1) relative, i.e. 10^3 (bfloat16) to 10^15 (float64) eps units. For float64 the
    reference would be the truth itself, so its error is taken from a float32 run on the same
    (float32-representable) inputs, in float32 eps units: rounding errors scale with the unit roundoff, with the
    same constants for the same formulas."""
    err = ulp_error(fused, truth, scale, dtype)
    err_ref = ulp_error(ref, truth, scale, ref_dtype or dtype) if ref is not None else 0.0
    tol = max(K_REF * err_ref, ULPS.get(dtype, 8.0))
    max_abs = (fused.double() - truth.double()).abs().max().item() if truth.numel() else 0.0
    return {"err": err, "err_ref": err_ref, "tol": tol, "ok": err <= tol, "max_abs": max_abs}
