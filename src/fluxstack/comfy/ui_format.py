"""API-format graph -> ComfyUI's UI (LiteGraph) format, using a server's node definitions.

The API format is what /api/prompt runs; the UI format is what a browser loads (positions,
links, widget values in the node's declared order). Widget order and extra widgets (a seed's
"control after generate", LoadImage's upload button) come from /api/object_info, so the
result matches the ComfyUI it was made against — `fluxstack comfy ui` regenerates it.
"""

from __future__ import annotations

from typing import Any

from fluxstack.comfy.workflows import Graph
from fluxstack.errors import UsageError

VALUE_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN, ROW = 360, 220


def _depths(graph: Graph) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str, trail: tuple[str, ...]) -> int:
        if node_id in depth:
            return depth[node_id]
        if node_id in trail:
            raise UsageError(f"the workflow has a cycle through node {node_id}")
        parents = [v[0] for v in graph[node_id].get("inputs", {}).values() if isinstance(v, list)]
        depth[node_id] = 1 + max((visit(str(p), (*trail, node_id)) for p in parents), default=-1)
        return depth[node_id]

    for node_id in graph:
        visit(node_id, ())
    return depth


def _input_specs(spec: dict[str, Any]) -> list[tuple[str, Any, dict[str, Any]]]:
    out = []
    for section in ("required", "optional"):
        declared = spec.get("input", {}).get(section, {})
        for name in spec.get("input_order", {}).get(section, list(declared)):
            config = declared[name]
            out.append((name, config[0], config[1] if len(config) > 1 else {}))
    return out


def to_ui(graph: Graph, object_info: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted({n["class_type"] for n in graph.values()} - set(object_info))
    if unknown:
        raise UsageError(f"this ComfyUI does not know the node type(s) {', '.join(unknown)}")
    depth = _depths(graph)
    ids = sorted(graph, key=lambda i: (depth[i], int(i)))
    rows: dict[int, int] = {}
    links: list[list[Any]] = []
    outgoing: dict[tuple[str, int], list[int]] = {}
    nodes = []
    for order, node_id in enumerate(ids):
        node = graph[node_id]
        spec = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, kind, options in _input_specs(spec):
            value = node.get("inputs", {}).get(name)
            is_widget = isinstance(kind, list) or kind in VALUE_TYPES
            if isinstance(value, list):
                origin, slot = str(value[0]), int(value[1])
                link_id = len(links) + 1
                links.append([link_id, int(origin), slot, int(node_id), len(inputs),
                              object_info[graph[origin]["class_type"]]["output"][slot]])
                outgoing.setdefault((origin, slot), []).append(link_id)
                entry: dict[str, Any] = {"name": name, "type": "COMBO" if isinstance(kind, list) else kind,
                                         "link": link_id}
                if is_widget:
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            elif is_widget:
                widgets.append(value if value is not None else options.get("default"))
                if options.get("control_after_generate"):
                    widgets.append("fixed")  # the graph's seed stays what the file says
                if options.get("image_upload"):
                    widgets.append("image")
            else:
                inputs.append({"name": name, "type": kind, "link": None})
        column = depth[node_id]
        row = rows.get(column, 0)
        rows[column] = row + 1
        title = node.get("_meta", {}).get("title")
        nodes.append({
            "id": int(node_id), "type": node["class_type"], "pos": [40 + column * COLUMN, 40 + row * ROW],
            "size": [320, 130], "flags": {}, "order": order, "mode": 0, "inputs": inputs,
            "outputs": [{"name": out_name, "type": out_type, "links": None, "slot_index": slot}
                        for slot, (out_type, out_name) in enumerate(zip(spec["output"], spec["output_name"],
                                                                            strict=True))],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets,
            **({"title": title} if title and title != spec.get("display_name") else {}),
        })
    for item in nodes:
        for output in item["outputs"]:
            output["links"] = outgoing.get((str(item["id"]), output["slot_index"]), [])
    return {"last_node_id": max(int(i) for i in graph), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}
