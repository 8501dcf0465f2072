"""Writes the example workflows in ComfyUI's UI format, their API-format copies (used by tests) and checks them.

    COMFYUI_PATH=/path/to/ComfyUI IPADAPTER_PLUS_PATH=/path/to/ComfyUI_IPAdapter_plus \\
        python workflows/make_workflows.py [--check]

Run it with the Python environment ComfyUI runs in: it loads ComfyUI in process (on the CPU) with this repository
and IPAdapter_plus as custom nodes, and reads every node's inputs from its registered class (the V3 schemas of
this extension's nodes, ComfyUI's and IPAdapter_plus' INPUT_TYPES), exactly as ComfyUI's /object_info serves
them to the frontend. Each node's widget list, widget order and defaults come from there; a graph below only
names the values it sets. Without IPADAPTER_PLUS_PATH the IPAdapter workflow is left as it is. ``--check``
writes nothing and exits 1 when a committed file differs from what would be written.

Layout: each node sits in a column (wires run left to right) and in a group; a group takes one or more
neighbouring columns and stacks below the groups above it. Node heights are the frontend's minimum for the
node's sockets and widgets (checked in the browser by tests/test_workflows_browser.py) plus room for previews.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PACKAGE = "comfyui-customcontrast"

# The frontend's geometry (ComfyUI frontend 1.35, litegraph): see tests/test_workflows_browser.py
SLOT_HEIGHT, WIDGET_HEIGHT, MULTILINE_HEIGHT, TITLE_HEIGHT, GROUP_TITLE_HEIGHT = 20, 24, 54, 30, 34
NODE_WIDTH, COLUMN_GAP, NODE_GAP, GROUP_PAD, GROUP_GAP = 320, 110, 30, 20, 40
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UI_ONLY_WIDGETS = {"control_after_generate", "upload"}
IMAGE_NODE_EXTRA = {"LoadImage": 260, "LoadImageMask": 260, "SaveImage": 380, "PreviewImage": 380}

# Placeholders: file names nobody has, so every loader shows what to pick (the tests swap them for test files)
SD15 = "pick-your-sd15-checkpoint.safetensors"
SDXL = "pick-your-sdxl-checkpoint.safetensors"
CLIP_VISION = "pick-your-clip-vision-model.safetensors"
CUSTOMCONTRAST_SD15 = "pick-your-customcontrast-sd15-checkpoint.safetensors"
CUSTOMCONTRAST_SDXL = "pick-your-customcontrast-sdxl-checkpoint.safetensors"
LORA = "pick-your-sd15-lora.safetensors"
CONTROLNET = "pick-your-sd15-canny-controlnet.safetensors"
IPADAPTER = "pick-your-ipadapter-sd15-model.safetensors"
IPADAPTER_CLIP_VISION = "pick-the-clip-vision-for-ipadapter.safetensors"
SAVED_SUBJECT = "subject_00001_.safetensors"   # Save Subject's first file, copied to the input folder


@dataclass
class Node:
    cls: str
    values: dict                 # widget values and links: name -> value, or name -> (node id, output slot)
    column: int
    group: str
    title: str | None = None
    extra_height: int = 0


@dataclass
class Workflow:
    note: str
    groups: list[str]            # drawn in this order; a group starts below the groups above it in its columns
    nodes: dict[int, Node]
    align: dict[str, str] = field(default_factory=dict)   # group -> a group whose top it starts at (or lower)


def link(node_id: int, slot: int = 0) -> tuple[int, int]:
    return (node_id, slot)


# The workflows ------------------------------------------------------------------------------------------------

MODEL_FILES = (
    "Pick each file in its loader (the names shown are placeholders):\n"
    "- **Load Checkpoint**: {base} checkpoint (`models/checkpoints`).\n"
    "- **Load CLIP Vision**: the CLIP-vision model your CustomContrast checkpoint was trained with "
    "(`models/clip_vision`; the paper's is ViT-H/14).\n"
    "- **Load CustomContrast Model**: a CustomContrast {family} checkpoint (`models/customcontrast`). No trained "
    "weights are published yet: make one with `python -m training.run` and `python -m training.export` (README).")


def read_me(headline: str, pick: list[str], advice: str, sdxl: bool = False) -> str:
    """A workflow's note: what it does, the files to pick in its loaders, what to adjust."""
    files = MODEL_FILES.format(base="an SDXL" if sdxl else "an SD1.5", family="SDXL" if sdxl else "SD1.5")
    return "\n\n".join([headline, files + "".join(f"\n- {line}" for line in pick), advice])


