"""GPU benchmark: plain diffusers against this engine, eager and compiled, on real-shaped SD 1.5
and SDXL pipelines, then end to end through the HTTP server with batching off and on.

    python bench/gpu.py --budget 540 --json bench/results/gpu.json     # on a GPU box
    python bench/gpu.py --tiny                                          # anywhere: checks the script

The pipelines are built from the published component configs (``backend/model_configs/``) with
random weights: speed depends on the shapes, not on the weights, and nothing is downloaded.
Rows, each for batch 1 and batch 4, on the same card in the same run:

- ``diffusers fp16``: ``StableDiffusionPipeline(...)`` / ``StableDiffusionXLPipeline(...)``
  moved to the GPU in fp16, nothing else: the baseline;
- ``engine eager``: the same modules after the engine's ``apply_family_fixes``, ``apply_plan``
  and fast path, with the device plan the model manager makes from the environment;
- ``engine compiled (<mode>)``: that plus ``torch.compile`` (``--compile-mode``, default
  ``default``), with its warm-up (compile) seconds;
- afterwards, if time is left: ablations (``engine eager`` without channels_last, without
  fused projections) and, with ``--bf16``, ``engine eager bf16``.

Each cell: seconds per image (median of ``--repeats`` calls; the engine's eager and compiled
rows are interleaved), denoising iterations per second, peak memory (``max_memory_allocated`` on
CUDA, the process RSS on the CPU) and the first call or compile warm-up. Then the HTTP part: the
SD 1.5 pipeline saved with ``save_pretrained``, served from a catalogue entry by gunicorn
(thread mode, SQLite, as bench/load.py does), ``--clients`` concurrent clients sending
``--requests`` txt2img requests, with ``BATCH_MAX_IMAGES=1`` (batching off) and ``8`` (on).

The most important measurements run first (SD 1.5 batch 1, then batch 4, then SDXL, then HTTP,
then the extras); the JSON file is rewritten after every measurement and ``--budget`` stops new
ones from starting once spent, so a run cut short still leaves what it measured. ``--tiny`` runs
tiny-sd and tiny-sdxl at 64x64 on the CPU in well under a minute (the compiled row with the
``eager`` compile backend unless ``--compile-backend`` says otherwise).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 35mm"
FAMILIES = {"sd15": "tiny-sd", "sdxl": "tiny-sdxl"}
GUIDANCE = {"sd15": 7.5, "sdxl": 5.0}
DEFAULT_SIZES = {"sd15": 512, "sdxl": 1024}
# Rough compile times on an H100 (default mode, one shape): a compile row starts only with this
# much of --budget left, so it doesn't run far past it.
COMPILE_GUESS_S = {"sd15": 90, "sdxl": 240}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny-sd / tiny-sdxl at 64x64 on the CPU")
    parser.add_argument("--models", default="sd15,sdxl", help="comma list of sd15, sdxl")
    parser.add_argument("--steps", type=int, help="denoising steps (default 30; --tiny 2)")
    parser.add_argument("--sizes", default="", help="e.g. sd15=512,sdxl=1024 (default; --tiny 64)")
    parser.add_argument("--batches", default="1,4", help="images per call, one column group each")
    parser.add_argument("--repeats", type=int, help="timed calls per cell, median reported (default 3; --tiny 1)")
    parser.add_argument(
        "--compile-mode", default="default", choices=("off", "default", "reduce-overhead", "max-autotune")
    )
    parser.add_argument("--compile-backend", help="inductor (default), aot_eager or eager (--tiny default)")
    parser.add_argument(
        "--compile-cache", type=Path, help="compile cache folder (default: a fresh one, so warm-up is a cold compile)"
    )
    parser.add_argument("--bf16", action="store_true", help="also an engine eager row in bf16")
    parser.add_argument("--no-ablations", action="store_true", help="skip the channels_last / fused QKV off rows")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("-n", "--requests", type=int, help="HTTP requests per mode (default 64; --tiny 8)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    parser.add_argument("--http-batch", type=int, default=8, help="BATCH_MAX_IMAGES for the batching-on run")
    parser.add_argument("--http-compile", default="off", help="COMPILE for the server (default off)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when present; --tiny cpu)")
    parser.add_argument("--budget", type=float, default=0.0, help="seconds; no new measurement starts after")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or any(m not in FAMILIES for m in args.models):
        parser.error(f"--models must be a comma list of {', '.join(FAMILIES)}")
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not args.batches or any(not 1 <= b <= 64 for b in args.batches):
        parser.error("--batches must be numbers between 1 and 64")
    args.steps = args.steps or (2 if args.tiny else 30)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    args.requests = args.requests or (8 if args.tiny else 64)
    args.compile_backend = args.compile_backend or ("eager" if args.tiny else "inductor")
    sizes = dict.fromkeys(FAMILIES, 64) if args.tiny else dict(DEFAULT_SIZES)
    for part in filter(None, (p.strip() for p in args.sizes.split(","))):
        family, _, value = part.partition("=")
        if family not in FAMILIES or not value.isdigit() or int(value) % 8:
            parser.error(f"--sizes entries look like sd15=512 (a multiple of 8), got {part!r}")
        sizes[family] = int(value)
    args.size = sizes
    if not (1 <= args.steps <= 500 and 1 <= args.repeats <= 50 and 1 <= args.requests <= 1000):
        parser.error("--steps must be 1..500, --repeats 1..50, -n 1..1000")
    if not 1 <= args.clients <= 64:
        parser.error("--clients must be 1..64")
    return args


# -- measuring ----------------------------------------------------------------------------------
class Meter:
    """Wall time with the device synchronised, and peak memory of the device (or the process)."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 2**20
        return _rss_bytes() / 2**20

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def _rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- building pipelines -------------------------------------------------------------------------
def build_pipeline(family: str, args: argparse.Namespace, dtype: Any) -> Any:
    """A ``family`` pipeline with random weights on ``args.device`` in ``dtype``, plain diffusers."""
    import diffusers
    import torch

    if args.tiny:
        from backend.config import EngineConfig
        from backend.tiny import ensure_tiny_model

        folder = ensure_tiny_model(FAMILIES[family], EngineConfig.from_env(os.environ, base_dir=ROOT).tiny_models_dir)
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=dtype)
        pipe.to(args.device)
    else:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from backend.single_file import family_config_dir

        folder = family_config_dir(family, ROOT / ".cache" / "model-configs")
        index = json.loads((folder / "model_index.json").read_text())
        torch.manual_seed(0)
        with torch.device(args.device):  # random init on the GPU: seconds, not minutes
            parts: dict[str, Any] = {
                "unet": diffusers.UNet2DConditionModel.from_config(
                    diffusers.UNet2DConditionModel.load_config(folder / "unet")
                ),
                "vae": diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(folder / "vae")),
                "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            }
            if family == "sdxl":
                parts["text_encoder_2"] = CLIPTextModelWithProjection(
                    CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
                )
        parts = {name: module.to(dtype=dtype).eval() for name, module in parts.items()}
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        parts["scheduler"] = getattr(diffusers, index["scheduler"][1]).from_pretrained(folder, subfolder="scheduler")
        if family == "sdxl":
            parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
            pipe = diffusers.StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
        else:
            pipe = diffusers.StableDiffusionPipeline(
                **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Subject:
    """One model's modules, switched between the rows' states (baseline, engine, compiled)."""

    def __init__(self, family: str, args: argparse.Namespace, plan: Any, meter: Meter) -> None:
        from backend.catalog import ModelSpec
        from backend.devices import torch_dtype

        self.family, self.args, self.plan, self.meter = family, args, plan, meter
        self.size = args.size[family]
        self.base_dtype = "fp16" if args.device.startswith("cuda") else "fp32"
        self.pipe = build_pipeline(family, args, torch_dtype(self.base_dtype))
        self.spec = ModelSpec(id=f"bench-{family}", name=family, family=family, default_size=self.size)
        self.engine_ready = False
        self.compiled_calls: list[Any] | None = None

    def baseline(self) -> None:
        from backend import fastpath

        self._set_compiled(False)
        fastpath.use_fused_attention(self.pipe, False)
        fastpath.set_channels_last(self.pipe, False)

    def engine(self, *, compiled: bool = False, channels_last: bool | None = None, fused: bool | None = None) -> None:
        from backend import fastpath
        from backend.manager import apply_family_fixes, apply_plan

        if not self.engine_ready:
            apply_family_fixes(self.pipe, self.spec, self.plan)
            apply_plan(self.pipe, self.plan)
            self.engine_ready = True
        fastpath.apply_fast_path(self.pipe, self.plan)
        fastpath.set_channels_last(self.pipe, self.plan.channels_last if channels_last is None else channels_last)
        fastpath.use_fused_attention(self.pipe, self.plan.fuse_qkv if fused is None else fused)
        self._set_compiled(compiled)

    def to_dtype(self, dtype: str) -> None:
        # Converting gives the fused layers and their views separate copies: unfuse first.
        from backend import fastpath
        from backend.devices import torch_dtype

        fastpath.unfuse_qkv(self.pipe)
        self.pipe.to(dtype=torch_dtype(dtype))

    def compile(self, batch: int) -> float:
        """Compile (first time) and warm the (size, size, batch) shape up; returns the seconds."""
        from backend import fastpath

        self.engine()
        shape = [(self.size, self.size, batch)]
        cache_dir = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).parent
        if self.compiled_calls is None:
            report = fastpath.compile_and_warm_up(
                self.pipe,
                model_id=self.spec.id,
                plan=replace(self.plan, compile=self.args.compile_mode),
                shapes=shape,
                cache_dir=cache_dir,
                backend=self.args.compile_backend,
                guidance_scale=GUIDANCE[self.family],
            )
            self.compiled_calls = fastpath.compiled_calls(self.pipe)
            for call in self.compiled_calls:
                call.stance = "fail_on_recompile"  # a compiled row must not quietly run eagerly
            return report.seconds
        self._set_compiled(True)
        started = time.perf_counter()
        fastpath.warm_up(self.pipe, shape, guidance_scale=GUIDANCE[self.family])
        self.meter.sync()
        return time.perf_counter() - started

    def _set_compiled(self, on: bool) -> None:
        # Toggled by hand (nn.Module.compile's slot) so the rows share one set of compiled graphs.
        from backend import fastpath

        if on and self.compiled_calls is not None:
            self.pipe.unet._compiled_call_impl, self.pipe.vae.decoder._compiled_call_impl = self.compiled_calls
        elif not on:
            fastpath.uncompile_pipeline(self.pipe)

    def call(self, batch: int) -> float:
        import torch

        generators = [torch.Generator(device="cpu").manual_seed(i) for i in range(batch)]
        self.meter.sync()
        started = time.perf_counter()
        with torch.inference_mode():
            self.pipe(
                prompt=PROMPT,
                width=self.size,
                height=self.size,
                num_inference_steps=self.args.steps,
                guidance_scale=GUIDANCE[self.family],
                num_images_per_prompt=batch,
                generator=generators,
            )
        self.meter.sync()
        return time.perf_counter() - started

    def release(self) -> None:
        # The compiled graphs (and CUDA graph pools) would keep memory the next model's peak counts.
        if self.compiled_calls is not None:
            import torch._dynamo

            torch._dynamo.reset()
        self.compiled_calls = None
        self.pipe = None
        self.meter.free()


