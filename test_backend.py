#!/usr/bin/env python
"""Check the inference engine on this machine, without Django.

Reports the versions of Python, PyTorch, transformers and diffusers, whether CUDA is there
(with each device's name and memory), the device plan the server would use, then loads a
model and generates one image with timings. Exits non-zero on any failure.

    python test_backend.py                                  # tiny-sd, offline: checks the stack
    python test_backend.py --model stable-diffusion-v1-5    # a real model (downloads once)
    python test_backend.py --interactive                    # then asks for prompts in a loop

The settings are the server's (DEVICE, TORCH_DTYPE, ATTENTION_SLICING, ... from the
environment or .env). tiny-sd is built locally and makes noise: it checks the stack, not
the art.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TINY = ("tiny-sd", "tiny-sdxl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-sd", help="catalogue id to load (default: tiny-sd, built offline)")
    parser.add_argument("--prompt", default="a lighthouse on a cliff at dusk, oil painting")
    parser.add_argument("--steps", type=int, help="inference steps (default: the model's own)")
    parser.add_argument("--size", type=int, help="width and height (default: the model's own)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "media" / "test_backend.png",
        help="where to save the image (default: media/test_backend.png)",
    )
    parser.add_argument(
        "--interactive", action="store_true", help="after the first image, ask for prompts until an empty line"
    )
    parser.add_argument(
        "--offline", action="store_true", help="never use the network (HF_HUB_OFFLINE=1); implied for tiny models"
    )
    parser.add_argument("--no-env-file", action="store_true", help="don't read .env")
    return parser.parse_args(argv)


def setup_environment(args: argparse.Namespace) -> None:
    """Before huggingface_hub is imported: it reads these once."""
    env_file = os.environ.get("ENV_FILE", str(ROOT / ".env"))
    if not args.no_env_file and env_file.lower() != "none" and Path(env_file).is_file():
        try:
            from dotenv import load_dotenv

            load_dotenv(env_file, override=False)
        except ImportError:
            pass
    if args.offline or (args.model in TINY and "HF_HUB_OFFLINE" not in os.environ):
        os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def section(title: str) -> None:
    print(f"\n== {title}")


def report_versions() -> None:
    from backend.system import library_versions

    section("versions")
    versions = library_versions()
    print(f"Python        {platform.python_version()} ({sys.executable})")
    for name, label in (("torch", "PyTorch"), ("transformers", "transformers"), ("diffusers", "diffusers")):
        print(f"{label:<13} {versions.get(name) or 'NOT INSTALLED'}")
    for name in ("accelerate", "huggingface_hub"):
        print(f"{name:<13} {versions.get(name) or 'not installed'}")
    missing = [n for n in ("torch", "transformers", "diffusers") if not versions.get(n)]
    if missing:
        raise RuntimeError(f"missing: {', '.join(missing)}; install requirements.txt (torch first)")


def report_devices() -> None:
    from backend.system import system_info

    section("devices")
    info = system_info()
    print(
        f"CUDA          {'yes' if info['cuda_available'] else 'no'}"
        + (f" (CUDA {info['cuda_version']})" if info["cuda_available"] else "")
    )
    for device in info["devices"]:
        print(
            f"  cuda:{device['index']}  {device['name']}  compute {device['capability']}  "
            f"{device['total_memory_mb'] / 1024:.1f} GiB total, {device['free_memory_mb'] / 1024:.1f} GiB free"
        )
    if not info["cuda_available"]:
        print("  (no CUDA device: models run on the CPU, slowly, in fp32)")


def report_plan(manager) -> None:  # noqa: ANN001
    section("device plan (from the settings)")
    plan = manager.device_plan()
    print(f"device {plan.device}, dtype {plan.dtype}")
    print(
        f"attention slicing {'on' if plan.attention_slicing else 'off'}, VAE slicing {'on' if plan.vae_slicing else 'off'}, "
        f"VAE tiling {'on' if plan.vae_tiling else 'off'}, CPU offload {plan.cpu_offload}"
    )
    for note in plan.notes:
        print(f"  note: {note}")


def generate(backend, spec, args: argparse.Namespace, prompt: str, output: Path, seed: int) -> None:  # noqa: ANN001
    from backend.params import GenerationParams

    size = args.size or spec.default_size
    params = GenerationParams(
        kind="txt2img",
        model_id=spec.id,
        prompt=prompt,
        width=size,
        height=size,
        steps=args.steps or spec.default_steps,
        guidance_scale=spec.default_guidance_scale,
        seed=seed,
    )
    started = time.perf_counter()
    out = backend.generate(params)
    seconds = time.perf_counter() - started
    image = out.images[0].image
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output)
    steps_per_s = params.steps / out.timings["inference_s"] if out.timings.get("inference_s") else 0.0
    print(
        f"generated {image.size[0]}x{image.size[1]}, {params.steps} steps, seed {seed}: "
        f"{out.timings.get('inference_s', seconds):.2f}s inference ({steps_per_s:.1f} steps/s), {seconds:.2f}s in all"
    )
    print(f"saved {output}")
    extrema = image.convert("L").getextrema()
    if extrema[1] - extrema[0] < 2:
        print(
            f"warning: the image is flat (pixel range {extrema}); black images usually mean NaNs in fp16, see README_PYTORCH.md"
        )


def interactive(backend, spec, args: argparse.Namespace) -> int:  # noqa: ANN001
    section("interactive: a prompt per line; an empty line, 'quit' or end of input stops")
    count = 0
    while True:
        try:
            prompt = input("prompt> ").strip()
        except EOFError:
            print()
            break
        if not sys.stdin.isatty():
            print(prompt)  # piped input isn't echoed: show what is being drawn
        if not prompt or prompt.lower() in ("quit", "exit", "q"):
            break
        count += 1
        output = args.output.with_name(f"{args.output.stem}-{count}{args.output.suffix}")
        generate(backend, spec, args, prompt, output, args.seed + count)
    print(f"{count} prompt(s) done")
    return count


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_environment(args)
    try:
        # The catalogue needs no torch: a wrong id fails before the slow imports.
        from backend.catalog import load_catalog
        from backend.errors import UnknownModel

        catalog = load_catalog(os.environ.get("MODEL_CATALOG_FILE", "").strip() or None)
        if args.model not in catalog:
            raise UnknownModel(
                f"model_id {args.model!r} is not in the catalogue; valid ids: {', '.join(sorted(catalog))}"
            )
        report_versions()
        report_devices()

        from backend.config import EngineConfig
        from backend.local import LocalBackend
        from backend.manager import ModelManager

        manager = ModelManager(EngineConfig.from_env())
        report_plan(manager)
        spec = manager.spec(args.model)

        section(f"model {spec.id} ({spec.location})")
        if spec.id in TINY:
            print("a tiny test model with random weights: its images are noise")
        started = time.perf_counter()
        model = manager.get(spec.id)
        weights = f", {model.variant} weights" if model.variant else ""
        print(f"loaded in {time.perf_counter() - started:.2f}s ({model.plan.device}, {model.plan.dtype}{weights})")

        backend = LocalBackend(manager)
        generate(backend, spec, args, args.prompt, args.output, args.seed)
        if args.interactive:
            interactive(backend, spec, args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - report anything as a failure, with the reason
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        print(f"\nFAILED: {message}", file=sys.stderr)
        if os.environ.get("TEST_BACKEND_TRACEBACK"):
            traceback.print_exc()
        return 1
    print("\nOK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
