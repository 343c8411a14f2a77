#!/usr/bin/env python
"""Check the parts of the engine that need a GPU: load, generate, memory, sharing, unloading.

For each model given (default: tiny-sd) it reports, on the device the settings pick:

- load time, the device and dtype, and which weights were loaded (the fp16 variant or not);
- txt2img: first and second call times (the first includes CUDA warm-up), peak GPU memory,
  and whether the image is flat (black images mean NaNs: the fp16 pitfalls);
- img2img made with ``from_pipe``: that it shares the modules of txt2img, how much memory it
  added (GPU and process), and its time;
- inpaint, also made with ``from_pipe``: that it shares the modules, its time, and that the
  pixels outside the mask come back unchanged;
- unload: how much GPU memory is left allocated afterwards.

It exits non-zero if a model fails to load or generate, makes a flat image, doesn't share its
weights, or leaves more than 5% of its memory behind after unloading. Settings come from the
environment as for the server, so memory options can be compared:

    python scripts/gpu_check.py sdxl-base-1.0 stable-diffusion-v1-5
    CPU_OFFLOAD=model VAE_TILING=true python scripts/gpu_check.py sdxl-base-1.0 --json out.json

On a machine without a GPU it runs on the CPU (tiny-sd takes seconds), which checks the
script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_FRACTION = 0.05  # img2img may add at most this much; unloading may leave at most this much


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["tiny-sd"], help="catalogue ids (default: tiny-sd)")
    parser.add_argument("--steps", type=int, help="inference steps (default: the model's own)")
    parser.add_argument("--size", type=int, help="width and height (default: the model's own)")
    parser.add_argument("--prompt", default="a lighthouse on a cliff at dusk, oil painting")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--save-images", type=Path, help="save each model's images into this folder")
    return parser.parse_args(argv)


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


class Memory:
    """Process RSS and, on CUDA, allocated / peak memory of the plan's device."""

    def __init__(self, device: str) -> None:
        import psutil
        import torch

        self.torch = torch
        self.process = psutil.Process()
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.index = int(device.split(":")[1]) if self.cuda and ":" in device else 0
        if self.cuda:
            # cuBLAS keeps a workspace (32 MiB by default) from its first matmul on: create it now,
            # so it counts as the baseline and not as memory a model left behind when unloaded.
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                a = torch.ones(16, 16, device=f"cuda:{self.index}", dtype=dtype)
                (a @ a).sum().item()

    def sync(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize(self.index)

    def rss(self) -> int:
        self.sync()
        return self.process.memory_info().rss

    def allocated(self) -> int | None:
        self.sync()
        return self.torch.cuda.memory_allocated(self.index) if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.index)

    def peak(self) -> int | None:
        return self.torch.cuda.max_memory_allocated(self.index) if self.cuda else None


def module_bytes(pipe: Any) -> int:
    # Each storage once: with fused QKV projections, q, k and v are views into the fused weight.
    storages: dict[tuple[str, int], int] = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            for p in module.parameters():
                storage = p.untyped_storage()
                if storage.data_ptr():
                    storages[(str(p.device), storage.data_ptr())] = storage.nbytes()
                else:  # meta tensors (sequential offload) have no storage to share
                    storages[("id", id(p))] = p.numel() * p.element_size()
    return sum(storages.values())