# -- the run ------------------------------------------------------------------------------------
class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.results: dict[str, Any] = {"args": _jsonable(vars(args)), "rows": [], "http": {}, "skipped": []}
        self.meter: Meter | None = None

    # budget and bookkeeping
    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.started) if self.args.budget else float("inf")

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", flush=True)

    def may_start(self, what: str, need: float = 0.0) -> bool:
        if self.left() > need:
            return True
        self.results["skipped"].append(what)
        self.say(f"skipped (budget): {what}")
        self.flush()
        return False

    def flush(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        path = self.args.json
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.results, indent=2))
        os.replace(tmp, path)

    def row(self, family: str, variant: str) -> dict[str, Any]:
        for row in self.results["rows"]:
            if row["model"] == family and row["variant"] == variant:
                return row
        row = {"model": family, "variant": variant, "size": self.args.size[family], "steps": self.args.steps}
        self.results["rows"].append(row)
        return row

    def cell(self, family: str, variant: str, batch: int) -> dict[str, Any]:
        return self.row(family, variant).setdefault(f"b{batch}", {"batch": batch, "times_s": []})

    def record(self, subject: Subject, variant: str, batch: int, seconds: float) -> None:
        cell = self.cell(subject.family, variant, batch)
        cell["times_s"].append(round(seconds, 4))
        median = statistics.median(cell["times_s"])
        cell.update(
            s_per_image=round(median / batch, 4),
            it_per_s=round(self.args.steps / median, 2),
            peak_mib=round(max(cell.get("peak_mib", 0.0), subject.meter.peak_mib()), 1),
        )
        self.say(f"{subject.family} {variant} b{batch}: {seconds:.3f}s ({median / batch:.3f} s/image median)")
        self.flush()

    def fail(self, family: str, variant: str, batch: int | None, exc: BaseException) -> None:
        target = self.cell(family, variant, batch) if batch else self.row(family, variant)
        target["error"] = f"{type(exc).__name__}: {exc}"[:500]
        self.say(f"{family} {variant} b{batch}: FAILED {target['error']}")
        traceback.print_exc()
        self.flush()

    # the parts
    def timed(self, subject: Subject, variant: str, batch: int, *, first: bool) -> None:
        subject.meter.reset_peak()
        if first:
            self.cell(subject.family, variant, batch)["first_call_s"] = round(subject.call(batch), 3)
            subject.meter.reset_peak()
        self.record(subject, variant, batch, subject.call(batch))

    def core(self, family: str, plan: Any) -> None:
        args = self.args
        baseline = f"diffusers {'fp16' if args.device.startswith('cuda') else 'fp32'}"
        eager = "engine eager"
        compiled = f"engine compiled ({args.compile_mode}" + (
            f", {args.compile_backend} backend)" if args.compile_backend != "inductor" else ")"
        )
        if not self.may_start(f"{family}: build"):
            return
        try:
            subject = Subject(family, args, plan, self.meter)
        except Exception as exc:  # noqa: BLE001 - a model that can't be built leaves the rest
            self.fail(family, baseline, None, exc)
            return
        for batch in args.batches:
            for variant, state in ((baseline, subject.baseline), (eager, subject.engine)):
                if not self.may_start(f"{family} {variant} b{batch}"):
                    continue
                try:
                    state()
                    for n in range(args.repeats if variant == baseline else 1):
                        self.timed(subject, variant, batch, first=n == 0)
                except Exception as exc:  # noqa: BLE001
                    self.fail(family, variant, batch, exc)
            have_compiled = args.compile_mode != "off"
            need = 0 if args.tiny else COMPILE_GUESS_S[family] * (1 if subject.compiled_calls is None else 0.7)
            if have_compiled and self.may_start(f"{family} {compiled} b{batch}", need):
                try:
                    subject.meter.reset_peak()
                    warmup = subject.compile(batch)
                    self.cell(family, compiled, batch)["warmup_s"] = round(warmup, 2)
                    self.timed(subject, compiled, batch, first=False)
                except Exception as exc:  # noqa: BLE001
                    self.fail(family, compiled, batch, exc)
                    have_compiled = False
            else:
                have_compiled = False
            # Eager and compiled interleaved: switching is free, and the two share the noise.
            for _ in range(args.repeats - 1):
                for variant, on in ((eager, False), (compiled, True)):
                    if (on and not have_compiled) or not self.may_start(f"{family} {variant} b{batch} repeat"):
                        continue
                    try:
                        subject.engine(compiled=on)
                        self.timed(subject, variant, batch, first=False)
                    except Exception as exc:  # noqa: BLE001
                        self.fail(family, variant, batch, exc)
        subject.release()

    def extras(self, plan: Any) -> None:
        """Rows that say why the defaults are what they are; sd15 only, eager."""
        args = self.args
        family = "sd15" if "sd15" in args.models else args.models[0]
        rows: list[tuple[str, dict[str, Any], str | None]] = []
        if not args.no_ablations:
            if plan.channels_last:
                rows.append(("engine eager, channels_last off", {"channels_last": False}, None))
            if plan.fuse_qkv:
                rows.append(("engine eager, fused QKV off", {"fused": False}, None))
        if args.bf16:
            rows.append(("engine eager bf16", {}, "bf16"))
        if not rows or not self.may_start(f"{family}: build for the extra rows"):
            return
        try:
            subject = Subject(family, args, plan, self.meter)
        except Exception as exc:  # noqa: BLE001
            self.fail(family, rows[0][0], None, exc)
            return
        for variant, switches, dtype in rows:
            if dtype:
                subject.to_dtype(dtype)
            for batch in args.batches:
                if not self.may_start(f"{family} {variant} b{batch}"):
                    continue
                try:
                    subject.engine(**switches)
                    for n in range(args.repeats):
                        self.timed(subject, variant, batch, first=n == 0)
                except Exception as exc:  # noqa: BLE001
                    self.fail(family, variant, batch, exc)
        subject.release()

    def _stack(self, load: Any, catalog: Path, size: int, batch_max: int) -> Any:
        args = self.args
        ns = argparse.Namespace(
            model="bench-sd15",
            steps=args.steps,
            size=size,
            concurrency=args.clients,
            requests=args.requests,
            redis="redis://127.0.0.1:6379/15",  # unused in thread mode, but must parse
            web_processes=1,
            batch_max=batch_max,
            device_threads=0,  # torch's own default: the pipeline runs on the GPU here
        )
        stack = load.Stack("thread", ns)
        stack.env.update(
            MODEL_CATALOG_FILE=str(catalog),
            DEFAULT_MODEL="bench-sd15",
            PRELOAD_MODELS="",
            HF_HUB_OFFLINE="1",
            DEVICE=args.device,
            BATCH_MAX_IMAGES=str(batch_max),
            COMPILE=args.http_compile,
            COMPILE_CACHE_DIR=str(Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).parent),
            GUNICORN_TIMEOUT="600",
        )
        return stack

    def http(self) -> None:
        args = self.args
        if args.skip_http or not self.may_start("http"):
            return
        from bench import load

        folder = Path(tempfile.mkdtemp(prefix="sdapi-bench-gpu-model-"))
        try:
            subject = Subject("sd15", args, _plain_plan(args.device), self.meter)
            subject.pipe.save_pretrained(folder / "model", safe_serialization=True)
            subject.release()
        except Exception as exc:  # noqa: BLE001
            self.results["http"]["error"] = f"saving the model failed: {type(exc).__name__}: {exc}"
            self.flush()
            shutil.rmtree(folder, ignore_errors=True)
            return
        size = args.size["sd15"]
        catalog = folder / "catalog.json"
        entry = {"id": "bench-sd15", "family": "sd15", "default_size": size, "default_steps": args.steps}
        catalog.write_text(json.dumps([entry | {"path": str(folder / "model")}]))
        http = self.results["http"]
        http.update(requests=args.requests, clients=args.clients, size=size, steps=args.steps)
        modes = {"off": 1, "on": args.http_batch}
        stacks = {label: self._stack(load, catalog, size, batch_max) for label, batch_max in modes.items()}
        # Both servers start and load the model at once (a server start is mostly imports and
        # the load); then each is measured alone while the other idles.
        self.say("http: starting a server with batching off and one with it on ...")
        try:
            with ThreadPoolExecutor(max_workers=len(stacks)) as pool:
                firsts = {label: pool.submit(_start, stack) for label, stack in stacks.items()}
            for label, batch_max in modes.items():
                try:
                    first = firsts[label].result()
                    if not self.may_start(f"http batching {label}"):
                        continue
                    measured = stacks[label].batch()
                    http[label] = {
                        "batch_max_images": batch_max,
                        "first_request_s": round(first, 2),
                        "images_per_s": round(args.requests / measured["wall_s"], 3),
                        **{k: round(v, 4) for k, v in measured.items()},
                    }
                    self.say(f"http batching {label}: {http[label]['images_per_s']:.2f} images/s")
                except (Exception, SystemExit) as exc:  # noqa: BLE001 - bench/load.py exits on a failed request
                    http[label] = {"batch_max_images": batch_max, "error": f"{type(exc).__name__}: {exc}"[:500]}
                    self.say(f"http batching {label}: FAILED {http[label]['error']}")
                self.flush()
        finally:
            for label, stack in stacks.items():
                # A failed server keeps its folder (logs, database) for a look; the others go.
                failed = "error" in http.get(label, {})
                stack.__exit__(RuntimeError if failed else None, None, None)
            shutil.rmtree(folder, ignore_errors=True)
        if "images_per_s" in http.get("on", {}) and "images_per_s" in http.get("off", {}):
            http["on_off_ratio"] = round(http["on"]["images_per_s"] / http["off"]["images_per_s"], 3)
            self.flush()


