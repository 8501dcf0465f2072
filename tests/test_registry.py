"""The Comfy Registry metadata: pyproject's [tool.comfy] and the icon it points at."""
import re
from pathlib import Path

import pytest
from PIL import Image

tomllib = pytest.importorskip("tomllib")   # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
RAW = "https://raw.githubusercontent.com/customcontrast/comfyui-customcontrast/main/"


def test_tool_comfy_names_publisher_display_name_icon_and_oldest_comfyui():
    """Fails when a key is missing or empty, the icon URL is not this repository's raw file, or requires-comfyui
    is not a '>=' bound on a released version."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert project["project"]["urls"]["Repository"] == RAW.replace("raw.githubusercontent.com", "github.com")[:-6]
    assert comfy["Icon"].startswith(RAW)
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])


def test_the_icon_is_a_small_square_png_in_the_repository():
    """The file the Icon URL names exists here and is a square PNG within the registry's 800 x 400 limit."""
    comfy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]
    path = REPO / comfy["Icon"].removeprefix(RAW)
    with Image.open(path) as icon:
        assert icon.format == "PNG"
        assert icon.width == icon.height <= 400
