"""The core imports only torch, einops, safetensors, numpy and the standard library."""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"torch", "einops", "safetensors", "numpy", "customcontrast_core"} | set(sys.stdlib_module_names)


@pytest.mark.parametrize("path", sorted((ROOT / "customcontrast_core").glob("*.py")), ids=lambda p: p.name)
def test_core_imports(path):
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported <= ALLOWED, f"{path.name} imports {sorted(imported - ALLOWED)}"


def test_training_never_imports_nodes_or_comfy():
    for path in (ROOT / "training").rglob("*.py"):
        text = path.read_text()
        assert "import comfy" not in text and "from nodes" not in text and "folder_paths" not in text, path


def test_requirements_never_install_torch():
    names = [line.split("=")[0].split(">")[0].split("<")[0].strip().lower()
             for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert not {"torch", "torchvision", "torchaudio"} & set(names)


def _absolute_imports(path: Path) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    return imported


def test_the_package_changes_no_import_path_and_reaches_the_core_relatively():
    """Loaded by ComfyUI, the extension adds nothing to sys.path (no top-level ``training``, ``tests`` ...) and
    never imports a top-level ``nodes`` or ``customcontrast_core``: ComfyUI's own ``nodes`` module stays
    ComfyUI's."""
    assert "sys.path" not in (ROOT / "__init__.py").read_text()
    for path in (ROOT / "nodes").glob("*.py"):
        assert not _absolute_imports(path) & {"nodes", "customcontrast_core", "training"}, path.name


def test_tests_never_import_the_benchmarks():
    for path in (ROOT / "tests").glob("*.py"):
        assert "benchmarks" not in _absolute_imports(path), path.name
