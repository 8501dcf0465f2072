"""The example workflows in workflows/ without a browser: the saved layout (no two nodes overlap at their saved
sizes, wires run left to right, groups hold their nodes), the UI and API copies agree, every loader shows a
placeholder to pick, each UI workflow has its template thumbnail; with COMFYUI_PATH, the files are what
workflows/make_workflows.py writes from the registered node classes. What the frontend makes of them:
test_workflows_browser.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from workflow_checks import as_saved, layout_problems

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
UI_WORKFLOWS = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
LOADER_FILES = {"CheckpointLoaderSimple": "ckpt_name", "CLIPVisionLoader": "clip_name",
                "CustomContrastLoader": "checkpoint", "LoraLoader": "lora_name",
                "ControlNetLoader": "control_net_name", "IPAdapterModelLoader": "ipadapter_file"}
UI_ONLY = ("control_after_generate", "upload")


def ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def note(name: str) -> str:
    (text,) = [n["widgets_values"][0] for n in ui(name)["nodes"] if n["type"] == "MarkdownNote"]
    return text


def widget_names(node: dict) -> list[str]:
    """The widget names of a saved node, in widgets_values order (a seed's control widget follows it)."""
    names = []
    for i in node["inputs"]:
        if "widget" in i:
            names.append(i["name"])
            if i["name"] in ("seed", "noise_seed"):
                names.append("control_after_generate")
    return names


def test_the_workflow_folders_hold_the_same_workflows():
    assert UI_WORKFLOWS == sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json"))
    assert len(UI_WORKFLOWS) >= 8


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_saved_layout_has_no_overlap_and_wires_run_left_to_right(name):
    saved = ui(name)
    problems = layout_problems(saved, as_saved(saved))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_ui_and_api_copies_agree(name):
    saved, prompt = ui(name), api(name)
    nodes = {str(n["id"]): n for n in saved["nodes"] if n["type"] != "MarkdownNote"}
    assert set(nodes) == set(prompt)
    for nid, node in nodes.items():
        assert prompt[nid]["class_type"] == node["type"]
        names = widget_names(node)
        assert len(names) == len(node["widgets_values"]), (nid, names, node["widgets_values"])
        widgets = {k: v for k, v in zip(names, node["widgets_values"]) if k not in UI_ONLY}
        links = {i["name"]: next([str(l[1]), l[2]] for l in saved["links"] if l[0] == i["link"])
                 for i in node["inputs"] if i.get("link") is not None}
        assert prompt[nid]["inputs"] == {**links, **widgets}, nid


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_every_loader_shows_a_file_name_to_pick_and_the_note_is_this_workflows(name):
    saved = ui(name)
    for node in saved["nodes"]:
        if node["type"] in LOADER_FILES:
            value = dict(zip(widget_names(node), node["widgets_values"]))[LOADER_FILES[node["type"]]]
            assert value.startswith("pick-"), (node["type"], value)
    notes = [note(other) for other in UI_WORKFLOWS]
    assert notes.count(note(name)) == 1


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_every_workflow_has_a_small_template_thumbnail(name):
    thumbnail = WORKFLOWS / f"{name}.jpg"     # ComfyUI's frontend fetches <name>.jpg beside <name>.json
    assert thumbnail.is_file() and thumbnail.read_bytes()[:3] == b"\xff\xd8\xff"
    assert thumbnail.stat().st_size < 100_000


def test_files_are_what_make_workflows_writes():
    if not os.environ.get("COMFYUI_PATH"):
        pytest.skip("COMFYUI_PATH is not set: make_workflows.py reads the widgets from ComfyUI's registered nodes")
    result = subprocess.run([sys.executable, str(WORKFLOWS / "make_workflows.py"), "--check"], cwd=REPO, check=False,
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_segmented_reference_workflow_runs_on_a_cut_out_photo_with_a_gray_background(monkeypatch):
    """The segmented-reference API workflow in a real ComfyUI (COMFYUI_PATH): Load Image's MASK of an RGBA cut-out
    reaches Encode Subject inverted, so CLIP vision sees the subject on gray, and the run succeeds."""
    from comfy_env import comfyui, model_files, run_prompt

    env = comfyui()   # skips without COMFYUI_PATH
    import numpy as np
    from PIL import Image
    from test_comfyui_nodes import DREAMBENCH, prompt_for

    files = model_files()
    photo = DREAMBENCH / "dog" / "00.jpg"
    if not photo.exists():
        pytest.skip(f"reference photo {photo} missing")
    rgb = np.asarray(Image.open(photo).convert("RGB").resize((256, 256)))
    yy, xx = np.mgrid[:256, :256]
    alpha = (((yy - 128) / 100.0) ** 2 + ((xx - 128) / 80.0) ** 2 <= 1.0).astype(np.uint8) * 255
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(env.input_dir / "subject_cutout.png")
    subject = sys.modules[next(m for m in sys.modules if m.endswith("comfyui-customcontrast.nodes.subject"))]
    seen, original = [], subject.clip_hidden
    monkeypatch.setattr(subject, "clip_hidden", lambda cv, image, *args: seen.append(image) or
                        original(cv, image, *args))
    prompt = prompt_for(files, "sd15_segmented_reference")
    assert prompt["5"]["inputs"]["mask"] == ["3", 1] and prompt["5"]["inputs"]["invert_mask"] is True
    ok, outputs, messages = run_prompt(prompt)
    errors = [m[1].get("exception_message") for m in messages if m[0] == "execution_error"]
    assert ok, (outputs, errors)
    assert outputs["11"]["images"][0]["type"] == "output"
    reference = seen[0][0]   # the photo CLIP vision encodes: the subject cropped, its corners gray
    assert float((reference[0, 0] - 0.5).abs().max()) < 1e-6 and float((reference[-1, -1] - 0.5).abs().max()) < 1e-6
    assert float((reference - 0.5).abs().max()) > 0.1   # the subject itself is not gray