def single_subject(family: str = "sd15", preview: bool = False) -> Workflow:
    sdxl = family == "sdxl"
    what = ("**{} — one subject{}.** Draws the subject of the photo in *Load Image* where Apply's prompt says "
            "`<subject>`; feed Apply's MODEL and positive to the KSampler.").format(
                "SDXL" if sdxl else "SD1.5", ", with its masks" if preview else "")
    if preview:
        what += (" **CustomContrast Mask Preview** shows, after a run, where the subject was placed at each step "
                 "(one frame per step).")
    note = read_me(what, ["**Load Image**: one photo of your subject."],
                   "Lower Apply's `weight` (0.5–0.75) when the subject overrides the prompt.", sdxl)
    nodes = {
        1: Node("CheckpointLoaderSimple", {"ckpt_name": SDXL if sdxl else SD15}, 0, "Models"),
        2: Node("CLIPVisionLoader", {"clip_name": CLIP_VISION}, 0, "Models"),
        4: Node("CustomContrastLoader", {"checkpoint": CUSTOMCONTRAST_SDXL if sdxl else CUSTOMCONTRAST_SD15}, 0,
                "Models"),
        3: Node("LoadImage", {"image": "subject.png", "upload": "image"}, 0, "Subject photo"),
        5: Node("CustomContrastEncodeSubject", {"customcontrast": link(4), "clip_vision": link(2), "image": link(3),
                                                "average": True, "center_crop": True}, 1, "Subject"),
        6: Node("CustomContrastApply", {"model": link(1), "clip": link(1, 1), "customcontrast": link(4),
                                        "subject": link(5), "prompt": "a photo of <subject> on the beach"},
                2, "Prompt and size", extra_height=60),
        7: Node("CLIPTextEncode", {"clip": link(1, 1), "text": "blurry, low quality"}, 2, "Prompt and size",
                title="Negative prompt", extra_height=20),
        8: Node("EmptyLatentImage", {"width": 1024 if sdxl else 512, "height": 1024 if sdxl else 512}, 2,
                "Prompt and size"),
        9: Node("KSampler", {"model": link(6), "positive": link(6, 1), "negative": link(7), "latent_image": link(8),
                             "seed": 0, "control_after_generate": "fixed", "steps": 30, "cfg": 6.0,
                             "sampler_name": "euler", "scheduler": "normal"}, 3, "Sample"),
        10: Node("VAEDecode", {"samples": link(9), "vae": link(1, 2)}, 4, "Image"),
        11: Node("SaveImage", {"images": link(10), "filename_prefix": "customcontrast"}, 5, "Image"),
    }
    groups = ["Models", "Subject photo", "Subject", "Prompt and size", "Sample", "Image"]
    if preview:
        nodes[12] = Node("CustomContrastMaskPreview", {"model": link(6), "samples": link(9), "subject": 1}, 4,
                         "Subject masks")
        nodes[13] = Node("PreviewImage", {"images": link(12)}, 5, "Subject masks", title="Subject masks, one per step")
        groups.append("Subject masks")
    return Workflow(note, groups, nodes, align={"Subject": "Subject photo"})


