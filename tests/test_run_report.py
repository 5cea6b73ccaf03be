"""The run report (training/report/page.py, scripts/report.py): its page, plots and errors, in a headless browser."""
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import PIL.Image
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from training.io.files import temp_pattern
from training.report.page import write_run_report

ROOT = Path(__file__).resolve().parents[1]
# Debian's browser and driver, named explicitly so that Selenium Manager never looks for (or downloads) others.
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# The fake run: its fakes grids (kimg, colour), distinct solid colours so that each file differs.
FAKES = [(0, (200, 30, 30)), (40, (30, 160, 30)), (116, (30, 30, 200))]
# A config with markup in it (shown escaped) and the ADA target the augmentation plot draws.
CONFIG = "aug:\n  ada_target: 0.6\ndata:\n  path: /data/<tag>&co\n"
# The health warning some ticks carry, with markup in its message.
WARNING = {"kind": "d_overfit", "quantity": "Progress/ada_rt", "message": "D overfits: raise <aug.target> & retry"}
# A script for the browser: true once the page and every image on it finished loading.
ALL_LOADED = "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete);"


# Write a run directory into `path`: `ticks` stats lines (with a stage change at the middle and a warning on ticks
# 10-12), FID and SWD metric files (SWD with levels, one record at a lower stage), fakes grids, reals, config.
def make_run(path: Path, ticks: int = 30) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "stats.jsonl", "w") as f:
        for t in range(ticks):
            stage = 0 if t < ticks // 2 else 1
            row = {"Progress/tick": t, "Progress/kimg": 4.0 * t, "Timing/total_sec": 30.0 * t,
                   "Timing/sec_per_kimg": 7.5 + 0.1 * (t % 3), "Resources/peak_mem_gb": 1.5,
                   "Loss/G/loss": 2.0 - 0.02 * t, "Loss/D/loss_real": 0.5 + 0.01 * t, "Loss/D/loss_fake": 0.4,
                   "Loss/r1_penalty": 0.05 + 0.001 * t, "Loss/pl_penalty": 0.02, "Loss/pl_mean": 0.8,
                   "Loss/scores_real": 0.3, "Loss/scores_fake": -0.3, "Progress/augment_p": 0.01 * t,
                   "Progress/ada_rt": 0.5 + 0.005 * t, "Progress/stage": stage, "Progress/resolution": 16 << stage,
                   "Progress/fade": 1.0, "Progress/batch_size": 32, "Health/diversity_fake": 0.2 + 0.005 * t,
                   "Health/diversity_real": 0.4, "Health/warnings": [WARNING] if 10 <= t <= 12 else []}
            f.write(json.dumps(row) + "\n")
    fid = [{"metric": "fid50k_full", "value": 80.0 - k / 4, "kimg": k, "resolution": 32, "dataset_resolution": 32}
           for k in (40, 80, 116)]
    swd = [{"metric": "swd2k", "value": 9.0 - k / 40, "kimg": k, "resolution": 16 if k < 60 else 32,
            "dataset_resolution": 32, "levels": {"32": 10.0 - k / 40, "16": 8.0 - k / 40}} for k in (40, 80, 116)]
    for name, records in (("fid50k_full", fid), ("swd2k", swd)):
        (path / f"metric-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "metric-fid50k_full-best.json").write_text(json.dumps(fid[-1]))
    for kimg, colour in FAKES:
        PIL.Image.new("RGB", (64, 32), colour).save(path / f"fakes{kimg:06d}.png")
    PIL.Image.new("RGB", (64, 32), (128, 128, 128)).save(path / "reals.png")
    (path / "config.yaml").write_text(CONFIG)
    return path


# A check that the page is well formed (every non-void element closed in order) that keeps each tag's attributes.
class PageParser(HTMLParser):
    VOID = {"meta", "img", "input", "br", "hr", "link"}

    def __init__(self):
        super().__init__()
        self.tags, self.open = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def find(self, tag, **attrs):
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


# Parse report.html (asserting it is well formed).
def parse(page: Path) -> PageParser:
    parser = PageParser()
    parser.feed(page.read_text(encoding="utf-8"))
    parser.close()
    assert not parser.open, f"unclosed elements {parser.open}"
    return parser


# The page has every part: plots that exist as valid PNGs, the slider over the fakes (newest shown), the reals, the
# warnings with their spans and (escaped) messages, the stages, the metrics' newest values and the escaped config.
def test_report_page_has_every_part(tmp_path):
    run = make_run(tmp_path / "run-00001")
    page = write_run_report(run)
    assert page == run / "report.html"
    doc, text = parse(page), page.read_text(encoding="utf-8")
    plots = [a["src"] for a in doc.find("img", **{"class": "plot"})]
    assert sorted(plots) == sorted(f"report/{s}.png" for s in ("losses", "penalties", "speed", "augment",
                                                               "diversity", "metric-fid50k_full", "metric-swd2k"))
    for src in plots:
        with PIL.Image.open(run / src) as im:
            im.verify()
        with PIL.Image.open(run / src) as im:
            assert im.format == "PNG" and im.width > 0 and im.height > 0
    assert sorted(p.name for p in (run / "report").iterdir()) == sorted(Path(p).name for p in plots)
    slider = doc.find("input", id="grid-slider")[0]
    assert (slider["type"], slider["min"], slider["max"], slider["value"]) == ("range", "0", str(len(FAKES) - 1),
                                                                              str(len(FAKES) - 1))
    assert doc.find("img", id="grid-image")[0]["src"] == "fakes000116.png"
    assert doc.find("img", id="reals-image")[0]["src"] == "reals.png"
    assert {a["class"] for a in doc.find("img", id="grid-image") + doc.find("img", id="reals-image")} == {"grid"}
    assert "d_overfit" in text and "D overfits: raise &lt;aug.target&gt; &amp; retry" in text
    assert "<td>40</td><td>48</td><td>3</td>" in text  # first and last kimg of the warning, and its ticks.
    assert "<td>1</td><td>32</td><td>60</td>" in text  # stage 1, 32 px, from 60 kimg.
    assert "/data/&lt;tag&gt;&amp;co" in text and "<tag>" not in text
    assert "fid50k_full: <b>51</b>" in text and "swd2k: <b>6.1</b>" in text and "swd2k@16px" in text
    assert "116</b> kimg" in text and "14m 30s" in text
    assert "http://" not in text and "https://" not in text  # Self-contained: nothing fetched from a network.


# A rewrite leaves no temporary files, and the plots it no longer draws are gone; `warnings` replaces the stats'.
def test_rewrite_leaves_no_temp_files_and_given_warnings_win(tmp_path):
    run = make_run(tmp_path / "run")
    write_run_report(run)
    (run / "metric-swd2k.jsonl").unlink()
    given = [{"kind": "mode_collapse", "quantity": "Health/diversity_fake", "message": "lower the learning rate"}]
    page = write_run_report(run, warnings=given)
    temps = temp_pattern(".*")
    assert [p for p in run.rglob("*") if temps.match(p.name)] == []
    assert not (run / "report" / "metric-swd2k.png").exists() and (run / "report" / "losses.png").exists()
    text = page.read_text(encoding="utf-8")
    assert "mode_collapse" in text and "lower the learning rate" in text and "d_overfit" not in text


# A run with only a few stats keys and nothing else: no error, the plots it can draw, and "No warnings".
def test_minimal_run_dir(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "stats.jsonl").write_text("".join(json.dumps({"Progress/kimg": k, "Timing/sec_per_kimg": 3.0}) + "\n"
                                             for k in range(3)))
    doc = parse(write_run_report(run))
    assert [a["src"] for a in doc.find("img")] == ["report/speed.png"]
    assert "No warnings." in (run / "report.html").read_text(encoding="utf-8")
    assert not doc.find("input", id="grid-slider")


# A malformed line in the middle of stats.jsonl is an error naming the file and line; an unfinished last line
# (a run writing it) is skipped.
def test_malformed_line_raises_but_truncated_last_line_is_skipped(tmp_path):
    run = make_run(tmp_path / "run", ticks=5)
    lines = (run / "stats.jsonl").read_text().splitlines(keepends=True)
    (run / "stats.jsonl").write_text("".join(lines[:2]) + '{"Progress/kimg": 8.0, "Loss/G\n' + "".join(lines[3:]))
    with pytest.raises(ValueError, match=r"stats\.jsonl: line 3: not valid JSON"):
        write_run_report(run)
    (run / "stats.jsonl").write_text("".join(lines) + '{"Progress/kimg": 20.0, "Loss/G/lo')
    text = write_run_report(run).read_text(encoding="utf-8")
    assert "16</b> kimg" in text  # The last complete tick's kimg.
    (run / "metric-fid50k_full.jsonl").write_text('{"metric": "fid50k_full", "kimg": 4}\n')
    with pytest.raises(ValueError, match=r"metric-fid50k_full\.jsonl: record 1: missing key\(s\) value"):
        write_run_report(run)


# scripts/report.py: exit 2 naming the path for a missing directory or one without stats.jsonl; else it prints
# the page's path.
def test_script_exit_codes(tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "report.py")]
    missing = tmp_path / "no-such-run"
    proc = subprocess.run(script + [str(missing)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and str(missing) in proc.stderr, proc.stderr
    proc = subprocess.run(script + [str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "stats.jsonl" in proc.stderr and str(tmp_path) in proc.stderr, proc.stderr
    run = make_run(tmp_path / "run", ticks=4)
    proc = subprocess.run(script + [str(run)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == str(run / "report.html"), proc.stderr


# A headless Chromium on Debian's browser and driver; a skip without them (a failure in CI, whose .ci/run installs
# them).
def chromium_driver():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{', '.join(missing)} missing in CI: .ci/run installs chromium and chromium-driver")
        pytest.skip(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--allow-file-access-from-files"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


# Switch the grid slider with `move` (a function of the slider) and wait until the grid image shows `kimg`'s fakes;
# returns the label's text.
def slide_to(driver, move, kimg: int) -> str:
    move(driver.find_element("id", "grid-slider"))
    src = f"fakes{kimg:06d}.png"
    shown = ("const i = document.getElementById('grid-image'); "
             "return i.getAttribute('src') === arguments[0] && i.complete && i.naturalWidth > 0;")
    WebDriverWait(driver, 20).until(lambda d: d.execute_script(shown, src))
    return driver.find_element("id", "grid-label").text


# In a real browser every image of the page loads (plots and grids), and the slider (by keyboard and by an input
# event) switches the grid image and its label.
def test_page_in_headless_browser(tmp_path):
    run = make_run(tmp_path / "run")
    page = write_run_report(run)
    driver = chromium_driver()
    try:
        driver.get(page.as_uri())
        WebDriverWait(driver, 20).until(lambda d: d.execute_script(ALL_LOADED))
        images = driver.execute_script("return Array.from(document.images).map(i => [i.getAttribute('src'), "
                                       "i.className, i.naturalWidth]);")
        assert len(images) == 7 + 2 and all(w > 0 for _, _, w in images), images
        assert {cls for _, cls, _ in images} == {"plot", "grid"}
        assert "116 kimg" in driver.find_element("id", "grid-label").text
        label = slide_to(driver, lambda s: s.send_keys(Keys.ARROW_LEFT), FAKES[1][0])
        assert "40 kimg" in label
        set_value = ("arguments[0].value = arguments[1]; "
                     "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));")
        label = slide_to(driver, lambda s: driver.execute_script(set_value, s, "0"), FAKES[0][0])
        assert "at 0 kimg" in label and "1 of 3" in label
        assert driver.execute_script("return document.getElementById('grid-image').naturalWidth;") == 64
    finally:
        driver.quit()
