"""Checks of a UI workflow as a frontend shows it: each returns a list of problems (empty when it is right).

``shown`` is what the frontend reports after loading ``saved`` (tests/test_workflows_browser.py) or, without a
browser, the saved file's own geometry (``as_saved``): nodes with ``rect`` (title bar included), ``size``,
``widgets`` and ``inputs``; links; groups with ``rect`` and ``title_height``.
"""
from __future__ import annotations

TITLE_HEIGHT = 30                  # LiteGraph.NODE_TITLE_HEIGHT
MIN_IMAGE_NODE = (320, 320)        # Save Image / Preview Image: room for the picture, or a grid of mask frames


def _intersect(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _inside(a, b) -> bool:
    return b[0] <= a[0] and a[0] + a[2] <= b[0] + b[2] and b[1] <= a[1] and a[1] + a[3] <= b[1] + b[3]


def _label(node) -> str:
    return f"{node['title']} (#{node['id']})"


def missing_nodes(saved: dict, shown: dict) -> list[str]:
    registered = set(shown["registered"])
    problems = [f"node #{n['id']}: type {n['type']} is not registered" for n in saved["nodes"]
                if n["type"] not in registered]
    problems += [f"node #{n['id']} ({n['type']}) has errors" for n in shown["nodes"] if n["has_errors"]]
    if len(shown["nodes"]) != len(saved["nodes"]):
        problems.append(f"{len(saved['nodes'])} nodes saved, {len(shown['nodes'])} shown")
    return problems


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= 1e-9 * max(1.0, abs(a))
    return a == b


def widget_problems(saved: dict, shown: dict) -> list[str]:
    problems, by_id = [], {n["id"]: n for n in shown["nodes"]}
    for node in saved["nodes"]:
        live = by_id.get(node["id"])
        if live is None:
            continue
        stored, widgets = node.get("widgets_values", []), live["widgets"]
        if len(stored) != len(widgets):
            problems.append(f"{_label(live)}: the file stores {len(stored)} widget values, the node has "
                            f"{len(widgets)} widgets {[w[0] for w in widgets]}")
        problems += [f"{_label(live)}: widget {wname} is {value!r}, the file saved {want!r}"
                     for (wname, value), want in zip(widgets, stored) if not _same(value, want)]
    return problems


def link_problems(saved: dict, shown: dict) -> list[str]:
    problems, nodes = [], {n["id"]: n for n in shown["nodes"]}
    names = {n["id"]: {i["link"]: i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
             for n in saved["nodes"]}
    live = {link[0]: link for link in shown["links"]}
    for link_id, origin, origin_slot, target, target_slot, _ in saved["links"]:
        got = live.get(link_id)
        if got is None or got[1:] != [origin, origin_slot, target, target_slot]:
            problems.append(f"link {link_id} ({origin}:{origin_slot} -> {target}:{target_slot}) is shown as {got}")
            continue
        arrived = nodes[target]["inputs"][target_slot][0] if target_slot < len(nodes[target]["inputs"]) else None
        if arrived != names[target].get(link_id):
            problems.append(f"link {link_id} into {_label(nodes[target])} arrives at {arrived!r}, "
                            f"saved for {names[target].get(link_id)!r}")
    return problems


def layout_problems(saved: dict, shown: dict) -> list[str]:
    problems, nodes = [], shown["nodes"]
    sizes = {n["id"]: n["size"] for n in saved["nodes"]}
    problems += [f"{_label(n)} is drawn {n['size']}, saved {sizes[n['id']]}: the frontend enlarged it"
                 for n in nodes if any(abs(a - b) > 0.5 for a, b in zip(n["size"], sizes.get(n["id"], n["size"])))]
    problems += [f"{_label(a)} overlaps {_label(b)}: {a['rect']} and {b['rect']}"
                 for i, a in enumerate(nodes) for b in nodes[i + 1:] if _intersect(a["rect"], b["rect"])]
    problems += [f"{_label(n)} is {n['size']}: too small to show its images (at least {MIN_IMAGE_NODE})"
                 for n in nodes if n["type"] in ("SaveImage", "PreviewImage")
                 and (n["size"][0] < MIN_IMAGE_NODE[0] or n["size"][1] < MIN_IMAGE_NODE[1])]
    by_id = {n["id"]: n for n in nodes}
    for _, origin, _, target, _ in shown["links"]:
        a, b = by_id[origin], by_id[target]
        if a["rect"][0] + a["rect"][2] >= b["rect"][0]:
            problems.append(f"the wire {_label(a)} -> {_label(b)} runs backwards or straight down "
                            f"(output at x={a['rect'][0] + a['rect'][2]:.0f}, input at x={b['rect'][0]:.0f})")
    groups = shown["groups"]
    problems += [f"groups {g['title']!r} and {h['title']!r} overlap"
                 for i, g in enumerate(groups) for h in groups[i + 1:] if _intersect(g["rect"], h["rect"])]
    for g in groups:
        x, y, w, _ = g["rect"]
        title_bar = [x, y, w, g["title_height"]]
        for n in nodes:
            if _intersect(n["rect"], g["rect"]) and not _inside(n["rect"], g["rect"]):
                problems.append(f"{_label(n)} lies across the border of group {g['title']!r}")
            elif _intersect(n["rect"], title_bar):
                problems.append(f"{_label(n)} covers the title of group {g['title']!r}")
    return problems


def note_problems(notes: list[dict]) -> list[str]:
    return [f"{n['title']} (#{n['id']}): its text takes {n['content']} px, the note shows {n['room']} px"
            for n in notes if n["content"] > n["room"]]


def all_problems(saved: dict, shown: dict) -> list[str]:
    return missing_nodes(saved, shown) + widget_problems(saved, shown) + link_problems(saved, shown) \
        + layout_problems(saved, shown)


def as_saved(saved: dict) -> dict:
    """The saved file's geometry in the shape the browser reports (for the checks that need no browser)."""
    nodes = [{"id": n["id"], "type": n["type"], "title": n.get("title", n["type"]), "size": n["size"],
              "rect": [n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["size"][0], n["size"][1] + TITLE_HEIGHT],
              "inputs": [[i["name"], i.get("link")] for i in n.get("inputs", [])]} for n in saved["nodes"]]
    groups = [{"title": g["title"], "rect": g["bounding"], "title_height": g.get("font_size", 24) * 1.4}
              for g in saved.get("groups", [])]
    return {"nodes": nodes, "links": [link[:5] for link in saved["links"]], "groups": groups}