def two_subjects() -> Workflow:
    wf = single_subject()
    wf.nodes[14] = Node("LoadImage", {"image": "subject2.png", "upload": "image"}, 0, "Subject photo",
                        title="Load Image (second subject)")
    wf.nodes[15] = Node("CustomContrastEncodeSubject", {"customcontrast": link(4), "clip_vision": link(2),
                                                        "image": link(14), "average": True, "center_crop": True},
                        1, "Subject", title="Encode Subject (second subject)")
    wf.nodes[6].values.update(subject2=link(15), prompt="<subject1> and <subject2> sitting on a sofa")
    wf.nodes = {k: wf.nodes[k] for k in (1, 2, 4, 3, 14, 5, 15, 6, 7, 8, 9, 10, 11)}
    wf.note = read_me(
        ("**SD1.5 — two subjects.** Two photos, two Encode Subject nodes: the first goes to Apply's `subject` and "
         "is `<subject1>` in the prompt, the second goes to `subject2` and is `<subject2>` (a third: `subject3`, "
         "`<subject3>`)."),
        ["**Load Image**, **Load Image (second subject)**: one photo of each subject."],
        "Lower Apply's `weight` (0.5–0.75) when the subjects override the prompt.")
    return wf


def segmented_reference() -> Workflow:
    wf = single_subject()
    wf.nodes[3] = Node("LoadImage", {"image": "subject_cutout.png", "upload": "image"}, 0, "Subject photo",
                       title="Load Image (cut-out subject)")
    wf.nodes[5].values.update(mask=link(3, 1), invert_mask=True)
    wf.note = read_me(
        ("**SD1.5 — segmented reference.** The subject photo is a PNG with the background cut out (transparent). "
         "Load Image's MASK goes to Encode Subject's `mask` with `invert_mask` on (Load Image's MASK is 1 where the "
         "image is transparent): the background becomes gray and the subject is cropped to 1.2× its box, as in "
         "training. Any MASK that is 1 on the subject works too, with `invert_mask` off."),
        ["**Load Image**: your subject cut out on a transparent background."],
        "Lower Apply's `weight` (0.5–0.75) when the subject overrides the prompt.")
    return wf


def lora() -> Workflow:
    wf = single_subject()
    wf.nodes[16] = Node("LoraLoader", {"model": link(1), "clip": link(1, 1), "lora_name": LORA,
                                       "strength_model": 0.8, "strength_clip": 0.8}, 1, "LoRA")
    wf.nodes[6].values.update(model=link(16), clip=link(16, 1))
    wf.nodes[7].values.update(clip=link(16, 1))
    wf.nodes = {k: wf.nodes[k] for k in (1, 2, 4, 3, 16, 5, 6, 7, 8, 9, 10, 11)}
    wf.groups = ["Models", "LoRA", "Subject photo", "Subject", "Prompt and size", "Sample", "Image"]
    wf.note = read_me(
        ("**SD1.5 — with a LoRA.** The LoRA is applied to the checkpoint's MODEL and CLIP first; Apply "
         "CustomContrast patches the LoRA'd model and encodes its prompt with the LoRA'd CLIP (the negative prompt "
         "too)."),
        ["**Load LoRA**: an SD1.5 LoRA (`models/loras`).", "**Load Image**: one photo of your subject."],
        ("A style LoRA and the subject both act; lower the LoRA's strengths or Apply's `weight` when one "
         "overrides the other."))
    return wf