def check_model(manager: Any, model_id: str, args: argparse.Namespace, memory: Memory) -> dict[str, Any]:
    from backend.local import LocalBackend
    from backend.params import GenerationParams

    row: dict[str, Any] = {"model": model_id, "problems": []}
    spec = manager.spec(model_id)
    size = args.size or spec.default_size
    steps = args.steps or spec.default_steps
    backend = LocalBackend(manager)

    def params(kind: str, seed: int) -> GenerationParams:
        return GenerationParams(
            kind=kind,
            model_id=model_id,
            prompt=args.prompt,
            width=size,
            height=size,
            steps=steps,
            guidance_scale=spec.default_guidance_scale,
            seed=seed,
            strength=0.6 if kind != "txt2img" else None,
            mask_blur=4 if kind == "inpaint" else None,
        )

    allocated_before = memory.allocated()
    memory.reset_peak()
    started = time.perf_counter()
    model = manager.get(model_id)
    row.update(
        load_s=round(time.perf_counter() - started, 2),
        device=model.plan.device,
        dtype=model.plan.dtype,
        variant=model.variant,
        weights=mib(module_bytes(model.txt2img)),
        allocated_after_load=mib(memory.allocated()),
        rss_after_load=mib(memory.rss()),
    )

    times = []
    image = None
    for seed in (1, 2):
        memory.reset_peak()
        started = time.perf_counter()
        out = backend.generate(params("txt2img", seed))
        memory.sync()
        times.append(round(time.perf_counter() - started, 2))
        image = out.images[0].image
    row.update(
        txt2img_first_s=times[0],
        txt2img_s=times[1],
        txt2img_peak=mib(memory.peak()),
        size=f"{size}x{size}",
        steps=steps,
    )
    extrema = image.convert("L").getextrema()
    if extrema[1] - extrema[0] < 2:
        row["problems"].append(f"flat txt2img image (pixel range {extrema}): NaNs in {model.plan.dtype}?")
    if args.save_images:
        args.save_images.mkdir(parents=True, exist_ok=True)
        image.save(args.save_images / f"{model_id}-txt2img.png")

    rss_before, allocated_img2img = memory.rss(), memory.allocated()
    img2img = model.img2img
    rss_added, allocated_added = memory.rss() - rss_before, None
    if allocated_img2img is not None:
        allocated_added = (memory.allocated() or 0) - allocated_img2img
    shared = all(
        getattr(img2img, name) is getattr(model.txt2img, name)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        if getattr(model.txt2img, name, None) is not None
    )
    row.update(img2img_shares_weights=shared, img2img_added_rss=mib(rss_added), img2img_added_gpu=mib(allocated_added))
    if not shared:
        row["problems"].append("img2img does not share the txt2img modules")
    if rss_added > SHARED_FRACTION * rss_before:
        row["problems"].append(f"img2img added {mib(rss_added)} to a {mib(rss_before)} process (over 5%)")
    if allocated_added is not None and allocated_added > SHARED_FRACTION * module_bytes(model.txt2img):
        row["problems"].append(f"img2img added {mib(allocated_added)} of GPU memory")

    started = time.perf_counter()
    out = backend.generate(params("img2img", 3), init_image=image)
    memory.sync()
    row["img2img_s"] = round(time.perf_counter() - started, 2)
    if args.save_images:
        out.images[0].image.save(args.save_images / f"{model_id}-img2img.png")

    # Inpaint, also made with from_pipe: the centre square repainted, the rest pasted back.
    from PIL import Image

    mask = Image.new("L", image.size, 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    inpaint = model.inpaint
    if inpaint.unet is not model.txt2img.unet or inpaint.vae is not model.txt2img.vae:
        row["problems"].append("inpaint does not share the txt2img modules")
    started = time.perf_counter()
    out = backend.generate(params("inpaint", 4), init_image=image, mask_image=mask)
    memory.sync()
    row["inpaint_s"] = round(time.perf_counter() - started, 2)
    corner = (0, 0, size // 8, size // 8)
    if out.images[0].image.crop(corner).tobytes() != image.convert("RGB").crop(corner).tobytes():
        row["problems"].append("inpaint changed pixels outside the mask")
    if args.save_images:
        out.images[0].image.save(args.save_images / f"{model_id}-inpaint.png")

    weights = module_bytes(model.txt2img)
    del model, img2img, inpaint, out, image
    manager.unload(model_id)
    allocated_after = memory.allocated()
    row["allocated_after_unload"] = mib(allocated_after)
    if (
        allocated_before is not None
        and allocated_after is not None
        and allocated_after - allocated_before > SHARED_FRACTION * weights
    ):
        row["problems"].append(f"{mib(allocated_after - allocated_before)} still allocated after unloading")
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    from backend.config import EngineConfig

    config = EngineConfig.from_env()
    # The catalogue needs no torch: wrong ids fail before the slow imports.
    from backend.catalog import load_catalog

    catalog = load_catalog(config.model_catalog_file or None)
    unknown = [m for m in args.models if m not in catalog]
    if unknown:
        print(f"not in the catalogue: {', '.join(unknown)}; valid ids: {', '.join(sorted(catalog))}", file=sys.stderr)
        return 2

    from backend.errors import EngineError
    from backend.manager import ModelManager
    from backend.system import library_versions, system_info

    versions = library_versions()
    info = system_info()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if info["cuda_available"]:
        for d in info["devices"]:
            print(f"cuda:{d['index']} {d['name']} ({d['capability']}), {d['total_memory_mb'] / 1024:.1f} GiB")
    else:
        print("no CUDA device: running on the CPU (this checks the script, not a GPU)")

    # One model at a time, so each one's memory is measured alone.
    manager = ModelManager(replace(config, max_loaded_models=1))
    try:
        plan = manager.device_plan()
    except EngineError as exc:
        print(f"FAILED: {exc.message}", file=sys.stderr)
        return 1
    print("plan: " + json.dumps(plan.as_dict()))
    memory = Memory(plan.device)

    rows: list[dict[str, Any]] = []
    for model_id in args.models:
        print(f"\n== {model_id}")
        try:
            row = check_model(manager, model_id, args, memory)
        except EngineError as exc:
            row = {"model": model_id, "problems": [f"{exc.code}: {exc.message}"]}
        except Exception as exc:  # noqa: BLE001 - one model's failure must not hide the others'
            row = {"model": model_id, "problems": [f"{type(exc).__name__}: {exc}"]}
        rows.append(row)
        for key, value in row.items():
            if key != "problems":
                print(f"  {key:<24} {value}")
        for problem in row["problems"]:
            print(f"  PROBLEM: {problem}")

    report = {"versions": versions, "system": info, "plan": plan.as_dict(), "models": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {args.json}")
    failed = [r["model"] for r in rows if r["problems"]]
    print(
        f"\n{len(rows) - len(failed)} of {len(rows)} model(s) passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
