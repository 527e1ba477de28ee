"""Ahead-of-time compiled blocks instead of Dynamo re-tracing on a warm start (issue 4's cold start).

On a warm compile cache a restarted runtime still re-traces the double and single block graphs with
Dynamo and loads their kernels one by one (bench/gpu/warm_up_profile.py). This prototype exports
one block of each kind with torch.export, its parameters passed as inputs (so one compiled package
serves all 19 or 38 blocks), compiles it with AOTInductor into a .pt2 package, and measures in fresh
processes, side by side on one machine:

  dynamo  the runtime's way: compile_repeated_blocks, the Inductor cache filled by an earlier process
  aot     aoti_load_package of the two packages, every block's forward calling its package

each as: seconds from compiling/loading to the end of the first transformer call, the median of
later calls, and the output's relative error against the eager transformer.

    python bench/gpu/aot_blocks.py --work /tmp/fluxbench --out aot.json          # H100: fp8, 1024², 512 tokens
    python bench/gpu/aot_blocks.py --tiny --work /tmp/aot-tiny --out aot.json    # CPU: the tiny model, float32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from fluxstack.runtime import perf
from fluxstack.runtime.fp8 import quantize_linears

BLOCK_KINDS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")


def build(work: Path, tiny: bool) -> tuple[Any, dict[str, Any], str, str]:
    """The transformer prepared as the fp8 mode prepares it (fused QKV, fp8 linears; on the GPU also
    cuDNN attention), and inputs of the default request's shape."""
    from diffusers import FluxTransformer2DModel

    if tiny:
        from fluxstack.runtime.tiny import generate

        store = work / "store"
        if not store.exists():
            generate(work)
        t = FluxTransformer2DModel.from_single_file(str(store / "diffusion_models/flux1-tiny.safetensors"),
                                                    config=str(store / "configs/tiny-flux"), subfolder="transformer",
                                                    torch_dtype=torch.float32, local_files_only=True)
        for block in [*t.transformer_blocks, *t.single_transformer_blocks]:
            perf.fuse_qkv(block)
            quantize_linears(block)
        device, dtype, tokens, text, attention = "cpu", torch.float32, 16, 8, "native"
    else:
        from runtime_bench import make_store

        paths = make_store(work, schnell=False)
        t = FluxTransformer2DModel.from_single_file(str(paths["transformer"]), config=str(paths["config"]),
                                                    subfolder="transformer", torch_dtype=torch.bfloat16,
                                                    local_files_only=True).to("cuda")
        perf.prepare_blocks(t, fp8=True)
        attention = perf.best_attention_backend(t)
        device, dtype, tokens, text = "cuda", torch.bfloat16, 4096, 512
    t = t.eval().requires_grad_(False)
    c = t.config
    g = torch.Generator().manual_seed(0)
    side = int(tokens ** 0.5)
    ids = torch.zeros(tokens, 3)
    ids[:, 1], ids[:, 2] = torch.arange(tokens) // side, torch.arange(tokens) % side
    inputs = {"hidden_states": torch.randn(1, tokens, c.in_channels, generator=g),
              "encoder_hidden_states": torch.randn(1, text, c.joint_attention_dim, generator=g),
              "pooled_projections": torch.randn(1, c.pooled_projection_dim, generator=g),
              "timestep": torch.tensor([0.5]), "img_ids": ids, "txt_ids": torch.zeros(text, 3),
              "guidance": torch.tensor([3.5]) if c.guidance_embeds else None}
    for k, v in inputs.items():
        if torch.is_tensor(v):  # ids stay float32 as diffusers makes them; the activations take the model's dtype
            inputs[k] = v.to(device, dtype if k not in ("img_ids", "txt_ids") else torch.float32)
    return t, inputs, device, attention


