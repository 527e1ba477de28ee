"""The shipped ComfyUI workflows: the index, API-format graphs, their model files and overrides.

A workflow is data (workflows/index.yaml + <name>.api.json + <name>.ui.json). This module
reads it, lists the model files a graph loads (loader node input -> store folder), checks them
against the manifest the workflow names, and applies `--set node.input=value` overrides.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fluxstack.datadirs import shipped_dir
from fluxstack.errors import UsageError
from fluxstack.manifest import Manifest, ManifestFile, load_manifest

WORKFLOWS_ENV = "FLUXSTACK_WORKFLOWS_DIR"

# Which input of which loader names a file in which store folder (ComfyUI's canonical names).
MODEL_INPUTS: dict[str, dict[str, str]] = {
    "UNETLoader": {"unet_name": "diffusion_models"},
    "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
    "CLIPLoader": {"clip_name": "text_encoders"},
    "VAELoader": {"vae_name": "vae"},
    "LoraLoaderModelOnly": {"lora_name": "loras"},
    "LoraLoader": {"lora_name": "loras"},
    "CLIPVisionLoader": {"clip_name": "clip_vision"},
    "StyleModelLoader": {"style_model_name": "style_models"},
}

Graph = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class ModelRef:
    node: str
    input: str
    folder: str
    filename: str

    @property
    def dest(self) -> str:
        return f"{self.folder}/{self.filename}"


@dataclass(frozen=True)
class Workflow:
    name: str
    description: str
    manifest: str
    api_path: Path
    ui_path: Path
    params: dict[str, list[str]] = field(default_factory=dict)

    def graph(self) -> Graph:
        return load_graph(self.api_path)

    def model_refs(self) -> list[ModelRef]:
        return model_refs(self.graph())

    def load_manifest(self) -> Manifest:
        return load_manifest(self.manifest)


def default_workflows_dir() -> Path:
    """$FLUXSTACK_WORKFLOWS_DIR, else ./workflows, else the checkout this package lives in."""
    return shipped_dir(WORKFLOWS_ENV, "workflows", "index.yaml")


def load_index(directory: Path | None = None) -> dict[str, Workflow]:
    root = directory or default_workflows_dir()
    index = root / "index.yaml"
    try:
        data = yaml.safe_load(index.read_text())
    except FileNotFoundError:
        raise UsageError(f"no workflow index at {index}; set {WORKFLOWS_ENV} to the folder with index.yaml") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{index} is not valid YAML: {exc}") from None
    workflows = {}
    for name, entry in (data or {}).get("workflows", {}).items():
        if not isinstance(entry, dict) or not entry.get("manifest"):
            raise UsageError(f"{index}: workflow {name!r} must name its manifest")
        params = {key: [str(t) for t in targets] for key, targets in (entry.get("params") or {}).items()}
        workflows[name] = Workflow(name, entry.get("description", ""), entry["manifest"],
                                   root / f"{name}.api.json", root / f"{name}.ui.json", params)
    return workflows


def find_workflow(name_or_path: str, directory: Path | None = None) -> tuple[Workflow | None, Graph]:
    """A shipped workflow by name, or any API-format JSON file by path (then no index entry)."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return None, load_graph(path)
    workflows = load_index(directory)
    if name_or_path not in workflows:
        raise UsageError(f"unknown workflow {name_or_path!r}; shipped: {', '.join(sorted(workflows))} "
                         "(or give the path of an API-format .json file)")
    workflow = workflows[name_or_path]
    return workflow, workflow.graph()


def load_graph(path: Path) -> Graph:
    try:
        graph = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"workflow file {path} does not exist") from None
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(graph, dict) or not all(isinstance(n, dict) and "class_type" in n for n in graph.values()):
        raise UsageError(f"{path} is not an API-format workflow (node id -> {{class_type, inputs}}); in ComfyUI "
                         "use Workflow > Export (API) to save one")
    return graph


def model_refs(graph: Graph) -> list[ModelRef]:
    refs = []
    for node_id, node in graph.items():
        for input_name, folder in MODEL_INPUTS.get(node["class_type"], {}).items():
            value = node.get("inputs", {}).get(input_name)
            if isinstance(value, str):
                refs.append(ModelRef(node_id, input_name, folder, value))
    return refs


def missing_from_manifest(workflow: Workflow, manifest: Manifest) -> list[ModelRef]:
    dests = {f.dest for f in manifest.files}
    return [ref for ref in workflow.model_refs() if ref.dest not in dests]


def manifest_entry(ref: ModelRef, manifest: Manifest) -> ManifestFile | None:
    return next((f for f in manifest.files if f.dest == ref.dest), None)


def resolve_target(graph: Graph, target: str) -> tuple[str, str]:
    """'NODE.input' where NODE is a node id or a node title -> (node id, input)."""
    node, sep, input_name = target.rpartition(".")
    if not sep or not node or not input_name:
        raise UsageError(f"--set {target!r}: write NODE.INPUT=VALUE, NODE being a node id or title "
                         "(e.g. --set 6.text='a fox' or --set Prompt.text='a fox')")
    if node not in graph:
        titled = [nid for nid, n in graph.items() if n.get("_meta", {}).get("title") == node]
        if len(titled) != 1:
            nodes = ", ".join(f"{nid} ({n.get('_meta', {}).get('title', n['class_type'])})" for nid, n in graph.items())
            why = "several nodes have that title" if titled else "no node has that id or title"
            raise UsageError(f"--set {target!r}: {why}; nodes: {nodes}")
        node = titled[0]
    inputs = graph[node].get("inputs", {})
    if input_name not in inputs:
        widgets = [k for k, v in inputs.items() if not isinstance(v, list)]
        raise UsageError(f"--set {target!r}: node {node} ({graph[node]['class_type']}) has no input {input_name!r}; "
                         f"its settable inputs: {', '.join(widgets)}")
    if isinstance(inputs[input_name], list):
        raise UsageError(f"--set {target!r}: that input is a link from another node, not a value")
    return node, input_name


def coerce(old: Any, text: str) -> Any:
    """Give the override the type the graph already has (ComfyUI validates types strictly)."""
    if isinstance(old, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise UsageError(f"expected true or false, got {text!r}")
    for kind in (int, float):
        if isinstance(old, kind):
            try:
                return kind(text)
            except ValueError:
                raise UsageError(f"expected a number like {old!r}, got {text!r}") from None
    return text


def apply_overrides(graph: Graph, overrides: list[tuple[str, Any]]) -> Graph:
    """A copy of graph with (target, value) pairs applied; text values are coerced to the input's type."""
    out = copy.deepcopy(graph)
    for target, value in overrides:
        node, input_name = resolve_target(out, target)
        old = out[node]["inputs"][input_name]
        try:
            out[node]["inputs"][input_name] = coerce(old, value) if isinstance(value, str) else value
        except UsageError as exc:
            raise UsageError(f"--set {target}: {exc}") from None
    return out


def parse_set(text: str) -> tuple[str, str]:
    target, sep, value = text.partition("=")
    if not sep:
        raise UsageError(f"--set {text!r}: write NODE.INPUT=VALUE")
    return target.strip(), value
