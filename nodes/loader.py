"""Loader node: picks a CustomContrast checkpoint from models/customcontrast and validates it."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from customcontrast_core import checkpoint as checkpoint_format

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
        model, _ = checkpoint_format.load(path)
        return io.NodeOutput(model)
