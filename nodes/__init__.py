"""ComfyUI nodes of CustomContrast (V3 API).

``extension`` registers the nodes (imported by ComfyUI through ``comfy_entrypoint``); ``install``
and ``patch`` hold the patching logic and import no ComfyUI module at import time.
"""
