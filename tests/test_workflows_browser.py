"""Every UI workflow in workflows/ opened in ComfyUI's real frontend, in headless Chromium.

A real ComfyUI server (COMFYUI_PATH, on the CPU, a free port, this repository linked into its custom_nodes as
``comfyui-customcontrast``) serves its frontend; Playwright drives Debian's ``chromium``. For each workflow,
after the frontend has loaded it and sized its nodes:

- no node type is missing (IPAdapter_plus nodes need IPADAPTER_PLUS_PATH: that workflow is skipped without it);
- every node's widgets are the ones the workflow saved, in order, with the saved values (a value the file
  does not store shows up as a widget the file lacks);
- every link arrives at the input it was saved for;
- every node is drawn at its saved size (the frontend did not have to enlarge it), no two nodes' rectangles
  (title bar included) overlap, every wire runs left to right, groups do not overlap one another and a node
  is either wholly inside a group, below its title, or clear of it;
- the template list ComfyUI serves for ``workflows/`` names every UI workflow, each with its thumbnail.

Screenshots go to a ``workflow_screenshots`` folder under pytest's tmp path. With
CUSTOMCONTRAST_UPDATE_WORKFLOW_IMAGES=1 the test also rewrites the template thumbnails (workflows/<name>.jpg)
and the README picture (docs/images/workflow_sd15_single_subject.png).

Skipped, with the reason, without COMFYUI_PATH, the ``playwright`` package or a Chromium binary
(CHROMIUM_PATH, default /usr/bin/chromium). Setup: docs/testing.md.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from comfy_env import ipadapter_plus_path
from workflow_checks import (
    all_problems,
    layout_problems,
    note_problems,
    widget_problems,
)

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
MODULE = "comfyui-customcontrast"    # the folder name the README's install step gives the clone
UI_WORKFLOWS = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
IPADAPTER_TYPES = ("IPAdapter",)     # node types starting with this come from ComfyUI_IPAdapter_plus
UPDATE_IMAGES = os.environ.get("CUSTOMCONTRAST_UPDATE_WORKFLOW_IMAGES") == "1"
README_PICTURE = ("sd15_single_subject", REPO / "docs" / "images" / "workflow_sd15_single_subject.png")
VIEWPORT = {"width": 1600, "height": 900}


def _requirements() -> tuple[str, str]:
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        pytest.skip("COMFYUI_PATH is not set: the browser test serves a real ComfyUI's frontend (docs/testing.md)")
    if not Path(root, "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={root} is not a ComfyUI checkout (no main.py)")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                      "(pip install playwright; never `playwright install`)")
    chromium = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
    if not Path(chromium).is_file():
        pytest.skip(f"no Chromium at {chromium} (apt-get install -y chromium, or set CHROMIUM_PATH)")
    return str(Path(root).resolve()), chromium


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _input_images(folder: Path) -> None:
    """Every image the workflows load: an opaque photo-like picture, an RGBA cut-out, a grey mask."""
    from PIL import Image, ImageDraw

    names = {node["widgets_values"][0] for name in UI_WORKFLOWS
             for node in json.loads((WORKFLOWS / f"{name}.json").read_text())["nodes"]
             if node["type"] in ("LoadImage", "LoadImageMask")}
    for name in names:
        cutout = "cutout" in name
        image = Image.new("RGBA" if cutout else "RGB", (512, 512), (0, 0, 0, 0) if cutout else (196, 186, 168))
        draw = ImageDraw.Draw(image)
        draw.rounded_rectangle((150, 170, 362, 420), radius=40, fill=(176, 52, 44, 255))
        draw.ellipse((200, 90, 312, 202), fill=(222, 180, 120, 255))
        image.save(folder / name)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A ComfyUI server on the CPU with this repository (and IPAdapter_plus when given) as custom nodes."""
    root, _ = _requirements()
    base = tmp_path_factory.mktemp("comfyui_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / MODULE).symlink_to(REPO, target_is_directory=True)
    if ipadapter_plus_path():
        (base / "custom_nodes" / "ComfyUI_IPAdapter_plus").symlink_to(ipadapter_plus_path(), target_is_directory=True)
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(
        {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
         "LiteGraph.Canvas.MinFontSizeForLOD": 0}))
    (base / "input").mkdir()
    _input_images(base / "input")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    url = f"http://127.0.0.1:{port}"
    with open(base / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--disable-auto-launch", "--base-directory", str(base), "--disable-api-nodes",
                                 "--database-url", "sqlite:///:memory:"],
                                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    urllib.request.urlopen(url + "/system_stats", timeout=2).read()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail("ComfyUI did not start:\n" + (base / "server.log").read_text()[-4000:])
                    time.sleep(1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    _, chromium = _requirements()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT, device_scale_factor=2 if UPDATE_IMAGES else 1)
        page.goto(server + "/")
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph "
                               "&& window.LiteGraph.registered_node_types['CustomContrastApply']", timeout=180_000)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("workflow_screenshots")
    print(f"\nworkflow screenshots: {folder}")
    return folder


