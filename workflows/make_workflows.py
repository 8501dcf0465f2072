"""Writes the example workflows in ComfyUI's UI format and their API-format copies (used by tests).

    python workflows/make_workflows.py

Each graph is described once below; widget values follow each node's input order.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# node type -> (widget input names in UI order, link inputs in order, outputs (name, type))
NODE_SPECS = {
    "CheckpointLoaderSimple": (["ckpt_name"], [], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPVisionLoader": (["clip_name"], [], [("CLIP_VISION", "CLIP_VISION")]),
    "LoadImage": (["image", "upload"], [], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "CustomContrastLoader": (["checkpoint"], [], [("CUSTOMCONTRAST", "CUSTOMCONTRAST")]),
    "CustomContrastEncodeSubject": (["average", "center_crop", "invert_mask"],
                                    [("customcontrast", "CUSTOMCONTRAST"), ("clip_vision", "CLIP_VISION"),
                                     ("image", "IMAGE"), ("mask", "MASK")],
                                    [("SUBJECT", "CUSTOMCONTRAST_SUBJECT")]),
    "CustomContrastApply": (["prompt", "weight", "start_percent", "end_percent", "use_mask", "mask_mode",
                             "mask_threshold"],
                            [("model", "MODEL"), ("clip", "CLIP"), ("customcontrast", "CUSTOMCONTRAST"),
                             ("subject", "CUSTOMCONTRAST_SUBJECT"), ("subject2", "CUSTOMCONTRAST_SUBJECT"),
                             ("subject3", "CUSTOMCONTRAST_SUBJECT"), ("attn_mask", "MASK")],
                            [("MODEL", "MODEL"), ("positive", "CONDITIONING")]),
    "CLIPTextEncode": (["text"], [("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": (["width", "height", "batch_size"], [], [("LATENT", "LATENT")]),
    "KSampler": (["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                 [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "VAEDecode": ([], [("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": (["filename_prefix"], [("images", "IMAGE")], []),
    "CustomContrastMaskPreview": (["subject"], [("model", "MODEL"), ("samples", "LATENT")],
                                  [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "PreviewImage": ([], [("images", "IMAGE")], []),
}
UI_ONLY_WIDGETS = {"control_after_generate", "upload"}
NOTE = ("Model files: the SD1.5/SDXL checkpoint in models/checkpoints, the CLIP-vision model the CustomContrast "
        "checkpoint was trained with (e.g. ViT-H/14) in models/clip_vision, the CustomContrast .safetensors "
        "(from python -m training.run / training.export) in models/customcontrast, the reference photo in "
        "input/. Write <subject> in the prompt where the subject goes.")


def single_subject(ckpt: str, size: int, steps: int, preview: bool = False) -> dict:
    graph = {
        "1": ("CheckpointLoaderSimple", {"ckpt_name": ckpt}),
        "2": ("CLIPVisionLoader", {"clip_name": "clip_vision.safetensors"}),
        "3": ("LoadImage", {"image": "subject.png", "upload": "image"}),
        "4": ("CustomContrastLoader", {"checkpoint": "customcontrast.safetensors"}),
        "5": ("CustomContrastEncodeSubject", {"customcontrast": ["4", 0], "clip_vision": ["2", 0],
                                              "image": ["3", 0], "average": True, "center_crop": True,
                                              "invert_mask": False}),
        "6": ("CustomContrastApply", {"model": ["1", 0], "clip": ["1", 1], "customcontrast": ["4", 0],
                                      "subject": ["5", 0], "prompt": "a photo of <subject> on the beach",
                                      "weight": 1.0, "start_percent": 0.0, "end_percent": 1.0, "use_mask": True,
                                      "mask_mode": "soft", "mask_threshold": 0.2}),
        "7": ("CLIPTextEncode", {"clip": ["1", 1], "text": "blurry, low quality"}),
        "8": ("EmptyLatentImage", {"width": size, "height": size, "batch_size": 1}),
        "9": ("KSampler", {"model": ["6", 0], "positive": ["6", 1], "negative": ["7", 0], "latent_image": ["8", 0],
                           "seed": 0, "control_after_generate": "fixed", "steps": steps, "cfg": 6.0,
                           "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}),
        "10": ("VAEDecode", {"samples": ["9", 0], "vae": ["1", 2]}),
        "11": ("SaveImage", {"images": ["10", 0], "filename_prefix": "customcontrast"}),
    }
    if preview:
        graph["12"] = ("CustomContrastMaskPreview", {"model": ["6", 0], "samples": ["9", 0], "subject": 1})
        graph["13"] = ("PreviewImage", {"images": ["12", 0]})
    return graph


def two_subjects() -> dict:
    graph = single_subject("sd15.safetensors", 512, 30)
    graph["14"] = ("LoadImage", {"image": "subject2.png", "upload": "image"})
    graph["15"] = ("CustomContrastEncodeSubject", {"customcontrast": ["4", 0], "clip_vision": ["2", 0],
                                                   "image": ["14", 0], "average": True, "center_crop": True,
                                                   "invert_mask": False})
    apply = dict(graph["6"][1], subject2=["15", 0], prompt="<subject1> and <subject2> sitting on a sofa")
    graph["6"] = ("CustomContrastApply", apply)
    return graph


WORKFLOWS = {
    "sd15_single_subject": single_subject("sd15.safetensors", 512, 30),
    "sdxl_single_subject": single_subject("sdxl.safetensors", 1024, 30),
    "sd15_two_subjects": two_subjects(),
    "sd15_mask_preview": single_subject("sd15.safetensors", 512, 30, preview=True),
}


def to_api(graph: dict) -> dict:
    return {nid: {"class_type": cls, "inputs": {k: v for k, v in inputs.items() if k not in UI_ONLY_WIDGETS}}
            for nid, (cls, inputs) in graph.items()}


def to_ui(graph: dict) -> dict:
    nodes, links = [], []
    ids = {nid: int(nid) for nid in graph}
    out_links: dict[tuple[int, int], list[int]] = {}
    for nid, (cls, inputs) in graph.items():
        widgets, link_inputs, _ = NODE_SPECS[cls]
        for slot, (name, typ) in enumerate(link_inputs):
            if name in inputs:
                src, src_slot = inputs[name]
                link_id = len(links) + 1
                links.append([link_id, ids[src], src_slot, ids[nid], slot, typ])
                out_links.setdefault((ids[src], src_slot), []).append(link_id)
    for index, (nid, (cls, inputs)) in enumerate(graph.items()):
        widgets, link_inputs, outputs = NODE_SPECS[cls]
        node_inputs = [{"name": name, "type": typ,
                        "link": next((l[0] for l in links if l[3] == ids[nid] and l[4] == slot), None)}
                       for slot, (name, typ) in enumerate(link_inputs)]
        node_outputs = [{"name": name, "type": typ, "links": out_links.get((ids[nid], slot), []), "slot_index": slot}
                        for slot, (name, typ) in enumerate(outputs)]
        nodes.append({"id": ids[nid], "type": cls, "pos": [60 + 330 * (index % 5), 60 + 300 * (index // 5)],
                      "size": [300, 120 + 24 * len(widgets)], "flags": {}, "order": index, "mode": 0,
                      "inputs": node_inputs, "outputs": node_outputs, "properties": {"Node name for S&R": cls},
                      "widgets_values": [inputs[w] for w in widgets if w in inputs]})
    note_id = max(ids.values()) + 1
    nodes.append({"id": note_id, "type": "Note", "pos": [60, -200], "size": [640, 160], "flags": {},
                  "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                  "widgets_values": [NOTE]})
    return {"last_node_id": note_id, "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def main() -> None:
    for name, graph in WORKFLOWS.items():
        (HERE / f"{name}.json").write_text(json.dumps(to_ui(graph), indent=1) + "\n")
        (HERE / "api" / f"{name}.json").write_text(json.dumps(to_api(graph), indent=1) + "\n")


if __name__ == "__main__":
    main()
