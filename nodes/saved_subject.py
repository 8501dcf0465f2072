"""Save Subject / Load Subject nodes: an encoded SUBJECT as a file (``customcontrast_core.subjects``), so a
reference is encoded once and reused, as IPAdapter_plus' Save/Load Embeds."""
from __future__ import annotations

import hashlib
import os

import folder_paths
from comfy_api.latest import io

from ..customcontrast_core.subjects import SavedSubject, check_fits, load_subject, save_subject
from .loader import CUSTOMCONTRAST, LoadedCustomContrast
from .subject import SUBJECT, Subject

SUFFIX = ".safetensors"


def to_saved(subject: Subject) -> SavedSubject:
    if subject.clip_vision is None:
        raise ValueError("CustomContrast Save Subject: this SUBJECT does not say which CLIP-vision model encoded it "
                         "(expected one from Encode Subject or Load Subject); encode it again with Encode Subject")
    return SavedSubject(hidden=subject.hidden, blank=subject.blank, clip_layers=subject.layers,
                        clip_vision=subject.clip_vision,
                        preset=subject.preset, base=subject.base, images=subject.images,
                        image_weights=subject.image_weights)


def from_saved(saved: SavedSubject) -> Subject:
    return Subject(hidden=saved.hidden, blank=saved.blank, width=saved.width, layers=saved.clip_layers,
                   clip_vision=saved.clip_vision, preset=saved.preset, base=saved.base, images=saved.images,
                   image_weights=saved.image_weights)


def subject_files() -> list[str]:
    """The ``.safetensors`` files of ComfyUI's input folder (where Load Subject reads)."""
    folder = folder_paths.get_input_directory()
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.endswith(SUFFIX) and os.path.isfile(os.path.join(folder, f)))


class CustomContrastSaveSubject(io.ComfyNode):
    """Writes an encoded SUBJECT to ComfyUI's output folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomContrastSaveSubject",
            display_name="CustomContrast Save Subject",
            category="CustomContrast",
            description="Saves an encoded subject (from Encode Subject) as a .safetensors file in the output folder; "
                        "copy it to the input folder to load it with Load Subject.",
            inputs=[
                SUBJECT.Input("subject", tooltip="From CustomContrast Encode Subject."),
                io.String.Input("filename_prefix", default="customcontrast/subject",
                                tooltip="File name prefix in the output folder (a counter and .safetensors are "
                                        "added; subfolders allowed)."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, subject, filename_prefix) -> io.NodeOutput:
        output = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output)
        file = f"{name}_{counter:05}_{SUFFIX}"
        save_subject(os.path.join(folder, file), to_saved(subject))
        return io.NodeOutput(ui={"text": [os.path.join(subfolder, file)]})


class CustomContrastLoadSubject(io.ComfyNode):
    """Reads a SUBJECT written by Save Subject from ComfyUI's input folder, checked against the checkpoint."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CustomContrastLoadSubject",
            display_name="CustomContrast Load Subject",
            category="CustomContrast",
            description="Loads a subject saved by Save Subject (a .safetensors file in the input folder) and checks "
                        "it was encoded for this checkpoint's CLIP-vision features.",
            inputs=[
                CUSTOMCONTRAST.Input("customcontrast", tooltip="From Load CustomContrast Model: the subject must have "
                                     "been encoded for its CLIP-vision model and layers."),
                io.Combo.Input("subject_file", options=subject_files(),
                               tooltip="A file written by Save Subject, copied to ComfyUI's input folder."),
            ],
            outputs=[SUBJECT.Output(display_name="SUBJECT", tooltip="The saved subject, as Encode Subject gives it.")],
        )

    @classmethod
    def execute(cls, customcontrast: LoadedCustomContrast, subject_file) -> io.NodeOutput:
        path = folder_paths.get_annotated_filepath(subject_file)
        saved = load_subject(path)
        check_fits(path, saved, customcontrast.model.config, customcontrast.info.clip_vision)
        return io.NodeOutput(from_saved(saved))

    @classmethod
    def fingerprint_inputs(cls, subject_file, **linked):
        """The file's content hash: saving over a file loads the new subject."""
        path = folder_paths.get_annotated_filepath(subject_file)
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    @classmethod
    def validate_inputs(cls, subject_file):
        if not folder_paths.exists_annotated_filepath(subject_file):
            return f"Load Subject: subject_file {subject_file!r} is not a file in the input folder"
        return True
