"""The import contract (pyproject.toml, import-linter): layers scripts -> training -> networks -> ops, no cycles."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).with_name("lint-imports"))


# Run lint-imports on `config` in `cwd` (no cache written); returns (exit status, output).
def lint(config, cwd, extra_path=None):
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    proc = subprocess.run([LINT, "--no-cache", "--no-logo", str(config)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


# ganforge keeps its contract: nothing imports up a layer, no package has a cycle among its modules.
def test_ganforge_keeps_its_import_contract():
    rc, out = lint(ROOT / "pyproject.toml", ROOT)
    assert rc == 0 and "2 kept, 0 broken" in out, out[-3000:]


# The same contract types break on what they must catch, also when the offending import sits inside a function:
# a cycle between two modules of a package, and a lower layer importing a higher one.
def test_contract_breaks_on_cycles_and_upward_imports_inside_functions(tmp_path):
    pkg = tmp_path / "demo"
    (pkg / "high").mkdir(parents=True)
    (pkg / "low").mkdir()
    for init in (pkg, pkg / "high", pkg / "low"):
        (init / "__init__.py").write_text('"""demo"""\n')
    (pkg / "low" / "a.py").write_text("from demo.low import b\n")
    (pkg / "low" / "b.py").write_text("def late():\n    from demo.low import a  # a cycle, inside a function\n"
                                      "    return a\n")
    (pkg / "low" / "c.py").write_text("def up():\n    import demo.high  # a lower layer importing up\n")
    config = tmp_path / "contract.toml"
    config.write_text(textwrap.dedent("""
        [tool.importlinter]
        root_packages = ["demo"]

        [[tool.importlinter.contracts]]
        name = "layers"
        type = "layers"
        layers = ["demo.high", "demo.low"]

        [[tool.importlinter.contracts]]
        name = "acyclic"
        type = "acyclic_siblings"
        ancestors = ["demo.low"]
    """))
    rc, out = lint(config, tmp_path, extra_path=tmp_path)
    assert rc != 0 and "0 kept, 2 broken" in out, out[-3000:]
    assert "demo.low.c -> demo.high" in out
