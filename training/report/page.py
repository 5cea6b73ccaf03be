"""The run report: a self-contained page (report.html, plots in report/) made from the files of a run directory."""
import html
import json
import math
import re
import time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from training.io.files import atomic_open, atomic_write  # noqa: E402
from training.io.records import (metric_files, metric_label, metric_stem, read_jsonl, read_stats,  # noqa: E402
                                 stats_path)

# The page, and the folder of its plots (both inside the run directory; the page refers to them by relative paths).
REPORT_NAME = "report.html"
PLOT_DIR = "report"
# Plot size (inches) and resolution: light enough that a report of ~100 ticks takes well under a second or two.
FIGSIZE, DPI = (6, 3.2), 90
# Image grids written by the training loop: fakes<kimg, 6 digits>.png over time, and reals.png once.
FAKES_RE = re.compile(r"^fakes(\d{6})\.png$")
# The stats plots: (file stem, title, [(stats key, legend label)], log y-scale when every value is positive).
STATS_PLOTS = [
    ("losses", "Losses", [("Loss/G/loss", "G"), ("Loss/D/loss_real", "D real"), ("Loss/D/loss_fake", "D fake")],
     False),
    ("penalties", "Regularization", [("Loss/r1_penalty", "R1 penalty"), ("Loss/pl_penalty", "path-length penalty")],
     True),
    ("speed", "Speed", [("Timing/sec_per_kimg", "sec/kimg")], False),
    ("augment", "Augmentation", [("Progress/augment_p", "augment p"), ("Progress/ada_rt", "ADA r_t")], False),
    ("diversity", "Diversity", [("Health/diversity_fake", "fakes"), ("Health/diversity_real", "reals")], False),
]
# Loss/* keys drawn by a plot of their own; any other numeric Loss/* key joins the losses plot.
PLOTTED_KEYS = {key for _, _, lines, _ in STATS_PLOTS for key, _ in lines}
# The page's style and the grid slider's script (inline: the page needs no server and no network).
CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1300px; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ccc; }
.summary span { margin-right: 1.5em; } .muted { color: #777; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f3f3f3; text-align: left; }
img.plot { width: 540px; max-width: 100%; margin: 4px; border: 1px solid #eee; }
.grids { display: flex; flex-wrap: wrap; gap: 1em; } .grids figure { margin: 0; }
img.grid { width: 520px; max-width: 100%; image-rendering: pixelated; border: 1px solid #ccc; }
#grid-slider { width: 400px; vertical-align: middle; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.warn { color: #a40; font-weight: bold; }
"""
SLIDER_JS = """
(function () {
  var grids = JSON.parse(document.getElementById("grid-data").textContent);
  var slider = document.getElementById("grid-slider");
  var img = document.getElementById("grid-image"), label = document.getElementById("grid-label");
  slider.addEventListener("input", function () {
    var g = grids[Number(slider.value)];
    img.src = g.src;
    label.textContent = "fakes at " + g.kimg + " kimg (" + (Number(slider.value) + 1) + " of " + grids.length + ")";
  });
})();
"""


# A finite int or float (not a bool), i.e. something a plot can draw.
def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The (kimg, value) points of `key` over the stats rows that have both as numbers.
def series(rows: list, key: str) -> tuple:
    points = [(r["Progress/kimg"], r[key]) for r in rows if _number(r.get("Progress/kimg")) and _number(r.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


# The progressive stages in the stats: [(stage index, resolution, kimg of its first line)], in order of appearance.
def stages_of(rows: list) -> list:
    out = []
    for r in rows:
        if "Progress/stage" in r and _number(r.get("Progress/kimg")) and (not out or out[-1][0] != r["Progress/stage"]):
            out.append((r["Progress/stage"], r.get("Progress/resolution"), r["Progress/kimg"]))
    return out


# One health warning dict checked: kind, quantity and message as strings; `where` names its origin in errors.
def _checked_warning(w, where: str) -> dict:
    if not isinstance(w, dict) or not isinstance(w.get("kind"), str):
        raise ValueError(f"{where}: expected a health warning {{\"kind\": str, \"quantity\": str, \"message\": str}}, "
                         f"got {w!r}")
    return {"kind": w["kind"], "quantity": str(w.get("quantity", "")), "message": str(w.get("message", ""))}


# The warnings to list: `given` (the caller's) or else every Health/warnings entry of the stats; one entry per kind
# (its newest text) with the kimg of the first and last tick where it occurred and the number of such ticks.
def collect_warnings(rows: list, given, stats_path: Path) -> list:
    seen = {}  # kind -> [first kimg, last kimg, ticks]
    newest = {}
    for number, r in enumerate(rows, 1):
        entries = r.get("Health/warnings") or []
        if not isinstance(entries, list):
            raise ValueError(f"{stats_path}: record {number}: Health/warnings must be a list, got {entries!r}")
        kimg = r.get("Progress/kimg")
        for w in entries:
            w = _checked_warning(w, f"{stats_path}: record {number}: Health/warnings")
            newest[w["kind"]] = w
        for kind in {w["kind"] for w in entries}:  # (a tick counts once per kind)
            span = seen.setdefault(kind, [kimg, kimg, 0])
            span[1], span[2] = kimg, span[2] + 1
    if given is not None:
        newest = {}
        for i, w in enumerate(given):
            w = _checked_warning(w, f"write_run_report: warnings[{i}]")
            newest[w["kind"]] = w
    out = []
    for kind, w in newest.items():
        first, last, ticks = seen.get(kind, (None, None, None))
        out.append(dict(w, first=first, last=last, ticks=ticks))
    return out


# The records of each metric-<name>.jsonl (metric-<name>-best.json files are not jsonl and not read): {name: rows}.
def read_metrics(run_dir: Path) -> dict:
    out = {}
    for name, path in metric_files(run_dir):
        rows = read_jsonl(path)
        for number, r in enumerate(rows, 1):
            missing = [k for k in ("metric", "value", "kimg") if k not in r]
            if missing:
                raise ValueError(f"{path}: record {number}: missing key(s) {', '.join(missing)}; expected at least "
                                 f"metric, value and kimg")
        if rows:
            out[name] = rows
    return out


# The ADA target of the run's config (aug.ada_target), or None without one (or without a readable config).
def ada_target(config_text) -> float:
    try:
        config = yaml.safe_load(config_text) if config_text else None
    except yaml.YAMLError:
        return None
    aug = config.get("aug") if isinstance(config, dict) else None
    value = aug.get("ada_target") if isinstance(aug, dict) else None
    return value if _number(value) else None


# Draw one plot and write it atomically as <out_dir>/<stem>.png: `lines` is [(xs, ys, label, style kwargs)],
# `stage_kimgs` the kimg of each stage change (dotted vertical lines), `hline` a (y, label) dashed reference line.
def save_plot(out_dir: Path, stem: str, title: str, lines: list, stage_kimgs=(), log=False, hline=None) -> str:
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    try:
        for xs, ys, label, style in lines:
            ax.plot(xs, ys, label=label, **{"linewidth": 1.2, **style})
        xs_all = [x for xs, _, _, _ in lines for x in xs]
        for k in [k for k in stage_kimgs if min(xs_all) < k <= max(xs_all)]:  # (not stretching the axis)
            ax.axvline(k, color="#999", linestyle=":", linewidth=1)
        if hline is not None:
            ax.axhline(hline[0], color="#c33", linestyle="--", linewidth=1, label=hline[1])
        if log and all(y > 0 for _, ys, _, _ in lines for y in ys):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("kimg", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.subplots_adjust(left=0.14, right=0.98, top=0.9, bottom=0.15)
        name = f"{stem}.png"
        with atomic_open(out_dir / name) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    return f"{PLOT_DIR}/{name}"


# The stats plots that have data, as relative image paths (see STATS_PLOTS; other Loss/* keys join the losses plot).
def stats_plots(rows: list, out_dir: Path, stage_kimgs: list, target) -> list:
    extra = sorted({k for r in rows for k, v in r.items()
                    if k.startswith("Loss/") and k not in PLOTTED_KEYS and _number(v)})
    out = []
    for stem, title, keys, log in STATS_PLOTS:
        if stem == "losses":
            keys = keys + [(k, k[len("Loss/"):]) for k in extra]
        lines = [(*series(rows, key), label, {}) for key, label in keys]
        if stem == "speed":  # tick 0 has no duration: its 0 sec/kimg is no measurement
            lines = [([x for x, y in zip(xs, ys) if y > 0], [y for y in ys if y > 0], label, style)
                     for xs, ys, label, style in lines]
        lines = [line for line in lines if line[0]]
        if lines:
            hline = (target, f"ADA target {target:g}") if stem == "augment" and target is not None else None
            out.append(save_plot(out_dir, stem, title, lines, stage_kimgs, log, hline))
    return out


# One plot per metric file: a line per label (full resolution, each lower stage resolution) and, for metrics with
# per-level values (SWD), a dashed line per level. Returns the relative image paths.
def metric_plots(metrics: dict, out_dir: Path, stage_kimgs: list) -> list:
    out = []
    for name, rows in metrics.items():
        lines = {}
        for r in rows:
            if not (_number(r["kimg"]) and _number(r["value"])):
                continue
            lines.setdefault((metric_label(r), None), []).append((r["kimg"], r["value"]))
            for level, value in (r.get("levels") or {}).items():
                if _number(value):
                    lines.setdefault((metric_label(r), str(level)), []).append((r["kimg"], value))
        drawn = [([p[0] for p in pts], [p[1] for p in pts],
                  label if level is None else f"{label} level {level}px",
                  {"marker": "o", "markersize": 3} if level is None else
                  {"linestyle": "--", "linewidth": 0.9, "marker": ".", "markersize": 3})
                 for (label, level), pts in lines.items()]
        if drawn:
            stem = metric_stem(re.sub(r"[^A-Za-z0-9_.@-]", "_", name))
            out.append(save_plot(out_dir, stem, name, drawn, stage_kimgs))
    return out


# "1h 02m 03s" for a number of seconds.
def format_seconds(sec) -> str:
    sec = int(round(sec))
    h, m, s = sec // 3600, sec // 60 % 60, sec % 60
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{s}s"


# A value for display: numbers with 4 significant digits, anything else as text (escaped by the caller).
def format_value(value) -> str:
    return f"{value:.4g}" if _number(value) else str(value)


# The header: run name, latest kimg, total time and the newest value of each metric (per label).
def header_html(run_dir: Path, rows: list, metrics: dict) -> str:
    last = rows[-1] if rows else {}
    items = [f"<span>latest: <b>{html.escape(format_value(last.get('Progress/kimg', '–')))}</b> kimg</span>"]
    if _number(last.get("Timing/total_sec")):
        items.append(f"<span>total time: <b>{format_seconds(last['Timing/total_sec'])}</b></span>")
    newest = {}
    for rows_m in metrics.values():
        for r in rows_m:
            newest[metric_label(r)] = r
    for label, r in newest.items():
        items.append(f"<span>{html.escape(label)}: <b>{html.escape(format_value(r['value']))}</b> "
                     f"<span class=muted>at {html.escape(format_value(r['kimg']))} kimg</span></span>")
    made = time.strftime("%Y-%m-%d %H:%M:%S")
    return (f"<h1>Run {html.escape(run_dir.resolve().name)}</h1>\n<p class=muted>Report written {made} from "
            f"{html.escape(str(run_dir.resolve()))}</p>\n<p class=summary>{' '.join(items)}</p>\n")


# The health warnings section: a table of kinds with their tick span and message, or "No warnings".
def warnings_html(warnings: list) -> str:
    if not warnings:
        return "<h2>Health warnings</h2>\n<p id=warnings>No warnings.</p>\n"
    rows = "".join(
        f"<tr><td class=warn>{html.escape(w['kind'])}</td><td>{html.escape(w['quantity'])}</td>"
        f"<td>{html.escape(format_value(w['first']) if w['first'] is not None else '–')}</td>"
        f"<td>{html.escape(format_value(w['last']) if w['last'] is not None else '–')}</td>"
        f"<td>{w['ticks'] if w['ticks'] is not None else '–'}</td><td>{html.escape(w['message'])}</td></tr>\n"
        for w in warnings)
    return ("<h2>Health warnings</h2>\n<table id=warnings>\n<tr><th>kind</th><th>quantity</th><th>first kimg</th>"
            f"<th>last kimg</th><th>ticks</th><th>message</th></tr>\n{rows}</table>\n")


# The progressive stages table (nothing without stages in the stats).
def stages_html(stages: list) -> str:
    if not stages:
        return ""
    rows = "".join(f"<tr><td>{html.escape(format_value(i))}</td><td>{html.escape(format_value(res))}</td>"
                   f"<td>{html.escape(format_value(kimg))}</td></tr>\n" for i, res, kimg in stages)
    return ("<h2>Progressive stages</h2>\n<table id=stages>\n<tr><th>stage</th><th>resolution (px)</th>"
            f"<th>from kimg</th></tr>\n{rows}</table>\n")


# A section of plot images (nothing without plots).
def plots_html(title: str, paths: list) -> str:
    if not paths:
        return ""
    imgs = "\n".join(f'<img class="plot" src="{html.escape(p)}" alt="{html.escape(p)}">' for p in paths)
    return f"<h2>{html.escape(title)}</h2>\n<div>\n{imgs}\n</div>\n"


# The image grids: a slider over the fakes grids (newest first shown) beside reals.png; nothing without either.
def grids_html(fakes: list, has_reals: bool) -> str:
    if not fakes and not has_reals:
        return ""
    parts = []
    if fakes:
        data = json.dumps([{"src": name, "kimg": kimg} for kimg, name in fakes]).replace("</", "<\\/")
        kimg, name = fakes[-1]
        parts.append(
            f'<figure><div><input type="range" id="grid-slider" min="0" max="{len(fakes) - 1}" step="1" '
            f'value="{len(fakes) - 1}"> <span id="grid-label">fakes at {kimg} kimg ({len(fakes)} of {len(fakes)})'
            f'</span></div>\n<img class="grid" id="grid-image" src="{html.escape(name)}" alt="fakes">\n'
            f'<script type="application/json" id="grid-data">{data}</script>\n'
            f"<script>{SLIDER_JS}</script></figure>\n")
    if has_reals:
        parts.append('<figure><div>reals</div>\n<img class="grid" id="reals-image" src="reals.png" alt="reals">'
                     "</figure>\n")
    return f"<h2>Image grids</h2>\n<div class=grids>\n{''.join(parts)}</div>\n"


# The fakes grids of the run directory as [(kimg, file name)], oldest first.
def fakes_grids(run_dir: Path) -> list:
    found = [(int(m.group(1)), p.name) for p in run_dir.iterdir() if (m := FAKES_RE.match(p.name))]
    return sorted(found)


def write_run_report(run_dir, warnings=None) -> Path:
    """(Re)write <run_dir>/report.html and its plots (<run_dir>/report/*.png) from what the run directory holds.

    Reads stats.jsonl (loss, penalty, speed, augmentation and diversity plots, progressive stages, health warnings),
    metric-<name>.jsonl (one plot per metric), fakes<kimg>.png and reals.png (the grids, with a slider over time)
    and config.yaml (shown verbatim); whatever is missing is left out of the page. `warnings` (a list of
    {"kind", "quantity", "message"} dicts) replaces the stats' Health/warnings in the warnings list. The page needs
    no server and no network (inline style and script, images by relative paths); every file is written atomically
    and plots of earlier reports that this one no longer draws are removed. Returns the path of report.html.
    Raises FileNotFoundError for a missing run directory and ValueError, naming the file and line, for a malformed
    line of a jsonl file (but an unfinished last line, which a run may be writing, is skipped).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    rows = read_stats(run_dir)
    metrics = read_metrics(run_dir)
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    stages = stages_of(rows)
    stage_kimgs = [kimg for _, _, kimg in stages[1:]]

    out_dir = run_dir / PLOT_DIR
    out_dir.mkdir(exist_ok=True)
    plots = stats_plots(rows, out_dir, stage_kimgs, ada_target(config_text))
    mplots = metric_plots(metrics, out_dir, stage_kimgs)
    body = [header_html(run_dir, rows, metrics),
            warnings_html(collect_warnings(rows, warnings, stats_path(run_dir))),
            stages_html(stages),
            grids_html(fakes_grids(run_dir), (run_dir / "reals.png").is_file()),
            plots_html("Training", plots),
            plots_html("Metrics", mplots)]
    if config_text is not None:
        body.append(f"<h2>config.yaml</h2>\n<pre id=config>{html.escape(config_text)}</pre>\n")
    page = ("<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
            f"<title>Run report: {html.escape(run_dir.resolve().name)}</title>\n<style>{CSS}</style>\n</head>\n"
            f"<body>\n{''.join(body)}</body>\n</html>\n")
    path = run_dir / REPORT_NAME
    atomic_write(path, lambda f: f.write(page), mode="w")
    written = {Path(p).name for p in plots + mplots}
    for old in out_dir.glob("*.png"):
        if old.name not in written:
            old.unlink()
    return path


class ReportPage:
    """One run's report.html (write_run_report), rewritten by update() (rank 0): a failure is printed once per
    run and training goes on."""
    def __init__(self, run_dir: Path, pbar):
        self.run_dir, self.pbar, self.failed = run_dir, pbar, False

    def update(self) -> None:
        try:
            write_run_report(self.run_dir)
        except Exception as e:  # noqa: BLE001 - the page is a convenience, the run is not
            if not self.failed:
                self.failed = True
                (self.pbar.write if self.pbar is not None else print)(
                    f"Warning: report.html not written ({type(e).__name__}: {e}); training goes on")