LOAD_AND_READ = """async ([workflow, name]) => {
    const app = window.app;
    await app.loadGraphData(workflow, true, true, name);
    const previews = () => app.graph._nodes.filter(n => n.type === 'LoadImage' || n.type === 'LoadImageMask');
    for (let i = 0; i < 100 && !previews().every(n => n.imgs && n.imgs.length && n.imgs[0].complete); i++)
        await new Promise(r => setTimeout(r, 100));
    for (let i = 0; i < 3; i++) {   // sizes settle while drawing (image previews, widgets)
        app.canvas.setDirty(true, true);
        app.canvas.draw(true, true);
        await new Promise(r => requestAnimationFrame(() => setTimeout(r, 50)));
    }
    const rect = n => { const b = n.boundingRect; return [b[0], b[1], b[2], b[3]]; };
    return {
        registered: Object.keys(LiteGraph.registered_node_types),
        nodes: app.graph._nodes.map(n => ({
            id: n.id, type: n.type, title: n.title, pos: [n.pos[0], n.pos[1]], size: [n.size[0], n.size[1]],
            rect: rect(n), has_errors: !!n.has_errors,
            widgets: (n.widgets || []).filter(w => !w.name.startsWith('$$')).map(w => [w.name, w.value]),
            inputs: (n.inputs || []).map(i => [i.name, i.link]),
        })),
        links: [...(app.graph.links instanceof Map ? app.graph.links.values() : Object.values(app.graph.links))]
            .map(l => [l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot]),
        groups: (app.graph._groups || []).map(g => ({title: g.title, rect: [...g._bounding],
                                                     title_height: g.titleHeight})),
    };
}"""

FIT_VIEW = """(margin) => {
    const app = window.app, nodes = app.graph._nodes, groups = app.graph._groups || [];
    const rects = nodes.map(n => n.boundingRect).concat(groups.map(g => g._bounding));
    const x0 = Math.min(...rects.map(r => r[0])), y0 = Math.min(...rects.map(r => r[1]));
    const x1 = Math.max(...rects.map(r => r[0] + r[2])), y1 = Math.max(...rects.map(r => r[1] + r[3]));
    const el = app.canvas.canvas, w = el.clientWidth, h = el.clientHeight;
    const left = 60, top = 90, bottom = 70;   // the side bar, the menu bar, the zoom controls
    const scale = Math.min((w - left - 2 * margin) / (x1 - x0), (h - top - bottom - 2 * margin) / (y1 - y0), 1.0);
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [(left + margin) / scale - x0 + ((w - left - 2 * margin) / scale - (x1 - x0)) / 2,
                            (top + margin) / scale - y0];
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    const [ox, oy] = app.canvas.ds.offset, box = el.getBoundingClientRect();
    const sx = x => box.left + (x + ox) * scale, sy = y => box.top + (y + oy) * scale;
    return {x: sx(x0) - 8, y: sy(y0) - 8, width: (x1 - x0) * scale + 16, height: (y1 - y0) * scale + 16};
}"""

NOTE_CONTENT = """() => window.app.graph._nodes.filter(n => n.type === 'MarkdownNote' || n.type === 'Note').map(n => {
    const el = n.widgets[0].element, text = el.querySelector('.tiptap') || el;
    const kids = [...text.children];
    const content = kids.length ? Math.max(...kids.map(k => k.offsetTop + k.offsetHeight)) : text.scrollHeight;
    return {title: n.title, id: n.id, content: content, room: text.clientHeight};
})"""


def load(page, workflow: dict, name: str) -> dict:
    return page.evaluate(LOAD_AND_READ, [workflow, name])


def _needs_ipadapter(workflow: dict) -> bool:
    return any(n["type"].startswith(IPADAPTER_TYPES) for n in workflow["nodes"])


