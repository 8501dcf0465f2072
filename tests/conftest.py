"""Shared test setup: no hub access, deterministic CPU math."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The repository is a package, as ComfyUI loads it from custom_nodes/ (its modules import one another
# relatively): a folder holding a link to it, under an importable name, goes on the path, and tests import
# ``comfyui_customcontrast.nodes...`` the ordinary way.
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

PACKAGE = "comfyui_customcontrast"
_FOLDER = Path(tempfile.mkdtemp(prefix="cc_package_"))
(_FOLDER / PACKAGE).symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
sys.path.insert(0, str(_FOLDER))