class BlockFunction(torch.nn.Module):
    """A block as a function of its parameters and inputs: exported once, called for every block."""

    def __init__(self, block: Any) -> None:
        super().__init__()
        self.block = block

    def forward(self, params: dict[str, torch.Tensor], hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor, temb: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> Any:
        return torch.func.functional_call(self.block, params,
                                          (hidden_states, encoder_hidden_states, temb, (cos, sin)))


def block_inputs(t: Any, inputs: dict[str, Any]) -> dict[str, tuple]:
    """What the first block of each kind receives in a transformer call with `inputs`."""
    seen: dict[str, tuple] = {}

    def grab(module: Any, args: tuple, kwargs: dict) -> None:
        kw = {**dict(zip(("hidden_states", "encoder_hidden_states", "temb"), args, strict=False)), **kwargs}
        cos, sin = kw["image_rotary_emb"]
        seen.setdefault(type(module).__name__,
                        (kw["hidden_states"], kw["encoder_hidden_states"], kw["temb"], cos, sin))

    hooks = [t.transformer_blocks[0].register_forward_pre_hook(grab, with_kwargs=True),
             t.single_transformer_blocks[0].register_forward_pre_hook(grab, with_kwargs=True)]
    with torch.inference_mode():
        t(**inputs)
    for h in hooks:
        h.remove()
    return seen


def install(t: Any, packages: dict[str, Any]) -> None:
    for block in [*t.transformer_blocks, *t.single_transformer_blocks]:
        run, params = packages[type(block).__name__], dict(block.named_parameters())

        def forward(hidden_states: Any, encoder_hidden_states: Any, temb: Any, image_rotary_emb: Any = None,
                    joint_attention_kwargs: Any = None, _run: Any = run, _params: dict = params) -> Any:
            return _run(_params, hidden_states, encoder_hidden_states, temb, *image_rotary_emb)

        block.forward = forward


def attention_kernel(attention: str) -> Any:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if attention == "_native_cudnn" else contextlib.nullcontext()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def probe_package(work: Path, device: str) -> Path:
    """One linear layer (bf16 on the GPU) as an AOTInductor package: loading it tells whether this
    torch and compiler can load any package at all on `device`."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = torch.nn.Linear(256, 256).to(device, dtype)
    program = torch.export.export(layer, (torch.randn(64, 256, device=device, dtype=dtype),))
    return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(work / "aot/probe.pt2")))


def child(args: argparse.Namespace) -> None:
    if args.child == "probe":
        layer = torch._inductor.aoti_load_package(str(args.work / "aot/probe.pt2"))
        device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
        x = torch.randn(64, 256, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        print("RESULT " + json.dumps({"way": "probe", "output_shape": list(layer(x).shape)}), flush=True)
        return
    t, inputs, device, _ = build(args.work, args.tiny)
    sync(device)
    start = time.perf_counter()
    if args.child == "dynamo":
        perf.use_compile_cache(args.work / "compile-cache")
        t.compile_repeated_blocks(fullgraph=True, dynamic=False)
    else:
        install(t, {kind: torch._inductor.aoti_load_package(str(args.work / f"aot/{kind}.pt2"))
                    for kind in BLOCK_KINDS})
    loaded = time.perf_counter() - start
    with torch.inference_mode():
        out = t(**inputs)[0]
        sync(device)
        first = time.perf_counter() - start
        calls = []
        for _ in range(args.calls):
            s = time.perf_counter()
            t(**inputs)
            sync(device)
            calls.append(time.perf_counter() - s)
    ref = torch.load(args.work / "aot/reference.pt")
    rel = float((out.float().cpu() - ref).norm() / ref.norm())
    print("RESULT " + json.dumps({"way": args.child, "install_s": loaded, "to_first_output_s": first,
                                  "call_s": statistics.median(calls), "rel_error_vs_eager": rel}), flush=True)


def run_child(args: argparse.Namespace, way: str) -> dict:
    cmd = [sys.executable, __file__, "--child", way, "--work", str(args.work), "--calls", str(args.calls)]
    proc = subprocess.run(cmd + (["--tiny"] if args.tiny else []), capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    # A crash in native code leaves no Python traceback: the exit status (-11: SIGSEGV) is the news.
    return json.loads(line[7:]) if line else {"way": way, "returncode": proc.returncode,
                                               "error": proc.stderr[-3000:]}


def report(res: dict, out: Path | None) -> None:
    print(json.dumps(res, indent=1), flush=True)
    if out:
        out.write_text(json.dumps(res, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/fluxbench"))
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (checks the mechanism)")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--child", choices=("dynamo", "aot", "probe"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    (args.work / "aot").mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.tiny else "cuda"
    probe_package(args.work, device)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                           "torch": torch.__version__, "tiny": args.tiny, "load_probe": run_child(args, "probe")}
    if "error" in res["load_probe"]:
        # The blocks' packages could not load either: say so instead of spending minutes compiling them.
        report(res, args.out)
        return 1
    t, inputs, device, attention = build(args.work, args.tiny)
    with torch.inference_mode():
        torch.save(t(**inputs)[0].float().cpu(), args.work / "aot/reference.pt")
    res |= {"attention": attention, "export_s": {}, "aot_compile_s": {}}
    for kind, example in block_inputs(t, inputs).items():
        block = t.transformer_blocks[0] if kind == BLOCK_KINDS[0] else t.single_transformer_blocks[0]
        try:
            # Export may keep attention as the generic SDPA op and pick its kernel when compiling:
            # make that pick the runtime's (cuDNN on the GPU), not whatever is the default there.
            with attention_kernel(attention):
                s = time.perf_counter()
                program = torch.export.export(BlockFunction(block), (dict(block.named_parameters()), *example))
                res["export_s"][kind] = time.perf_counter() - s
                s = time.perf_counter()
                torch._inductor.aoti_compile_and_package(program, package_path=str(args.work / f"aot/{kind}.pt2"))
                res["aot_compile_s"][kind] = time.perf_counter() - s
        except Exception as exc:  # noqa: BLE001 - what failed is the result; the dynamo side still runs
            res.setdefault("aot_errors", {})[kind] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
    del t
    if device == "cuda":
        torch.cuda.empty_cache()  # the children load their own transformer
    # The first dynamo process fills the Inductor cache; the second is the warm start to compare.
    res["dynamo_empty_cache"], res["dynamo_warm_cache"] = run_child(args, "dynamo"), run_child(args, "dynamo")
    if "aot_errors" not in res:
        res["aot"] = run_child(args, "aot")
    report(res, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