def _start(stack: Any) -> float:
    """Start ``stack`` and make its first request (which loads the model); returns its seconds."""
    stack.__enter__()
    started = time.perf_counter()
    stack.generate(0)
    return time.perf_counter() - started


def _plain_plan(device: str) -> Any:
    from backend.devices import DevicePlan

    dtype = "fp16" if device.startswith("cuda") else "fp32"
    return DevicePlan(
        device=device, dtype=dtype, attention_slicing=False, vae_slicing=False, vae_tiling=False, cpu_offload="off"
    )


def engine_plan(device: str) -> Any:
    """The plan the model manager makes from this environment, on ``device``, uncompiled."""
    from backend.config import EngineConfig
    from backend.manager import ModelManager

    env = {**os.environ, "DEVICE": device, "COMPILE": "off", "CPU_OFFLOAD": "off"}
    return ModelManager(EngineConfig.from_env(env, base_dir=ROOT)).device_plan()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def environment(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device.startswith("cuda"):
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


# -- the table ----------------------------------------------------------------------------------
def table(results: dict[str, Any]) -> str:
    batches = results["args"]["batches"]
    head = ["model", "row"]
    for b in batches:
        head += [f"b{b} s/image", f"b{b} it/s", f"b{b} peak MiB"]
    head.append("warm-up s")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in results["rows"]:
        cells = [f"{row['model']} {row['size']}²", row["variant"]]
        warm = []
        for b in batches:
            cell = row.get(f"b{b}", {})
            if "s_per_image" in cell:
                cells += [f"{cell['s_per_image']:.3f}", f"{cell['it_per_s']:.2f}", f"{cell['peak_mib']:.0f}"]
            else:
                cells += ["error" if "error" in cell else "-", "", ""]
            warm.append(f"{cell['warmup_s']:.1f}" if "warmup_s" in cell else "-")
        cells.append(" / ".join(warm))
        lines.append("| " + " | ".join(cells) + " |")
    http = results.get("http") or {}
    if any(k in http for k in ("off", "on")):
        lines += [
            "",
            f"HTTP: {http['requests']} txt2img requests, {http['clients']} concurrent clients, "
            f"SD 1.5 {http['size']}², {http['steps']} steps",
            "",
            "| batching | BATCH_MAX_IMAGES | images/s | p50 s | p95 s | first request s |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for label in ("off", "on"):
            r = http.get(label)
            if not r:
                continue
            if "error" in r:
                lines.append(f"| {label} | {r['batch_max_images']} | error: {r['error'][:80]} | | | |")
            else:
                lines.append(
                    f"| {label} | {r['batch_max_images']} | {r['images_per_s']:.2f} | {r['p50_s']:.3f} | "
                    f"{r['p95_s']:.3f} | {r['first_request_s']:.1f} |"
                )
        if "on_off_ratio" in http:
            lines += ["", f"batching on / off: {http['on_off_ratio']:.2f}x images/s"]
    if results.get("skipped"):
        lines += ["", "not measured (budget): " + "; ".join(results["skipped"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("ENV_FILE", "none")
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # random weights in fp16 make NaN pixels
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.compile_cache:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(args.compile_cache / "inductor"))
    else:
        os.environ.setdefault(
            "TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.mkdtemp(prefix="sdapi-compile-")) / "inductor")
        )

    import torch

    if args.device is None:
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if args.device == "cuda":
        args.device = "cuda:0"
    run = Run(args)
    run.meter = Meter(args.device)
    plan = engine_plan(args.device)
    run.results.update(environment=environment(args.device), plan=plan.as_dict())
    run.results["compile_cache"] = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    print(
        f"{', '.join(args.models)} on {args.device}, {args.steps} steps, batches {args.batches}, "
        f"{args.repeats} repeats; engine plan {plan.as_dict()}",
        flush=True,
    )
    run.flush()
    for family in args.models:
        run.core(family, plan)
    run.http()
    run.extras(plan)
    run.flush()
    print("\n" + table(run.results))
    print(f"\n{time.monotonic() - run.started:.0f}s; results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
