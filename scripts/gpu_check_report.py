"""The readable report of scripts/gpu_check.py (gpu-check.md): every section in plan order, cut to fit a size."""

# The markdown's size limit in characters (the JSON beside it holds every row).
MD_LIMIT = 12000


# A markdown table from rows (dicts) and (header, key or function) columns; floats to 3 significant digits.
def table(rows, columns) -> list:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for _, col in columns:
            v = col(r) if callable(col) else r.get(col)
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v if v is not None else ""))
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return lines


def parity_summary(rows) -> list:
    """Parity rows grouped by (op, dtype, layout, order): checks run, failures, the worst err with its tol and case,
    and a status ('complete' when every check of the group ran and passed, else the first reason)."""
    groups = {}
    for r in rows:
        g = groups.setdefault((r["op"], r["dtype"], r["layout"], r["order"]),
                              dict(op=r["op"], dtype=r["dtype"], layout=r["layout"], order=r["order"], checks=0,
                                   failed=0, err=None, tol=None, case="", status="complete"))
        if r["status"] != "complete" and g["status"] == "complete":
            g["status"] = r["status"][:120]
        if r["skipped"] is not None:
            continue
        g["checks"] += 1
        g["failed"] += 0 if r["ok"] else 1
        worse = g["err"] is None or (r["err"] or 0) / (r["tol"] or 1) > (g["err"] or 0) / (g["tol"] or 1)
        if r["err"] is not None and worse:
            g.update(err=r["err"], tol=r["tol"], case=r["case"])
    return list(groups.values())


def _status(r) -> str:
    return r.get("status", "")


PARITY_COLS = [("op", "op"), ("dtype", "dtype"), ("layout", "layout"), ("order", "order"), ("checks", "checks"),
               ("failed", "failed"), ("worst err", "err"), ("tol", "tol"), ("worst case", "case"),
               ("status", _status)]
SPEED_COLS = [("group", "group"), ("case", "case"), ("dtype", "dtype"), ("layout", "layout"), ("shape", "shape"),
              ("fwd ref/fused ms", lambda r: _pair(r, "fwd")), ("ratio", "ratio_fwd"),
              ("f+b ref/fused ms", lambda r: _pair(r, "fwd_bwd")), ("ratio", "ratio_fwd_bwd"),
              ("GB/s f+b", "gbps_fwd_bwd"), ("% peak f+b", "pct_peak_fwd_bwd"), ("status", _status)]
TRAIN_COLS = [("preset", "preset"), ("px", "run_resolution"), ("ops", "ops"), ("precision", "precision"),
              ("aug", "aug"), ("batch", lambda r: f"{r.get('batch', '')}/{r.get('batch_gpu', '')}"),
              ("budget s", "budget_s"), ("sec/kimg", "sec_per_kimg"), ("A100 sec/kimg", "nvidia_a100_sec_per_kimg"),
              ("target", "target_sec_per_kimg"), ("peak GB", "peak_mem_gb"), ("minibatches", "minibatches"),
              ("status", _status)]
# The columns of auto's decisions shown first, where ops.dispatch.decisions() gives them.
DECISION_COLS = ["op", "dtype", "layout", "variant", "grad", "impl", "reason", "ms_ref", "ms_fused", "err"]
STAGE_COLS = [("stage", "name"), ("budget s", "budget_s"), ("took s", "seconds"), ("status", _status)]


# 'ref / fused' ms of one mode, or empty.
def _pair(r, mode) -> str:
    a, b = r.get(f"ms_ref_{mode}"), r.get(f"ms_fused_{mode}")
    return "" if a is None or b is None else f"{a:.3g} / {b:.3g}"


def _section(title, note, lines, rows_left_out=0) -> list:
    out = ["", f"## {title}", ""] + ([note, ""] if note else []) + lines
    if rows_left_out:
        out.append(f"\n({rows_left_out} more rows in gpu-check.json)")
    return out


