"""The package's layers: kernels ← core ← config ← integration. Each layer imports only
the ones below it (and the leaf ``envs``); only ``integration`` touches vLLM; the plugin's
own environment variables are read in ``envs.py`` alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vllm_episodic"

# what each layer may import of ours (any stdlib or third-party module besides vLLM)
ALLOWED = {
    "kernels": {"vllm_episodic.kernels", "vllm_episodic.envs"},
    "core": {"vllm_episodic.kernels", "vllm_episodic.core", "vllm_episodic.envs"},
    "config": {"vllm_episodic.core.constants", "vllm_episodic.configs"},
}
LAYER_FILES = {
    "kernels": sorted((ROOT / "kernels").glob("*.py")),
    "core": sorted((PACKAGE / "core").glob("*.py")),
    "config": [PACKAGE / "config.py"],
}


def _imports(path: Path) -> list[str]:
    """Every module a file imports (at any depth: lazy imports count too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(LAYER_FILES))
def test_each_layer_imports_only_the_layers_below(layer):
    assert LAYER_FILES[layer]
    wrong = [f"{path.relative_to(ROOT)}: {name}" for path in LAYER_FILES[layer] for name in _imports(path)
             if (name == "vllm" or name.startswith("vllm."))
             or (name.startswith("vllm_episodic") and name != "vllm_episodic"
                 and not any(name == a or name.startswith(a + ".") for a in ALLOWED[layer]))]
    assert not wrong, wrong


def test_only_the_integration_imports_vllm():
    outside = [path for path in PACKAGE.rglob("*.py") if "integration" not in path.parts]
    wrong = [f"{path.relative_to(ROOT)}: {name}" for path in outside for name in _imports(path)
             if name == "vllm" or name.startswith("vllm.")]
    assert not wrong, wrong


def test_loading_a_config_loads_no_torch():
    code = ("import sys; from vllm_episodic.config import EpisodicConfig; EpisodicConfig.from_dict({'preset': 'qwen2'}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_plugins_environment_variables_are_read_in_envs_only():
    wrong = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "kernels").glob("*.py")]:
        if path.name == "envs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            # os.environ.get("VLLM_EPISODIC_..."), os.getenv(...), os.environ["..."] read
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = ast.unparse(node.func)
                name = node.args[0].value
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) \
                    and isinstance(node.slice, ast.Constant):
                func, name = ast.unparse(node.value), node.slice.value
            else:
                continue
            if func in ("os.environ.get", "os.getenv", "os.environ") and str(name).startswith("VLLM_EPISODIC_"):
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not wrong, wrong


def test_no_module_outgrows_one_concept():
    """One concept per module: none of the package's files is over ~400 lines."""
    sizes = {str(path.relative_to(ROOT)): len(path.read_text().splitlines())
             for path in [*PACKAGE.rglob("*.py"), *(ROOT / "kernels").glob("*.py")]}
    assert not {name: n for name, n in sizes.items() if n > 400}