def controlnet() -> Workflow:
    wf = single_subject()
    wf.nodes[17] = Node("ControlNetLoader", {"control_net_name": CONTROLNET}, 0, "Models")
    wf.nodes[18] = Node("LoadImage", {"image": "layout.png", "upload": "image"}, 0, "Layout picture",
                        title="Load Image (layout)")
    wf.nodes[19] = Node("Canny", {"image": link(18), "low_threshold": 0.4, "high_threshold": 0.8}, 1, "Edges")
    wf.nodes[20] = Node("ControlNetApplyAdvanced", {"positive": link(6, 1), "negative": link(7),
                                                    "control_net": link(17), "image": link(19), "strength": 0.8,
                                                    "start_percent": 0.0, "end_percent": 0.8}, 3, "ControlNet")
    wf.nodes[9].values.update(positive=link(20), negative=link(20, 1))
    wf.nodes[9].column, wf.nodes[10].column, wf.nodes[11].column = 4, 5, 6
    # the subject's region: Apply's attn_mask, 1 on the right half of the 512 px image
    wf.nodes[24] = Node("SolidMask", {"value": 0.0, "width": 512, "height": 512}, 0, "Subject region",
                        title="Whole image (0)")
    wf.nodes[25] = Node("SolidMask", {"value": 1.0, "width": 256, "height": 512}, 0, "Subject region",
                        title="Where the subject goes (1)")
    wf.nodes[26] = Node("MaskComposite", {"destination": link(24), "source": link(25), "x": 256, "y": 0,
                                          "operation": "add"}, 1, "Subject region", title="Subject region")
    wf.nodes[6].values.update(attn_mask=link(26))
    wf.nodes = {k: wf.nodes[k] for k in (1, 2, 4, 17, 3, 18, 24, 25, 5, 19, 26, 6, 7, 8, 20, 9, 10, 11)}
    wf.groups = ["Models", "Subject photo", "Subject", "Layout picture", "Edges", "Subject region",
                 "Prompt and size", "ControlNet", "Sample", "Image"]
    wf.align["Edges"] = "Layout picture"
    wf.note = read_me(
        ("**SD1.5 — with a ControlNet and a subject region.** A canny ControlNet keeps the layout of a second "
         "picture while CustomContrast draws the subject: Apply CustomContrast's positive and the negative prompt "
         "go through Apply ControlNet to the KSampler; the KSampler takes Apply CustomContrast's MODEL. Apply's "
         "`attn_mask` (here the right half, built from two Solid Masks) limits where the subject may appear; it "
         "is intersected with the subject masks CustomContrast makes while sampling."),
        ["**Load ControlNet Model**: an SD1.5 canny ControlNet (`models/controlnet`).",
         ("**Load Image**: one photo of your subject; **Load Image (layout)**: the picture whose edges the image "
          "should follow.")],
        ("Move or resize the region with *Where the subject goes* (its size) and *Subject region* (`x`, `y`), or "
         "paint one in the layout picture's mask editor and connect Load Image (layout)'s MASK instead. Lower the "
         "ControlNet's `strength` or `end_percent` when the edges leave no room for the subject."))
    return wf


def ipadapter() -> Workflow:
    wf = single_subject()
    wf.nodes[21] = Node("IPAdapterModelLoader", {"ipadapter_file": IPADAPTER}, 0, "Models")
    wf.nodes[22] = Node("CLIPVisionLoader", {"clip_name": IPADAPTER_CLIP_VISION}, 0, "Models",
                        title="Load CLIP Vision (for IPAdapter)")
    wf.nodes[2].title = "Load CLIP Vision (for CustomContrast)"
    wf.nodes[23] = Node("LoadImage", {"image": "style.png", "upload": "image"}, 0, "Style picture",
                        title="Load Image (style)")
    wf.nodes[24] = Node("IPAdapterAdvanced", {"model": link(1), "ipadapter": link(21), "image": link(23),
                                              "clip_vision": link(22), "weight": 0.6, "weight_type": "style transfer",
                                              "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0,
                                              "embeds_scaling": "V only"}, 1, "IPAdapter")
    wf.nodes[6].values.update(model=link(24), prompt="a photo of <subject> in a garden")
    wf.nodes = {k: wf.nodes[k] for k in (1, 2, 4, 21, 22, 3, 23, 24, 5, 6, 7, 8, 9, 10, 11)}
    wf.groups = ["Models", "Subject photo", "Subject", "Style picture", "IPAdapter", "Prompt and size", "Sample",
                 "Image"]
    wf.align["IPAdapter"] = "Style picture"
    wf.note = read_me(
        ("**SD1.5 — chained with IPAdapter_plus.** IPAdapter Advanced patches the checkpoint's MODEL with a style "
         "picture, then Apply CustomContrast patches that MODEL with the subject; the KSampler takes Apply's "
         "MODEL. Needs the ComfyUI_IPAdapter_plus custom nodes."),
        [("**IPAdapter Model Loader**: an SD1.5 IPAdapter model (`models/ipadapter`), and in **Load CLIP Vision "
          "(for IPAdapter)** the CLIP-vision model it needs (ViT-H/14 for the SD1.5 models but "
          "`ip-adapter_sd15_vit-G`); one loader can serve both when it is the same file."),
         "**Load Image**: one photo of your subject; **Load Image (style)**: the style picture."],
        ("Lower IPAdapter's `weight` when the style picture's content leaks in; lower Apply's `weight` when the "
         "subject overrides the prompt."))
    return wf