def markdown(report: dict, limit: int = MD_LIMIT) -> str:
    """The report in markdown, at most `limit` characters: the op-speed table (the longest) keeps as many rows from
    its start as fit, then, if need be, the parity table; each says how many rows are in the JSON only."""
    speed = report.get("op_speed") or []
    par = parity_summary(report.get("parity") or [])
    render = lambda k_par, k_speed: _render(report, par[:k_par], len(par) - k_par,  # noqa: E731
                                            speed[:k_speed], len(speed) - k_speed)
    md = render(len(par), len(speed))
    if len(md) <= limit:
        return md
    if len(render(len(par), 0)) <= limit:
        return render(len(par), _most_that_fit(lambda k: len(render(len(par), k)) <= limit, len(speed)))
    return render(_most_that_fit(lambda k: len(render(k, 0)) <= limit, len(par)), 0)[:limit]


# The largest k in [0, n] with fits(k) (fits is monotone: true up to some k), by bisection.
def _most_that_fit(fits, n: int) -> int:
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _render(report, par, par_left, speed, speed_left) -> str:
    env = report.get("env") or {}
    out = ["# ganforge GPU check", "",
           f"Command: `{report.get('command')}`; budget {report.get('budget_s'):.0f} s, took "
           f"{report.get('total_s', 0):.0f} s; result: **{'PASS' if report.get('ok') else 'FAIL'}**"]
    out += _section("Plan (in order; each stage's share of what was left)", "", table(report.get("stages", []),
                                                                                      STAGE_COLS))
    out += _section("Environment and op builds", "", [f"- {k}: {v}" for k, v in env.items()
                                                      if k not in ("op_builds", "ok", "status")] +
                    [f"- op build {op}: {v}" for op, v in env.get("op_builds", {}).items()])
    out += _section("Op parity", "Against a float64 truth; err and tol in eps units of each dtype (check_ops).",
                    table(par, PARITY_COLS), par_left)
    out += _section("Op speed", "Training's shapes; best-of-N ms, ratio = reference / fused; GB/s of the op's "
                    "minimal traffic; % of the device's peak bandwidth (" +
                    str((speed[0] if speed else {}).get("peak_source", "")) + ").", table(speed, SPEED_COLS),
                    speed_left)
    auto = report.get("auto_decisions") or {}
    rows = auto.get("rows") or []
    keys = list(dict.fromkeys([k for k in DECISION_COLS if any(k in r for r in rows)] +
                              [k for r in rows for k in r]))[:10]
    out += _section("ops_impl=auto decisions", f"Status: {auto.get('status', 'not run')}.",
                    table(rows[:40], [(k, k) for k in keys]) if rows else [])
    out += _section("Training speed", "Timed runs with aug=fixed aug.p=0.2; reference rows last, none at 1024 px.",
                    table(report.get("training") or [], TRAIN_COLS))
    syncs = report.get("syncs") or {}
    lines = [f"- status: {syncs.get('status', 'not run')}"]
    if syncs.get("status") == "complete":
        lines += [f"- Python-level: {syncs['reads']} reads, {syncs['copies']} host-to-tensor copies (target "
                  f"{syncs['target']}): {'ok' if syncs['ok'] else 'FAIL'}",
                  "- CUDA sync debug mode: " + (f"{syncs['cuda_syncs']} synchronizing calls"
                                                 if syncs.get("cuda_syncs") is not None else "not on this device")]
        lines += [f"  - {m[:200]}" for m in syncs.get("cuda_messages", [])]
    out += _section("Host syncs per minibatch (every phase due, ADA p = 0.5)", "", lines)
    big = report.get("large") or []
    out += _section("Tensors over 2^31 elements", "", table(big, [("op", "op"), ("case", "case"), ("order", "order"),
                                                                  ("err", "err"), ("tol", "tol"),
                                                                  ("status", _status)]))
    return "\n".join(out) + "\n"
