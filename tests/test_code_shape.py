"""The shape docs/design.md asks of the code: no function of the package longer than 60 lines (its
docstring not counted), so that each reads on one screen (the exceptions, with the reason, are listed
here); tests import the package and tests/ helpers only — never benchmarks/ or another test module;
the index of the result pages is the generated one."""

import ast
from pathlib import Path

import fdiv_align

ROOT = Path(fdiv_align.__file__).parent
MAX_LINES = 60
#: "module:function" → why it is longer
EXCEPTIONS: dict[str, str] = {}


def function_lengths(source: str):
    """(name, lines of code after the docstring) of every function and method in ``source``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str) and len(body) > 1:
                body = body[1:]
            yield node.name, node.end_lineno - body[0].lineno + 1


def test_no_function_is_longer_than_a_screen():
    long = [f"{path.relative_to(ROOT.parent)}:{name} ({n} lines)"
            for path in sorted(ROOT.rglob("*.py")) for name, n in function_lengths(path.read_text())
            if n > MAX_LINES and f"{path.relative_to(ROOT.parent).with_suffix('')}:{name}" not in EXCEPTIONS]
    assert not long, "functions over 60 lines: " + ", ".join(long)


def test_the_length_check_skips_the_docstring_only():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES + 1))
    doc = '    """' + "\n".join(["doc"] * 30) + '"""\n'
    assert dict(function_lengths(f"def f():\n{doc}{body}\n"))["f"] == MAX_LINES + 1
    assert dict(function_lengths(f"def g():\n{doc}    return 1\n"))["g"] == 1


def test_tests_import_neither_benchmarks_nor_other_test_modules():
    offenders = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: imports {n}" for n in names if n.startswith(("test_", "benchmarks"))]
        if path.name != Path(__file__).name and any("sys.path" in line and "benchmarks" in line
                                                     for line in path.read_text().splitlines()):
            offenders.append(f"{path.name}: puts benchmarks/ on sys.path")
    assert not offenders, offenders


def test_the_results_index_is_the_generated_one():
    """docs/results/README.md is generated from the pages (benchmarks/results_index.py): it cannot drift."""
    import subprocess
    import sys

    script = ROOT.parent / "benchmarks" / "results_index.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
