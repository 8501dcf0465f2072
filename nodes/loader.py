"""Loader node: picks a CustomContrast checkpoint from models/customcontrast and validates it."""
from __future__ import annotations

import os
from dataclasses import dataclass

import folder_paths
from comfy_api.latest import io

from ..customcontrast_core import checkpoint as checkpoint_format
from ..customcontrast_core.checkpoint import CheckpointInfo
from ..customcontrast_core.visual_kv import CustomContrastModel

FOLDER = "customcontrast"
CUSTOMCONTRAST = io.Custom("CUSTOMCONTRAST")


def register_model_folder() -> None:
    """Registers ``models/customcontrast`` (keeping folders already added by extra_model_paths.yaml)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))[0]
    if default not in paths:
        paths = [default, *paths]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, folder_paths.supported_pt_extensions)


register_model_folder()


@dataclass(frozen=True, eq=False)
class LoadedCustomContrast:
    """A validated checkpoint and the ComfyUI ModelPatcher that moves it to the sampling device."""

    model: CustomContrastModel
    info: CheckpointInfo
    patcher: object

    def __deepcopy__(self, memo) -> "LoadedCustomContrast":
        return self   # immutable weights, shared by every clone of a patched MODEL


def load_customcontrast(path: str) -> LoadedCustomContrast:
    """Loads and validates a checkpoint, wrapped for ComfyUI's model management."""
    import comfy.model_management as mm
    import comfy.model_patcher

    model, info = checkpoint_format.load(path)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return LoadedCustomContrast(model=model, info=info, patcher=patcher)


class CustomContrastLoader(io.ComfyNode):
    """Loads an MFI-Encoder + visual K/V checkpoint written by ``training.export``."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomContrastLoader",
            display_name="Load CustomContrast Model",
            category="CustomContrast",
            description="Loads a CustomContrast .safetensors checkpoint from models/customcontrast.",
            inputs=[io.Combo.Input("checkpoint", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="A CustomContrast .safetensors file in models/customcontrast "
                                           "(or a 'customcontrast' folder of extra_model_paths.yaml).")],
            outputs=[CUSTOMCONTRAST.Output(display_name="CUSTOMCONTRAST",
                                           tooltip="The MFI-Encoder and visual K/V projections.")],
        )

    @classmethod
    def execute(cls, checkpoint) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, checkpoint)
        if path is None:
            searched = folder_paths.get_folder_paths(FOLDER)
            raise FileNotFoundError(f"CustomContrast checkpoint {checkpoint!r} not found; searched {searched}")
        return io.NodeOutput(load_customcontrast(path))
