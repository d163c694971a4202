"""The library and the lab are apart: ``import dpn`` needs torch, transformers and safetensors only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


def test_the_library_imports_without_the_lab_dependencies():
    # rich, matplotlib, accelerate and PIL made unimportable: the library must not need them.
    code = (
        "import sys\n"
        "for name in ('rich', 'matplotlib', 'accelerate', 'PIL'):\n"
        "    sys.modules[name] = None\n"
        "import dpn, dpn.presets, dpn.flops, dpn.budget\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('dpn.lab'))\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_every_built_in_strategy_is_registered_with_a_spec():
    import dpn
    from dpn.strategies.base import registered_specs

    assert {"dpn", "static", "random", "projector", "fastv", "pdrop", "dart"} <= set(dpn.strategies.registered_strategies())
    usage = dpn.presets.spec_help()
    assert all(entry.usage in usage for entry in registered_specs())


LIBRARY = Path(__file__).resolve().parents[1] / "dpn"


def _imports(path: Path) -> set[str]:
    """The dpn modules a source file imports (at any depth of the file)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpn"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("dpn")}
    return found


def test_strategies_do_not_reach_into_the_runtime_and_the_config_names_no_strategy_module():
    """Layers: strategies plan stages from what the runtime hands them (``StageInput``) and import
    no runtime module; the shared config knows strategies only through the registry."""
    for path in sorted((LIBRARY / "strategies").glob("*.py")):
        assert not {m for m in _imports(path) if m.startswith("dpn.runtime")}, path.name
    config_imports = _imports(LIBRARY / "config.py")
    assert not {m for m in config_imports if m.startswith("dpn.strategies.") and m != "dpn.strategies.base"}


def test_the_lab_engine_imports_no_tool():
    """Layers: the engine is what the tools share (loading, answering, decoding, timing); a module
    built on a tool (``dpn.lab.finetune`` on ``train``) is a tool itself, beside them."""
    lab = LIBRARY / "lab"
    shared = {"engine", "families", "data"}
    tools = {f"dpn.lab.{p.stem}" for p in lab.glob("*.py") if p.stem != "__init__"}
    for path in sorted((lab / "engine").glob("*.py")):
        reached = {m for m in _imports(path) if m in tools or m.split(".")[:3] == ["dpn", "lab", "commands"]}
        assert not reached, f"{path.name} imports the tools {sorted(reached)}"
    assert shared <= {p.name for p in lab.iterdir() if p.is_dir()}


def test_the_runtime_names_no_strategy():
    import dpn

    names = set(dpn.strategies.registered_strategies())
    for path in sorted((LIBRARY / "runtime").glob("*.py")):
        literals = {node.value for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not literals & names, (path.name, literals & names)