def saved_subject() -> Workflow:
    wf = single_subject()
    wf.nodes[25] = Node("CustomContrastSaveSubject", {"subject": link(5), "filename_prefix": "customcontrast/subject"},
                        2, "First run: save the subject")
    wf.nodes[26] = Node("CustomContrastLoadSubject", {"customcontrast": link(4), "subject_file": SAVED_SUBJECT}, 1,
                        "Later runs: load it")
    wf.nodes[6].values.update(subject=link(26))
    wf.nodes = {k: wf.nodes[k] for k in (1, 2, 4, 3, 5, 26, 25, 6, 7, 8, 9, 10, 11)}
    wf.groups = ["Models", "Subject photo", "Subject", "Later runs: load it", "First run: save the subject",
                 "Prompt and size", "Sample", "Image"]
    wf.note = read_me(
        ("**SD1.5 — save a subject once, reuse it.** Encode Subject's SUBJECT goes to **Save Subject**, which writes "
         "it to `output/customcontrast/subject_00001_.safetensors`; Apply takes the subject from **Load Subject**, "
         "so later runs need neither the photo nor the CLIP-vision model.\n\n"
         "1. Queue once: Save Subject writes the file (Load Subject is flagged until its file exists; ComfyUI "
         "runs the rest).\n"
         "2. Copy the file to ComfyUI's `input/` folder, press R to refresh and pick it in Load Subject.\n"
         "3. Bypass (Ctrl+B) Load Image, Encode Subject and Save Subject, and queue: the subject comes from the "
         "file. The file checks itself against the CustomContrast checkpoint."),
        ["**Load Image**: one photo of your subject (first run only)."],
        "Lower Apply's `weight` (0.5–0.75) when the subject overrides the prompt.")
    return wf


def sdxl_single_subject() -> Workflow:
    return single_subject("sdxl")


WORKFLOWS = {
    "sd15_single_subject": single_subject,
    "sdxl_single_subject": sdxl_single_subject,
    "sd15_two_subjects": two_subjects,
    "sd15_mask_preview": lambda: single_subject(preview=True),
    "sd15_segmented_reference": segmented_reference,
    "sd15_lora": lora,
    "sd15_controlnet": controlnet,
    "sd15_ipadapter": ipadapter,
    "sd15_saved_subject": saved_subject,
}
NEEDS_IPADAPTER = {"sd15_ipadapter"}


# Node definitions from ComfyUI --------------------------------------------------------------------------------

