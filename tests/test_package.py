"""The library and the lab are apart: ``import dpn`` needs torch, transformers and safetensors only."""

from __future__ import annotations

import subprocess
import sys


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
