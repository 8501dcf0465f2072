"""Loader node: picks a CustomContrast checkpoint from models/customcontrast and validates it.

The weights stay in the file's dtype; Apply casts them to the dtype the MODEL runs in (``for_model``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import folder_paths
import torch
from comfy_api.latest import io

from ..customcontrast_core import checkpoint as checkpoint_format
from ..customcontrast_core.checkpoint import CheckpointInfo
from ..customcontrast_core.visual_kv import CustomContrastModel

FOLDER = "customcontrast"
CUSTOMCONTRAST = io.Custom("CUSTOMCONTRAST")
log = logging.getLogger("customcontrast")


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
    casts: dict = field(default_factory=dict, repr=False)   # dtype -> this checkpoint in that dtype

    def __deepcopy__(self, memo) -> "LoadedCustomContrast":
        return self   # immutable weights, shared by every clone of a patched MODEL

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def in_dtype(self, dtype: torch.dtype) -> "LoadedCustomContrast":
        """These weights in ``dtype`` (self when they are already): a copy made once per dtype and kept, so
        every Apply node on a MODEL of that dtype shares it."""
        if dtype == self.dtype:
            return self
        if dtype not in self.casts:
            model = CustomContrastModel(self.model.config, device=torch.device("meta"))
            model.load_state_dict({k: v.to(dtype) for k, v in self.model.state_dict().items()}, assign=True)
            self.casts[dtype] = wrap(model.eval().requires_grad_(False), self.info)
        return self.casts[dtype]


def compute_dtype(model) -> torch.dtype:
    """The dtype a ComfyUI MODEL's UNet computes in: its ``manual_cast_dtype`` when its weights are cast per
    layer (fp8 or bf16 storage, ``--force-fp32`` …), else its weights' dtype (``model_base.apply_model``)."""
    cast = model.get_model_object("manual_cast_dtype")
    dtype = cast if cast is not None else model.model.get_dtype()
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def for_model(customcontrast: LoadedCustomContrast, model) -> LoadedCustomContrast:
    """The checkpoint in the dtype ``model`` (a ComfyUI MODEL) runs in."""
    return customcontrast.in_dtype(compute_dtype(model))


def wrap(model: CustomContrastModel, info: CheckpointInfo) -> LoadedCustomContrast:
    """A loaded model with the ModelPatcher that moves it to the sampling device with the UNet."""
    import comfy.model_management as mm
    import comfy.model_patcher

    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return LoadedCustomContrast(model=model, info=info, patcher=patcher)


def load_customcontrast(path: str) -> LoadedCustomContrast:
    """Loads and validates a checkpoint (kept in the file's dtype), wrapped for ComfyUI's model management;
    refuses a toy checkpoint (the ``tiny`` presets) after the file itself checks out."""
    model, info = checkpoint_format.load(path)
    checkpoint_format.check_real(path, info.config)
    if info.clip_vision is None:
        log.info("CustomContrast: %s does not record which CLIP-vision model it was trained with (written before "
                 "the record); Encode Subject checks the CLIP-vision width (%d) and layer count (%d) only", path,
                 info.config.clip_width, info.config.clip_num_layers)
    return wrap(model, info)


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