def load_node_infos(comfyui: str, ipadapter: str | None) -> dict[str, dict]:
    """Every registered node's definition as ComfyUI's /object_info gives it to the frontend."""
    sys.path.insert(0, comfyui)
    os.chdir(comfyui)
    import comfy.options
    comfy.options.enable_args_parsing(False) if hasattr(comfy.options, "enable_args_parsing") else None
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import folder_paths
    from comfy_api.internal import _ComfyNodeInternal

    import nodes

    custom = Path(tempfile.mkdtemp(prefix="cc_workflow_nodes_"))
    (custom / PACKAGE).symlink_to(REPO, target_is_directory=True)
    if ipadapter:
        (custom / "ComfyUI_IPAdapter_plus").symlink_to(Path(ipadapter).resolve(), target_is_directory=True)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom)], set())
    logging.disable(logging.WARNING)   # ComfyUI's own import warnings (e.g. torchaudio) are not ours
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    finally:
        logging.disable(logging.NOTSET)
    if "CustomContrastApply" not in nodes.NODE_CLASS_MAPPINGS:
        sys.exit("this extension's nodes did not register in ComfyUI: start ComfyUI with it to see why")

    def info(cls) -> dict:
        if issubclass(cls, _ComfyNodeInternal):
            return cls.GET_NODE_INFO_V1()
        inputs = cls.INPUT_TYPES()
        return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                "output": list(cls.RETURN_TYPES), "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
                "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(cls.__name__)}
    return {name: info(cls) for name, cls in nodes.NODE_CLASS_MAPPINGS.items()}


@dataclass
class Spec:
    sockets: list[tuple[str, str, bool]]        # (name, type, optional)
    widgets: list[tuple[str, str, object, bool]]   # (name, input type, default, multiline)
    outputs: list[tuple[str, str]]


_NO_DEFAULT = object()


def spec_of(info: dict) -> Spec:
    """Sockets and widgets in the frontend's order: the inputs in required-then-optional order; INT inputs with
    control_after_generate get a control widget after them; an image upload adds an ``upload`` widget last."""
    sockets, widgets, upload = [], [], False
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            spec = info["input"][section][name]
            typ, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            combo = isinstance(typ, list) or typ == "COMBO"
            if (combo or typ in WIDGET_TYPES) and not opts.get("forceInput"):
                default = opts.get("default", _NO_DEFAULT)
                widgets.append((name, "COMBO" if combo else typ, default, bool(opts.get("multiline"))))
                if typ == "INT" and opts.get("control_after_generate"):
                    widgets.append(("control_after_generate", "COMBO", "fixed", False))
                upload = upload or bool(opts.get("image_upload"))
            else:
                sockets.append((name, typ, section == "optional"))
    if upload:
        widgets.append(("upload", "IMAGEUPLOAD", "image", False))
    return Spec(sockets, widgets, list(zip(info["output_name"], info["output"])))


def min_height(spec: Spec) -> int:
    """The frontend's minimum node height (below the title) for these sockets and widgets."""
    rows = max(len(spec.sockets), len(spec.outputs), 1) * SLOT_HEIGHT
    widgets = sum(MULTILINE_HEIGHT if multiline else WIDGET_HEIGHT for *_, multiline in spec.widgets)
    return rows + widgets + (14 if spec.widgets else 6)


# Building the two formats --------------------------------------------------------------------------------------

def resolve(wf: Workflow, specs: dict[str, Spec], name: str) -> dict[int, dict]:
    """Each node's widget values (given or the schema's default) and links, checked against its schema."""
    out = {}
    for nid, node in wf.nodes.items():
        spec = specs[node.cls]
        known = {s[0] for s in spec.sockets} | {w[0] for w in spec.widgets}
        unknown = set(node.values) - known
        if unknown:
            raise ValueError(f"{name}: node {nid} ({node.cls}) has no input {sorted(unknown)}")
        values = {}
        for wname, typ, default, _ in spec.widgets:
            value = node.values.get(wname, default)
            if value is _NO_DEFAULT:
                raise ValueError(f"{name}: node {nid} ({node.cls}) must set {wname} (a list without a default)")
            values[wname] = value
        links = {}
        for sname, typ, optional in spec.sockets:
            if sname not in node.values:
                if not optional:
                    raise ValueError(f"{name}: node {nid} ({node.cls}) input {sname} is not connected")
                continue
            src, slot = node.values[sname]
            src_type = specs[wf.nodes[src].cls].outputs[slot][1]
            if src_type != typ and "*" not in (src_type, typ):
                raise ValueError(f"{name}: {src_type} from node {src} into {nid}.{sname} ({typ})")
            if wf.nodes[src].column >= node.column:
                raise ValueError(f"{name}: node {src} must sit in a column left of node {nid} (wires run right)")
            links[sname] = (src, slot, typ)
        out[nid] = {"values": values, "links": links}
    return out


