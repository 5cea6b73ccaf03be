"""README.md and docs/*.md stay true to the repository: links, anchors, make targets, scripts, length."""
import dataclasses
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 250


# A page split into its prose lines and its fenced code lines (``` blocks), in order.
def split_fences(text: str) -> tuple:
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return prose, code


# GitHub's anchor of a heading: lower case, punctuation (backticks, dots, commas, ...) dropped, spaces to hyphens;
# a repeated heading gets -1, -2, ...
def anchors(path: Path) -> set:
    seen, out = {}, set()
    for line in split_fences(path.read_text())[0]:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


# The markdown links [text](target) of a page's prose (code spans and fenced code left out).
def links(path: Path) -> list:
    prose = "\n".join(split_fences(path.read_text())[0])
    prose = re.sub(r"`[^`\n]*`", "", prose)
    return re.findall(r"\[[^\]\n]*\]\(([^)\s]+)\)", prose)


# The code of a page: its inline code spans and its fenced lines without their shell comments.
def code_text(path: Path) -> list:
    prose, code = split_fences(path.read_text())
    spans = re.findall(r"`([^`\n]+)`", "\n".join(prose))
    return spans + [re.sub(r"(^|\s)#.*$", "", line) for line in code]


# The make targets a piece of code runs: after `make`, the first word that is not VAR=value or an -option.
def make_targets(code: str) -> list:
    words, out = code.split(), []
    for i, w in enumerate(words):
        if w == "make":
            rest = [x for x in words[i + 1:] if "=" not in x and not x.startswith("-")]
            if rest and re.fullmatch(r"[A-Za-z][\w.-]*", rest[0]):
                out.append(rest[0])
    return out


def makefile_targets() -> set:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-$()/ ]+?)\s*::?(?!=)", line)
        if m:
            targets.update(m.group(1).split())
    return targets


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"
    # The two commands come first, before any section.
    first = next(i for i, ln in enumerate(lines) if ln.startswith("## "))
    head = "\n".join(lines[:first])
    assert "make train" in head and "make test" in head
    assert [ln for ln in lines if ln.startswith("## ")][-1] == "## Documentation"


def test_every_doc_is_listed_in_the_readme():
    assert DOCS, "docs/ has no pages"
    listed = {(README.parent / t.split("#")[0]).resolve() for t in links(README) if t.startswith("docs/")}
    missing = [d.name for d in DOCS if d.resolve() not in listed]
    assert not missing, f"README.md does not link docs/{missing}"


# The relative links of a page that lead nowhere: no such file inside `root`, or no such heading in it.
def broken_links(page: Path, root: Path = ROOT) -> list:
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page.resolve()
        if root.resolve() not in [dest, *dest.parents] or not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_and_anchors_exist(page):
    bad = broken_links(page)
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def test_named_make_targets_exist():
    targets = makefile_targets()
    named = {t: p for p in PAGES for code in code_text(p) for t in make_targets(code)}
    assert {"train", "test"} <= set(named)  # The extraction itself finds the two commands.
    missing = {t: p.relative_to(ROOT).as_posix() for t, p in named.items() if t not in targets}
    assert not missing, f"make targets named in the docs but not in the Makefile: {missing}"


def test_named_scripts_and_tests_exist():
    named = {}
    for page in PAGES:
        for rel in re.findall(r"(?<![\w/.])((?:scripts|tests)/[\w-]+\.(?:py|sh))\b", page.read_text()):
            named.setdefault(rel, page.relative_to(ROOT).as_posix())
    assert "scripts/train.py" in named and "scripts/dataset_tool.py" in named
    missing = {rel: page for rel, page in named.items() if not (ROOT / rel).is_file()}
    assert not missing, f"files named in the docs that do not exist: {missing}"


# Tables whose rows have another number of cells than their header: a `|` in a cell must be written `\|`
# (GitHub splits cells at a bare `|`, also inside a code span). Returns (line number, header cells, row cells).
def ragged_rows(path: Path) -> list:
    bad, header = [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.startswith("|"):
            header = None
            continue
        cells = len(re.split(r"(?<!\\)\|", line.strip())) - 2
        if header is None:
            header = cells
        elif cells != header:
            bad.append((number, header, cells))
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_table_rows_have_their_header_cells(page):
    assert not ragged_rows(page), f"{page.relative_to(ROOT)}: (line, header cells, row cells) {ragged_rows(page)}"


# The schema's keys with their defaults, as docs/configuration.md writes them: `model.z_dim`, `512`.
def schema_keys(cls, prefix: str = "") -> dict:
    def spelled(v):
        if v is None:
            return "null"
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return "[" + ", ".join(spelled(x) for x in v) + "]"
        return str(v)
    out = {}
    for f in dataclasses.fields(cls):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(value):
            out.update(schema_keys(type(value), f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = spelled(value)
    return out


# Every key of the schema has a row in docs/configuration.md with the schema's default, and every row is a key.
def test_every_config_key_is_documented():
    from training.config import Config
    keys = schema_keys(Config)
    assert keys["model.z_dim"] == "512" and keys["train.grid_size"] == "[8, 4]" and keys["resume"] == "null"
    section = (ROOT / "docs/configuration.md").read_text().split("\n## Every key\n")[1].split("\n## ")[0]
    rows = dict(re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", section, re.M))
    missing = sorted(set(keys) - set(rows))
    assert not missing, f"docs/configuration.md has no row for {missing}"
    unknown = sorted(set(rows) - set(keys))
    assert not unknown, f"docs/configuration.md documents keys the schema does not have: {unknown}"
    wrong = {k: (rows[k], keys[k]) for k in keys if rows[k] != keys[k]}
    assert not wrong, f"docs/configuration.md defaults differ from training/config.py (doc, schema): {wrong}"


# The checks themselves: a broken link, a missing anchor and an unknown make target are caught.
def test_checks_catch_breakage(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n## Two `words`, here\n\n[ok](#two-words-here) [bad](#nothing) [gone](missing.md) "
                    "`[skipped](code.md)`\n\n```bash\nmake train  # make believe\n```\nrun `make FOO=1 gpu-check`\n")
    assert anchors(page) == {"a-title", "two-words-here"}
    assert links(page) == ["#two-words-here", "#nothing", "missing.md"]
    assert broken_links(page, tmp_path) == ["#nothing: no heading #nothing in page.md", "missing.md: no such file"]
    (tmp_path / "missing.md").write_text("# Here\n")
    assert broken_links(page, tmp_path) == ["#nothing: no heading #nothing in page.md"]
    assert sorted(t for c in code_text(page) for t in make_targets(c)) == ["gpu-check", "train"]
    assert {"train", "test", "gpu-check", "bench"} <= makefile_targets()
    table = tmp_path / "table.md"
    table.write_text("| a | b |\n| --- | --- |\n| `x\\|y` | z |\n| `x|y` | z |\n\ntext\n| c |\n| --- |\n")
    assert ragged_rows(table) == [(4, 2, 3)]
