"""The docs describe the code that exists: every module is in docs/architecture.md's code map, the
config version it states is the code's, every strategy has a row in docs/strategies.md, and no doc
links to a file that is not there."""

from __future__ import annotations

import re
from pathlib import Path

from dpn.config import CONFIG_VERSION
from dpn.strategies import registered_strategies

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def test_every_module_is_in_the_code_map():
    text = ARCHITECTURE.read_text()
    missing = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "dpn").rglob("*.py"))
               if path.name != "__init__.py" and str(path.relative_to(ROOT)) not in text
               and f"`{path.stem}`" not in text and f"{path.name}" not in text]
    assert not missing, f"modules missing from docs/architecture.md's code map: {missing}"


def test_the_documented_config_version_is_the_codes():
    stated = {int(v) for v in re.findall(r"JSON \(version (\d+)\)", ARCHITECTURE.read_text())}
    assert stated == {CONFIG_VERSION}


def test_every_strategy_has_a_row_in_the_strategies_page():
    text = (ROOT / "docs" / "strategies.md").read_text()
    missing = [name for name in registered_strategies() if f"(`{name}.py`)" not in text
               and f"| `{name}` (" not in text]
    assert not missing, f"strategies without a row in docs/strategies.md: {missing}"


def test_doc_links_point_at_files_that_exist():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http") and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to missing files: {broken}"


def test_the_vocabulary_names_what_the_code_calls_it():
    """Every name in the vocabulary's 'in the code' column occurs in dpn's source."""
    text = ARCHITECTURE.read_text()
    table = text.split("## Vocabulary", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    source = "\n".join(path.read_text() for path in (ROOT / "dpn").rglob("*.py"))
    names = {name for row in rows[1:] for name in re.findall(r"`([A-Za-z_][\w.]*)", row[-1])}
    assert len(names) > 15
    missing = sorted(name for name in names if not re.search(rf"\b{re.escape(name.split('.')[-1])}\b", source))
    assert not missing, f"vocabulary names that are not in the code: {missing}"


def test_tests_the_docs_cite_exist():
    """A doc that names a test file or a test (``runtime/test_forward.py::test_x``) names one that is there."""
    tests = ROOT / "tests"
    missing = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        for path in re.findall(r"(tests/[\w/]+\.py)", text):
            if not (ROOT / path).is_file():
                missing.append(f"{page.name}: {path}")
        for path, name in re.findall(r"([\w/]*test_\w+\.py)::(\w+)", text):
            files = [f for f in tests.rglob(Path(path).name) if str(f).endswith(path)]
            if not any(re.search(rf"def {name}\b", f.read_text()) for f in files):
                missing.append(f"{page.name}: {path}::{name}")
    assert not missing, f"tests cited in the docs that do not exist: {missing}"