def layout(wf: Workflow, specs: dict[str, Spec], top: float) -> tuple[dict, dict, dict]:
    """Positions and sizes of the nodes, and the groups' rectangles."""
    heights = {nid: min_height(specs[n.cls]) + n.extra_height + IMAGE_NODE_EXTRA.get(n.cls, 0)
               for nid, n in wf.nodes.items()}
    columns = sorted({n.column for n in wf.nodes.values()})
    assert columns == list(range(len(columns))), "columns must be 0, 1, 2, ... without gaps"
    widths = {c: max(NODE_WIDTH + (80 if n.cls in ("CustomContrastApply", "SaveImage", "PreviewImage") else 0)
                     for n in wf.nodes.values() if n.column == c) for c in columns}
    xs, x = {}, 0.0
    for c in columns:
        xs[c], x = x, x + widths[c] + COLUMN_GAP
    bottoms = {c: top for c in columns}
    pos, size, groups = {}, {}, {}
    for g in wf.groups:
        members = [nid for nid, n in wf.nodes.items() if n.group == g]
        cols = range(min(wf.nodes[m].column for m in members), max(wf.nodes[m].column for m in members) + 1)
        g_top = max(bottoms[c] for c in cols)
        if g in wf.align:
            g_top = max(g_top, groups[wf.align[g]][1])
        g_bottom = g_top
        for c in cols:
            y = g_top + GROUP_TITLE_HEIGHT + GROUP_PAD
            for m in (m for m in members if wf.nodes[m].column == c):
                pos[m] = [xs[c], y + TITLE_HEIGHT]
                size[m] = [widths[c], heights[m]]
                y += TITLE_HEIGHT + heights[m] + NODE_GAP
                g_bottom = max(g_bottom, pos[m][1] + heights[m] + GROUP_PAD)
        left, right = xs[cols[0]] - GROUP_PAD, xs[cols[-1]] + widths[cols[-1]] + GROUP_PAD
        groups[g] = [left, g_top, right - left, g_bottom - g_top]
        for c in cols:
            bottoms[c] = g_bottom + GROUP_GAP
    return pos, size, groups


