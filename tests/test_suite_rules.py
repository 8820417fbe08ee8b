"""The test suite's own rules: tests share code through helpers.py only (no test imports conftest.py or another test
module), and the code that runs in child processes lives in files under tests/child_scripts/, where ruff sees it."""

import ast
import re
import textwrap

from helpers import CHILD_SCRIPTS, TESTS


def imported_modules(path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_tests_import_helpers_not_each_other():
    offenders = {}
    for path in sorted([*TESTS.glob("*.py"), *CHILD_SCRIPTS.glob("*.py")]):
        wrong = {name for name in imported_modules(path) if name == "conftest" or name.startswith("test_")}
        if wrong:
            offenders[path.name] = sorted(wrong)
    assert not offenders, f"import shared code from helpers.py instead: {offenders}"


def is_program(text: str) -> bool:
    """Several lines of Python that import something (prose docstrings do not parse), templates included."""
    if text.count("\n") < 3:
        return False
    try:
        tree = ast.parse(re.sub(r"\{\w+(![rs])?\}", "x", textwrap.dedent(text)))  # str.format fields too
    except SyntaxError:
        return False
    return any(isinstance(node, (ast.Import, ast.ImportFrom)) for node in ast.walk(tree))


def test_no_child_script_in_a_string():
    """`python -c CODE` with a multi-line program: write it to tests/child_scripts/ instead."""
    offenders = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and is_program(node.value):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
