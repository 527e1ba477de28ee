"""The shipped ComfyUI workflows as data, and `fluxstack comfy` behaviour that needs no server."""

import json
from pathlib import Path

import pytest
import yaml

from fluxstack.comfy.client import explain_rejection
from fluxstack.comfy.workflows import load_graph, load_index
from helpers import REPO, fluxstack

WORKFLOWS = load_index(REPO / "workflows")
GUIDE = {"flux-dev-t2i", "flux-dev-lora", "flux-dev-redux", "flux-kontext-dev-fp8-edit"}


def test_the_four_guide_workflows_ship_in_both_formats_and_name_their_manifest() -> None:
    assert set(WORKFLOWS) == GUIDE
    for workflow in WORKFLOWS.values():
        assert workflow.api_path.is_file() and workflow.ui_path.is_file()
        assert (REPO / "manifests" / f"{workflow.manifest}.yaml").is_file()
    kinds = {w.name: {n["class_type"] for n in w.graph().values()} for w in WORKFLOWS.values()}
    assert {"UNETLoader", "DualCLIPLoader", "VAELoader", "FluxGuidance", "ModelSamplingFlux", "BasicGuider",
            "SamplerCustomAdvanced"} <= kinds["flux-dev-t2i"]
    assert "LoraLoaderModelOnly" in kinds["flux-dev-lora"]
    assert {"CLIPVisionLoader", "StyleModelLoader", "StyleModelApply"} <= kinds["flux-dev-redux"]
    assert {"ReferenceLatent", "FluxKontextImageScale"} <= kinds["flux-kontext-dev-fp8-edit"]


def test_comfy_check_passes_for_the_shipped_workflows() -> None:
    result = fluxstack("comfy", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sum(line.startswith("  ok") for line in result.stdout.splitlines()) == len(GUIDE)


def test_comfy_check_names_a_model_file_the_manifest_does_not_provide(tmp_path: Path) -> None:
    graph = load_graph(REPO / "workflows" / "flux-dev-t2i.api.json")
    graph["1"]["inputs"]["unet_name"] = "flux1-schnell.safetensors"
    (tmp_path / "mine.api.json").write_text(json.dumps(graph))
    (tmp_path / "mine.ui.json").write_text("{}")
    (tmp_path / "index.yaml").write_text(yaml.safe_dump({"workflows": {"mine": {"manifest": "flux-dev"}}}))
    result = fluxstack("comfy", "check", env={"FLUXSTACK_WORKFLOWS_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert "node 1 loads diffusion_models/flux1-schnell.safetensors, which manifest flux-dev does not provide" \
        in result.stdout


@pytest.mark.parametrize("name", sorted(GUIDE))
def test_ui_format_file_is_the_same_graph_as_the_api_file(name: str) -> None:
    api = WORKFLOWS[name].graph()
    ui = json.loads(WORKFLOWS[name].ui_path.read_text())
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert {k: v["class_type"] for k, v in api.items()} == {k: v["type"] for k, v in nodes.items()}
    links = {link[0]: link for link in ui["links"]}
    for node_id, node in api.items():
        ui_node = nodes[node_id]
        linked = {i["name"]: links[i["link"]] for i in ui_node["inputs"] if i["link"] is not None}
        values = [v for v in node["inputs"].values() if not isinstance(v, list)]
        for input_name, value in node["inputs"].items():
            if isinstance(value, list):
                link = linked[input_name]
                assert (str(link[1]), link[2]) == (value[0], value[1]), f"{name} node {node_id}.{input_name}"
        widgets = [w for w in ui_node["widgets_values"] if w not in ("fixed", "image") or w in values]
        assert widgets == values, f"{name} node {node_id}: widget values differ from the API graph"


def test_set_errors_say_what_to_write(tmp_path: Path) -> None:
    unreachable = ["--url", "http://127.0.0.1:9"]
    bad_input = fluxstack("comfy", "run", "flux-dev-t2i", "--set", "Prompt.txt=a fox", *unreachable)
    assert bad_input.returncode == 2
    assert "node 6 (CLIPTextEncode) has no input 'txt'; its settable inputs: text" in bad_input.stderr
    link = fluxstack("comfy", "run", "flux-dev-t2i", "--set", "7.conditioning=x", *unreachable)
    assert "that input is a link from another node" in link.stderr
    number = fluxstack("comfy", "run", "flux-dev-t2i", "--steps", "x", *unreachable)
    assert number.returncode == 2 and "invalid int value" in number.stderr
    word = fluxstack("comfy", "run", "flux-dev-t2i", "--set", "13.steps=many", *unreachable)
    assert "--set 13.steps: expected a number like 20, got 'many'" in word.stderr
    unknown = fluxstack("comfy", "run", "sdxl", *unreachable)
    assert "unknown workflow 'sdxl'; shipped: flux-dev-lora, flux-dev-redux" in unknown.stderr
    # Valid overrides get as far as the network, and the error says how to fix that.
    ok = fluxstack("comfy", "run", "flux-dev-t2i", "--set", "Prompt.text=a fox", "--steps", "4", *unreachable)
    assert ok.returncode == 2 and "cannot reach ComfyUI at http://127.0.0.1:9" in ok.stderr


def test_comfyui_rejections_become_instructions() -> None:
    # A real 400 body from ComfyUI 0.8.0 for the Kontext workflow with three problems.
    answer = json.loads((REPO / "tests" / "unit" / "data" / "comfyui-0.8.0-rejection.json").read_text())
    graph = WORKFLOWS["flux-kontext-dev-fp8-edit"].graph()
    text = explain_rejection(answer, graph, "flux-kontext-dev-fp8")
    assert ("flux1-dev-kontext_fp8_scaled-missing.safetensors is not in the store (diffusion_models/, asked for by "
            "node 1 (Load Diffusion Model)): run `fluxstack seed flux-kontext-dev-fp8`") in text
    assert "input image 'fluxstack-reference.png' is not in ComfyUI's input folder" in text
    assert "pass --image PATH" in text
    assert "node 30 (KSampler) input steps: Value 0 smaller than min of 1\n" in text + "\n"