def note_size(text: str, width: int) -> list[int]:
    """Room for the note's markdown as the frontend draws it (10 px type: about 5.2 px a character, 12 px a
    line, 70 px of paragraph and list spacing), with a margin; the browser test checks that it fits."""
    return [width, 22 + 70 + 40 + -(-12 * len(text) // int(width / 5.2))]


def to_ui(wf: Workflow, specs: dict[str, Spec], name: str) -> dict:
    resolved = resolve(wf, specs, name)
    note_id = max(wf.nodes) + 1
    n_size = note_size(wf.note, 2 * NODE_WIDTH + COLUMN_GAP + 80)
    pos, size, group_rects = layout(wf, specs, top=n_size[1] + 60)
    links, incoming, outgoing = [], {}, {}
    for nid, r in resolved.items():
        socket_names = [s[0] for s in specs[wf.nodes[nid].cls].sockets]
        for sname, (src, slot, typ) in r["links"].items():
            link_id = len(links) + 1
            links.append([link_id, src, slot, nid, socket_names.index(sname), typ])
            incoming[(nid, sname)] = link_id
            outgoing.setdefault((src, slot), []).append(link_id)
    ui_nodes = [{"id": note_id, "type": "MarkdownNote", "pos": [0, 0], "size": n_size, "flags": {}, "order": 0,
                 "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": [wf.note],
                 "title": "Read me", "color": "#432", "bgcolor": "#653"}]
    for order, (nid, node) in enumerate(wf.nodes.items(), start=1):
        spec, r = specs[node.cls], resolved[nid]
        inputs = [dict({"name": s, "type": t, "link": incoming.get((nid, s))}, **({"shape": 7} if opt else {}))
                  for s, t, opt in spec.sockets]
        inputs += [{"name": w, "type": t, "widget": {"name": w}, "link": None}
                   for w, t, _, _ in spec.widgets if w != "control_after_generate"]
        outputs = [{"name": o, "type": t, "links": outgoing.get((nid, slot), []), "slot_index": slot}
                   for slot, (o, t) in enumerate(spec.outputs)]
        ui = {"id": nid, "type": node.cls, "pos": pos[nid], "size": size[nid], "flags": {}, "order": order,
              "mode": 0, "inputs": inputs, "outputs": outputs, "properties": {"Node name for S&R": node.cls},
              "widgets_values": list(r["values"].values())}
        if node.title:
            ui["title"] = node.title
        ui_nodes.append(ui)
    groups = [{"id": i + 1, "title": f"{i + 1} · {g}", "bounding": group_rects[g], "color": "#3f789e",
               "font_size": 24, "flags": {}} for i, g in enumerate(wf.groups)]
    x1 = max(r[0] + r[2] for r in group_rects.values())
    y1 = max(r[1] + r[3] for r in group_rects.values())
    scale = round(min(1.0, 1500 / (x1 + 40), 780 / (y1 + 40)), 3)
    return {"last_node_id": note_id, "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": groups, "config": {}, "extra": {"ds": {"scale": scale, "offset": [80 / scale, 100 / scale]}},
            "version": 0.4}


def to_api(wf: Workflow, specs: dict[str, Spec], name: str) -> dict:
    resolved = resolve(wf, specs, name)
    api = {}
    for nid, node in sorted(wf.nodes.items()):
        inputs = {}
        for sname, *_ in specs[node.cls].sockets:
            if sname in resolved[nid]["links"]:
                src, slot, _ = resolved[nid]["links"][sname]
                inputs[sname] = [str(src), slot]
        inputs.update((k, v) for k, v in resolved[nid]["values"].items() if k not in UI_ONLY_WIDGETS)
        api[str(nid)] = {"class_type": node.cls, "inputs": inputs}
    return api


def render(name: str, infos: dict[str, dict]) -> dict[Path, str]:
    wf = WORKFLOWS[name]()
    specs = {n.cls: spec_of(infos[n.cls]) for n in wf.nodes.values()}
    return {HERE / f"{name}.json": json.dumps(to_ui(wf, specs, name), indent=1) + "\n",
            HERE / "api" / f"{name}.json": json.dumps(to_api(wf, specs, name), indent=1) + "\n"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    args = parser.parse_args()
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui or not Path(comfyui, "nodes.py").is_file():
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout: the widgets come from the registered node classes")
    ipadapter = os.environ.get("IPADAPTER_PLUS_PATH")
    if ipadapter and not Path(ipadapter, "IPAdapterPlus.py").is_file():
        sys.exit(f"IPADAPTER_PLUS_PATH={ipadapter} is not a ComfyUI_IPAdapter_plus folder")
    infos = load_node_infos(str(Path(comfyui).resolve()), ipadapter)
    stale = []
    for name in WORKFLOWS:
        if name in NEEDS_IPADAPTER and not ipadapter:
            print(f"{name}: left as it is (set IPADAPTER_PLUS_PATH to regenerate or check it)")
            continue
        for path, text in render(name, infos).items():
            if path.exists() and path.read_text() == text:
                continue
            stale.append(path.relative_to(REPO))
            if not args.check:
                path.write_text(text)
    if stale:
        print(("out of date (run python workflows/make_workflows.py): " if args.check else "wrote: ")
              + ", ".join(map(str, stale)))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
