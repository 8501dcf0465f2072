"""ComfyUI entry point of CustomContrast; imports nothing heavy until ComfyUI asks for the nodes."""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)   # appended, so ComfyUI's own top-level modules keep precedence


async def comfy_entrypoint():
    """Returns the CustomContrast ComfyExtension (ComfyUI V3 node API)."""
    from .nodes.extension import CustomContrastExtension
    return CustomContrastExtension()
