"""The GPU fast path: what makes a loaded pipeline faster without changing its images.

The manager applies it after ``apply_plan``, each part only where the device plan says so
(``backend/devices.py`` decides; on the CPU every part is off unless asked for):

- **channels_last** memory layout for the UNet and the VAE: cuDNN's fast convolution kernels
  are the NHWC ones.
- **Fused QKV projections**: one matmul for q, k and v in self-attention (k and v in
  cross-attention) instead of three. The separate ``to_q``/``to_k``/``to_v`` weights are made
  views into the fused one, so fusing costs no memory (about 1.2 GiB on SDXL otherwise) and
  LoRAs, which adapt ``to_q``/``to_k``/``to_v``, still find them. The fused attention does not
  see LoRA layers, so ``prepare_for_loras`` puts the UNet's own attention back while any LoRA
  is active, and the fused one when none is.
- **torch.compile** of the UNet and the VAE decoder, with static shapes, warmed up at load over
  the configured (width, height, batch) buckets so no request pays for a compile. A shape
  outside the buckets runs uncompiled (``COMPILE_NEW_SHAPES=eager``) rather than stalling on a
  compile. ``reduce-overhead`` and ``max-autotune`` replay the UNet's steps as CUDA graphs.
  The compiler's caches are kept on disk (``TORCHINDUCTOR_CACHE_DIR`` under the cache folder,
  and ``torch.compiler.save_cache_artifacts`` after each warm-up), so a restart skips most of
  the compile.

No Django imports: the server, a Celery worker and ``bench/gpu.py`` all use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .devices import CUDA_GRAPH_MODES, DevicePlan

log = logging.getLogger("backend.fastpath")

Shape = tuple[int, int, int]  # width, height, batch (images per prompt)
WARMUP_STEPS = 3  # CUDA graph trees run a new graph once, record it on the 2nd call, replay from the 3rd

_FUSED = "fused"
_PAUSED = "unfused while LoRAs are active"
# Models (UNet, VAE) whose projections this module fused, and their state.
_qkv_state: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
# Their attention processors: (original, fused), by name.
_processors: weakref.WeakKeyDictionary[Any, tuple[dict[str, Any], dict[str, Any]]] = weakref.WeakKeyDictionary()
_warming = threading.local()


def apply_fast_path(pipe: Any, plan: DevicePlan) -> list[str]:
    """channels_last and fused projections as ``plan`` says; returns what was changed."""
    changed = []
    if plan.channels_last:
        set_channels_last(pipe, True)
        changed.append("channels_last")
    if plan.fuse_qkv and fuse_qkv(pipe):
        changed.append("fused QKV projections")
    return changed


# -- memory layout ------------------------------------------------------------------------------
def set_channels_last(pipe: Any, on: bool) -> None:
    import torch

    fmt = torch.channels_last if on else torch.contiguous_format
    for name in ("unet", "vae"):
        model = getattr(pipe, name, None)
        if model is not None:
            # Only 4-D tensors (convolution weights) change layout; Linear weights stay as they are.
            model.to(memory_format=fmt)


# -- fused attention projections ----------------------------------------------------------------
def fuse_qkv(pipe: Any) -> bool:
    """Fuse the UNet's and the VAE's attention projections; False if there was nothing to do."""
    fused = False
    for name in ("unet", "vae"):
        model = getattr(pipe, name, None)
        if model is None or model in _qkv_state or not hasattr(model, "fuse_qkv_projections"):
            continue
        original = dict(model.attn_processors)
        try:
            model.fuse_qkv_projections()
        except ValueError as exc:
            # diffusers refuses models with added KV projections (not SD or SDXL): they stay as they are.
            log.info("%s: attention projections not fused (%s)", name, exc)
            continue
        for _attention, fused_layer, parts in list(_fused_layers(model)):
            _alias(fused_layer, parts)
        # Switching back and forth reuses these very processor objects, so a compiled UNet
        # finds the graph it compiled for each (a new object could fail its guards).
        _processors[model] = (original, dict(model.attn_processors))
        _qkv_state[model] = _FUSED
        fused = True
    return fused


def unfuse_qkv(pipe: Any) -> None:
    """Undo ``fuse_qkv`` entirely: the original attention, separate weights, no fused layers."""
    for name in ("unet", "vae"):
        model = getattr(pipe, name, None)
        if model is None or model not in _qkv_state:
            continue
        _switch(model, fused=False)
        for attention, _fused_layer, parts in list(_fused_layers(model)):
            for part in parts:
                # Own storage again, so the fused tensor can go.
                part.weight.data = part.weight.data.clone()
                if part.bias is not None:
                    part.bias.data = part.bias.data.clone()
            delattr(attention, "to_kv" if attention.is_cross_attention else "to_qkv")
            attention.fused_projections = False
        del _qkv_state[model]
        del _processors[model]


def is_fused(pipe: Any) -> bool:
    """Does the UNet run the fused attention right now?"""
    return _qkv_state.get(getattr(pipe, "unet", None)) == _FUSED


def prepare_for_loras(pipe: Any, active: bool) -> None:
    """Call before each pipeline call: ``active`` when any LoRA adapter is on for this call.

    LoRAs adapt ``to_q``/``to_k``/``to_v``, which the fused attention bypasses, so while one is
    active the UNet runs its original attention; with none, the fused one again. Both switches
    only swap attention processors (the fused weights stay views of the base weights, which
    LoRA adapters never change), so they cost microseconds. A no-op when nothing was fused.
    """
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        _switch(unet, fused=not active)


def use_fused_attention(pipe: Any, on: bool) -> None:
    """Switch the UNet and the VAE between their fused and original attention (where fused)."""
    for name in ("unet", "vae"):
        model = getattr(pipe, name, None)
        if model is not None:
            _switch(model, fused=on)


def _switch(model: Any, *, fused: bool) -> None:
    state = _qkv_state.get(model)
    if state is None or (state == _FUSED) == fused:
        return
    original, fused_processors = _processors[model]
    model.set_attn_processor(dict(fused_processors if fused else original))
    _qkv_state[model] = _FUSED if fused else _PAUSED


def _fused_layers(model: Any) -> Iterable[tuple[Any, Any, tuple[Any, ...]]]:
    from diffusers.models.attention_processor import Attention

    for module in model.modules():
        if not isinstance(module, Attention) or not getattr(module, "fused_projections", False):
            continue
        if module.is_cross_attention:
            yield module, module.to_kv, (module.to_k, module.to_v)
        else:
            yield module, module.to_qkv, (module.to_q, module.to_k, module.to_v)


def _alias(fused_layer: Any, parts: tuple[Any, ...]) -> None:
    # diffusers copies q, k and v into the fused layer; point the originals at its rows instead.
    start = 0
    for part in parts:
        rows = part.weight.shape[0]
        part.weight.data = fused_layer.weight.data[start : start + rows]
        if part.bias is not None and fused_layer.bias is not None:
            part.bias.data = fused_layer.bias.data[start : start + rows]
        start += rows


# -- torch.compile ------------------------------------------------------------------------------
class CompiledCall:
    """What a compiled module runs in place of its eager call.

    ``stance`` is how a call whose inputs no compiled graph fits is handled outside a warm-up
    (``torch.compiler.set_stance``): ``eager_on_recompile`` runs it eagerly rather than
    stalling the request on a compile, ``default`` compiles it, ``fail_on_recompile`` raises
    (the benchmark uses it, so a compiled row can't quietly run eagerly). With CUDA graphs,
    each call starts a new graph-tree step and its outputs are copied out of the graph's static
    buffers, which the next replay overwrites: a scheduler that keeps earlier model outputs
    (PNDM, DPM-Solver multistep) would otherwise read stale ones.
    """

    def __init__(self, fn: Any, *, cuda_graphs: bool, stance: str = "eager_on_recompile") -> None:
        self.fn = fn
        self.cuda_graphs = cuda_graphs
        self.stance = stance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.compiler.set_stance("default" if getattr(_warming, "active", False) else self.stance):
            out = self.fn(*args, **kwargs)
        return _copy_out(out) if self.cuda_graphs else out


def _copy_out(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_copy_out(o) for o in out)
    if isinstance(out, dict):  # diffusers' BaseOutput is an OrderedDict dataclass
        return type(out)(**{k: _copy_out(v) for k, v in out.items()})
    return out


def compile_pipeline(
    pipe: Any, mode: str, *, backend: str = "inductor", compile_new_shapes: bool = False, shape_count: int = 1
) -> None:
    """Compile the UNet and the VAE decoder in place (``nn.Module.compile``: the modules keep
    their class, so diffusers, peft and ``from_pipe`` see the same objects).

    ``mode``: ``default``, ``reduce-overhead`` or ``max-autotune``. The VAE decoder runs once
    per image on large tensors, where CUDA graphs save nothing, and SDXL's fp32 upcast gives it
    new weight tensors on every call, which a CUDA graph would re-record: it never gets them.
    """
    if mode == "off":
        return
    on_cuda = str(getattr(pipe, "device", "cpu")).startswith("cuda")
    _allow_recompiles(shape_count)
    unet_mode = None if mode == "default" else mode
    vae_mode = "max-autotune-no-cudagraphs" if mode == "max-autotune" else None
    unet_graphs = on_cuda and backend == "inductor" and mode in CUDA_GRAPH_MODES
    _compile_module(pipe.unet, unet_mode, backend, cuda_graphs=unet_graphs, compile_new_shapes=compile_new_shapes)
    _compile_module(pipe.vae.decoder, vae_mode, backend, cuda_graphs=False, compile_new_shapes=compile_new_shapes)


def uncompile_pipeline(pipe: Any) -> None:
    for model in (getattr(pipe, "unet", None), getattr(getattr(pipe, "vae", None), "decoder", None)):
        if model is not None and getattr(model, "_compiled_call_impl", None) is not None:
            model._compiled_call_impl = None


def is_compiled(pipe: Any) -> bool:
    return isinstance(getattr(getattr(pipe, "unet", None), "_compiled_call_impl", None), CompiledCall)


def compiled_calls(pipe: Any) -> list[CompiledCall]:
    """The compiled UNet's and VAE decoder's calls (none when not compiled)."""
    modules = (getattr(pipe, "unet", None), getattr(getattr(pipe, "vae", None), "decoder", None))
    return [m._compiled_call_impl for m in modules if isinstance(getattr(m, "_compiled_call_impl", None), CompiledCall)]


def _compile_module(
    module: Any, mode: str | None, backend: str, *, cuda_graphs: bool, compile_new_shapes: bool
) -> None:
    kwargs: dict[str, Any] = {"dynamic": False, "backend": backend}
    if backend == "inductor" and mode:
        kwargs["mode"] = mode
    module.compile(**kwargs)
    # nn.Module.compile keeps the compiled callable in _compiled_call_impl and calls it in place
    # of the eager one; wrap it (see CompiledCall).
    inner = getattr(module, "_compiled_call_impl", None)
    if inner is None:
        raise RuntimeError("nn.Module.compile left no compiled call on the module; this PyTorch is not supported")
    stance = "default" if compile_new_shapes else "eager_on_recompile"
    module._compiled_call_impl = CompiledCall(inner, cuda_graphs=cuda_graphs, stance=stance)


def _allow_recompiles(shape_count: int) -> None:
    # Graphs of every compiled module count against one limit (they share nn.Module._call_impl):
    # per shape bucket the UNet, the VAE decoder and its fp32 variant, plus LoRA variants.
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    wanted = 4 * shape_count + 16
    if getattr(config, name) < wanted:
        setattr(config, name, wanted)


def warm_up(
    pipe: Any,
    shapes: Iterable[Shape],
    *,
    steps: int = WARMUP_STEPS,
    guidance_scale: float = 7.5,
    inpaint: bool = False,
) -> None:
    """One real pipeline call per (width, height, batch), as the engine makes them (CPU
    generators, inference mode, classifier-free guidance), so each compiled graph exists."""
    import torch

    _warming.active = True
    try:
        for width, height, batch in shapes:
            call: dict[str, Any] = {
                "prompt": "warm-up",
                "num_inference_steps": steps,
                "guidance_scale": guidance_scale,
                "num_images_per_prompt": batch,
                "width": width,
                "height": height,
                "generator": [torch.Generator(device="cpu").manual_seed(i) for i in range(batch)],
            }
            if inpaint:
                from PIL import Image

                call.update(
                    image=Image.new("RGB", (width, height), (127, 127, 127)),
                    mask_image=Image.new("L", (width, height), 255),
                    strength=1.0,
                )
            with torch.inference_mode():
                pipe(**call)
    finally:
        _warming.active = False


# -- compile caches -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CompileReport:
    mode: str
    seconds: float  # compile + warm-up, cache loading included
    shapes: tuple[Shape, ...]
    cache_file: Path | None
    cache_loaded: bool  # a saved cache for this model/torch/mode/device was found and loaded
    cache_saved_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "seconds": round(self.seconds, 3),
            "shapes": [f"{w}x{h}x{b}" for w, h, b in self.shapes],
            "cache_loaded": self.cache_loaded,
            "cache_saved_bytes": self.cache_saved_bytes,
        }


def use_cache_dir(cache_dir: Path) -> str:
    """Point inductor's on-disk cache under ``cache_dir`` unless TORCHINDUCTOR_CACHE_DIR is set
    (or inductor already chose one); returns the folder in use."""
    wanted = str(Path(cache_dir) / "inductor")
    current = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", wanted)
    Path(current).mkdir(parents=True, exist_ok=True)
    return current


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else 0
        return torch.cuda.get_device_name(index)
    return device


def artifact_path(cache_dir: Path, *, model_id: str, mode: str, backend: str, dtype: str, device: str) -> Path:
    """The saved compile artifacts of one model, keyed by everything that changes the graphs."""
    import torch

    key = [model_id, torch.__version__, mode, backend, dtype, device_name(device)]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return Path(cache_dir) / "artifacts" / f"{model_id}-{mode}-{digest}.bin"


def load_artifacts(path: Path) -> bool:
    import torch

    if not path.is_file():
        return False
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - a stale or damaged cache only costs a full compile
        log.warning(
            "compile cache %s can't be used (%s: %s); compiling from scratch", path.name, type(exc).__name__, exc
        )
        return False
    return info is not None


def save_artifacts(path: Path) -> int:
    """Everything this process compiled so far, to ``path``; returns the bytes written."""
    import torch

    try:
        saved = torch.compiler.save_cache_artifacts()
    except Exception as exc:  # noqa: BLE001 - not saving only costs the next start a compile
        log.warning("compile cache not saved (%s: %s)", type(exc).__name__, exc)
        return 0
    if not saved or not saved[0]:
        return 0
    data = saved[0]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("compile cache not saved to %s (%s)", path, exc)
        return 0
    return len(data)


def compile_and_warm_up(
    pipe: Any,
    *,
    model_id: str,
    plan: DevicePlan,
    shapes: Iterable[Shape],
    cache_dir: Path,
    backend: str = "inductor",
    compile_new_shapes: bool = False,
    guidance_scale: float = 7.5,
    inpaint: bool = False,
    steps: int = WARMUP_STEPS,
) -> CompileReport:
    """Load the saved compile cache, compile ``pipe`` as ``plan.compile`` says, warm every shape
    up, and save the cache again."""
    shapes = tuple(shapes)
    started = time.perf_counter()
    use_cache_dir(cache_dir)
    path = artifact_path(
        cache_dir, model_id=model_id, mode=plan.compile, backend=backend, dtype=plan.dtype, device=plan.device
    )
    loaded = load_artifacts(path)
    compile_pipeline(
        pipe, plan.compile, backend=backend, compile_new_shapes=compile_new_shapes, shape_count=len(shapes)
    )
    warm_up(pipe, shapes, steps=steps, guidance_scale=guidance_scale, inpaint=inpaint)
    saved = save_artifacts(path)
    return CompileReport(
        mode=plan.compile,
        seconds=time.perf_counter() - started,
        shapes=shapes,
        cache_file=path,
        cache_loaded=loaded,
        cache_saved_bytes=saved,
    )