def _save_picture(page, clip: dict, path: Path, size: tuple[int, int], kind: str) -> None:
    """The graph's part of the screen, fitted into ``size``: a JPEG thumbnail or a 128-colour PNG."""
    from PIL import Image

    raw = path.with_suffix(".raw.png")
    page.screenshot(path=str(raw), clip=clip)
    image = Image.open(raw).convert("RGB")
    raw.unlink()
    image.thumbnail(size, Image.LANCZOS)
    if kind == "jpg":
        image.save(path, "JPEG", quality=82, optimize=True)
    else:
        image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_workflow_opens_as_saved_and_nothing_overlaps(page, screenshots, name):
    saved = json.loads((WORKFLOWS / f"{name}.json").read_text())
    if _needs_ipadapter(saved) and not ipadapter_plus_path():
        pytest.skip("IPADAPTER_PLUS_PATH is not set to a ComfyUI_IPAdapter_plus folder: its nodes are missing")
    shown = load(page, saved, name)
    graph = page.evaluate(FIT_VIEW, 20)
    page.wait_for_timeout(300)
    page.screenshot(path=str(screenshots / f"{name}.png"))
    if UPDATE_IMAGES:
        _save_picture(page, graph, WORKFLOWS / f"{name}.jpg", (480, 360), "jpg")
        if name == README_PICTURE[0]:
            README_PICTURE[1].parent.mkdir(parents=True, exist_ok=True)
            _save_picture(page, graph, README_PICTURE[1], (1600, 1000), "png")
    notes = page.evaluate(NOTE_CONTENT)
    problems = all_problems(saved, shown) + note_problems(notes)
    assert not problems, "\n".join(problems)


def test_the_checks_fail_on_a_dropped_widget_value_an_overlap_a_backward_wire_and_a_long_note(page):
    """The checks above can fail: the single-subject workflow with Apply's last widget value dropped, Save Image
    moved onto Apply, Apply moved left of its inputs, and the note's text four times as long."""
    saved = json.loads((WORKFLOWS / "sd15_single_subject.json").read_text())
    apply = next(n for n in saved["nodes"] if n["type"] == "CustomContrastApply")
    save = next(n for n in saved["nodes"] if n["type"] == "SaveImage")

    dropped = copy.deepcopy(saved)
    next(n for n in dropped["nodes"] if n["id"] == apply["id"])["widgets_values"].pop()
    problems = widget_problems(dropped, load(page, dropped, "dropped widget"))
    assert any("stores 7 widget values" in p or "widget values, the node has" in p for p in problems), problems

    covered = copy.deepcopy(saved)
    moved = next(n for n in covered["nodes"] if n["id"] == save["id"])
    moved["pos"] = [apply["pos"][0], apply["pos"][1] + apply["size"][1] / 2]
    problems = layout_problems(covered, load(page, covered, "overlap"))
    assert any("Save Image" in p and "overlaps" in p for p in problems), problems

    backwards = copy.deepcopy(saved)
    leftmost = min(n["pos"][0] for n in saved["nodes"])
    next(n for n in backwards["nodes"] if n["id"] == apply["id"])["pos"][0] = leftmost - 1000
    problems = layout_problems(backwards, load(page, backwards, "backwards"))
    assert any("runs backwards" in p and "Apply CustomContrast" in p for p in problems), problems

    long_note = copy.deepcopy(saved)
    next(n for n in long_note["nodes"] if n["type"] == "MarkdownNote")["widgets_values"][0] *= 4
    load(page, long_note, "long note")
    page.evaluate(FIT_VIEW, 20)
    assert note_problems(page.evaluate(NOTE_CONTENT))


def test_template_cards_list_every_workflow_with_its_thumbnail(server, page, screenshots):
    """ComfyUI lists the .json files of a custom node's workflows/ folder as template cards and the frontend
    fetches each card's picture from /api/workflow_templates/<folder>/<name>.jpg (a jpg beside the json)."""
    templates = json.loads(urllib.request.urlopen(server + "/api/workflow_templates").read())
    assert sorted(templates.get(MODULE, [])) == UI_WORKFLOWS
    fetched = {}
    page.on("response", lambda r: fetched.__setitem__(r.url.rsplit("/", 1)[-1], r.status)
            if f"/workflow_templates/{MODULE}/" in r.url else None)
    page.keyboard.press("Escape")   # nothing else open
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    category = page.get_by_role("dialog").get_by_role("button", name=MODULE)
    try:
        category.click(timeout=30_000)
    except Exception:
        page.screenshot(path=str(screenshots / "template_cards_not_clickable.png"))
        raise
    cards = page.get_by_role("dialog").locator("img")
    cards.first.wait_for(timeout=30_000)
    page.screenshot(path=str(screenshots / "template_cards.png"))
    cards.first.hover()
    for _ in range(10):   # the grid shows a card (and loads its picture) once scrolled to
        if all(fetched.get(f"{name}.jpg") for name in UI_WORKFLOWS):
            break
        page.mouse.wheel(0, 400)
        page.wait_for_timeout(500)
    page.keyboard.press("Escape")
    assert {name: fetched.get(f"{name}.jpg") for name in UI_WORKFLOWS} == {name: 200 for name in UI_WORKFLOWS}
