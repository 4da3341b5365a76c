"""How fast is txt2img on this GPU: plain diffusers vs diffusers + compiled UNet vs our fast path.

Builds SD 1.5 from the shipped config (webui/engine/model_configs/sd-v1) with random weights, so no
download is needed (speed does not depend on the weight values), and times full pipeline runs:

    python bench/gpu_speed.py                  # CUDA, fp16, 512x512, 20 Euler steps, CFG 7.5, batch 1 and 8
    python bench/gpu_speed.py --rows eager,fast_path --batch-sizes 1
    python bench/gpu_speed.py --tiny --json /tmp/t.json   # CPU smoke test with a tiny model (CI)

Each row reports the median of --repeats runs after --warmup runs (which absorb compilation),
with torch.cuda.synchronize() around every timed run. FLOPs are counted once per batch size with
torch.utils.flop_counter on one UNet pass (CFG doubles its batch) and one VAE decode; a run costs
steps x UNet + VAE. The floor is FLOPs / peak: the time the arithmetic alone would take at the card's
peak dense fp16 rate, so "x floor" says how far from the hardware limit a row is. On CUDA the engine
rows also count the host-device synchronisations inside the denoising loop (JSON: loop_syncs) and say
where each came from (loop_sync_sites). The JSON is rewritten after every row, so a run cut short by a
time limit keeps what it measured.

`--tune` adds one row per setting that the fast path does not use yet ("fast_path+<setting>", compiled
afresh under it), so one GPU run shows which settings pay before any goes into the engine:

    python bench/gpu_speed.py --rows eager,fast_path,engine --tune all --batch-sizes 8 --repeats 3 --warmup 1
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from webui.engine.fast_path import apply_fast_path  # noqa: E402

CONFIGS = ROOT / "webui" / "engine" / "model_configs"
ROWS = ("eager", "compiled_unet", "fast_path", "engine")
SITE_FRAMES = 6  # Python frames kept per loop sync: enough to reach our code from inside torch
# What --tune can time; each keeps the maths the same (the rows' images are checked against eager), except
# the fp8 rows, which round the linear layers' operands to 8 bits to see what that would buy.
TUNINGS = {
    "cudnn_benchmark": "cuDNN times its convolution algorithms for each shape and keeps the fastest",
    "conv_1x1_as_mm": "inductor turns 1x1 convolutions into matmuls that it can fuse with their neighbours",
    "cudnn_attention": "SDPA prefers cuDNN's attention kernel (then flash, memory-efficient, math)",
    "coordinate_descent": "inductor tunes each Triton kernel's block sizes by coordinate descent while compiling",
    "freezing": "inductor folds the weights into the compiled graph as constants and picks their layouts",
    "fp8_linear": "the UNet's linear layers multiply in float8 (e4m3, scaled per tensor; changes the maths)",
    "fp8_linear_static": "fp8_linear with each input's scale measured once in a calibration run, not every call",
    "fused_qkv": "one matmul for an attention layer's query, key and value projections",
}
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"

# A few-hundred-thousand-parameter SD for --tiny (same block types as SD 1.5, diffusers' test sizes).
TINY = {
    "unet": dict(block_out_channels=[16, 32], layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                 cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8),
    "vae": dict(block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=64),
    "text_encoder": dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=77),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU, tiny model, fp32, 64x64, 2 steps, batch 1 and 2")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list out of {', '.join(ROWS)}")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 1,8; tiny 1,2)")
    p.add_argument("--size", type=int, default=None, help="width = height (default 512; tiny 64)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default 20; tiny 2)")
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed runs per row and batch (default 2: compile, then CUDA-graph recording; tiny 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs; the median is reported (default 5; tiny 2)")
    p.add_argument("--peak-tflops", type=float, default=790.0,
                   help="the card's dense fp16/bf16 peak in TFLOP/s for the floor (H100 SXM spec sheet: 989)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; tiny eager)")
    p.add_argument("--tune", default="", help=f"comma list out of {', '.join(TUNINGS)}, or all: a fast_path row "
                   "for each, compiled under that setting")
    p.add_argument("--tune-batch-sizes", default=None, help="comma list for the --tune rows (default --batch-sizes)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", type=Path, default=None, help="default bench/results/<date>-<card>.json")
    args = p.parse_args(argv)

    tiny = args.tiny
    args.device = "cpu" if tiny else "cuda"
    args.dtype = torch.float32 if tiny else torch.float16
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if tiny else "1,8")).split(",")]
    args.tune_batch_sizes = ([int(b) for b in args.tune_batch_sizes.split(",")] if args.tune_batch_sizes
                             else args.batch_sizes)
    args.size = args.size or (64 if tiny else 512)
    args.steps = args.steps or (2 if tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    args.repeats = args.repeats or (2 if tiny else 5)
    # Inductor on a CPU would spend minutes compiling C++; the eager backend still checks the wiring.
    args.compile_backend = args.compile_backend or ("eager" if tiny else "inductor")
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    args.rows = [r for r in ROWS if r in args.rows]  # fixed order: the fast path changes modules in place
    tune = list(TUNINGS) if args.tune.strip() == "all" else [t.strip() for t in args.tune.split(",") if t.strip()]
    if set(tune) - set(TUNINGS):
        p.error(f"unknown --tune {sorted(set(tune) - set(TUNINGS))}; choose from {', '.join(TUNINGS)} or all")
    # fused_qkv last: it adds fused weights to the shared modules, which would count in later rows' memory
    args.tune = [t for t in TUNINGS if t in tune]
    if not tiny and not torch.cuda.is_available():
        p.error("no CUDA GPU visible; use --tiny for the CPU smoke test")
    return args


def card_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else f"cpu-{platform.machine()}"


def build_components(args, tiny: dict = TINY) -> dict:
    """SD 1.5 (or, with --tiny, `tiny`'s) components with random weights, created directly on the device."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    sd15 = CONFIGS / "sd-v1"
    with torch.device(args.device):  # random init on the GPU takes seconds, not minutes
        if args.tiny:
            unet = UNet2DConditionModel(**tiny["unet"])
            vae = AutoencoderKL(**tiny["vae"])
            text_encoder = CLIPTextModel(CLIPTextConfig(**tiny["text_encoder"]))
        else:
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sd15, subfolder="unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(sd15, subfolder="vae"))
            text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(sd15, subfolder="text_encoder"))
    scheduler = EulerDiscreteScheduler.from_config(
        json.loads((sd15 / "scheduler" / "scheduler_config.json").read_text()))
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    for model in parts.values():
        model.to(args.dtype).eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(CONFIGS / "clip-tokenizer")
    return {**parts, "scheduler": scheduler, "tokenizer": tokenizer, "safety_checker": None,
            "feature_extractor": None, "requires_safety_checker": False}


def make_pipeline(components: dict):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_flops(pipe, args, batch: int) -> int:
    """FLOPs of one txt2img run: steps x one UNet pass (CFG doubles the batch) + one VAE decode."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae = pipe.unet, pipe.vae
    latent = args.size // pipe.vae_scale_factor
    rows = 2 * batch if args.cfg > 1 else batch
    sample = torch.randn(rows, unet.config.in_channels, latent, latent, device=args.device, dtype=args.dtype)
    context = torch.randn(rows, 77, unet.config.cross_attention_dim, device=args.device, dtype=args.dtype)
    timestep = torch.tensor(500.0, device=args.device)
    # The math attention kernel is made of matmuls the counter sees; flash kernels on the CPU are not
    # counted. Both do the same arithmetic.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as unet_count:
            unet(sample, timestep, encoder_hidden_states=context)
        with FlopCounterMode(display=False) as vae_count:
            vae.decode(sample[:batch] / vae.config.scaling_factor)
    return args.steps * unet_count.get_total_flops() + vae_count.get_total_flops()


def generate(pipe, args, batch: int):
    from webui.engine.generate import Engine

    if isinstance(pipe, Engine):
        return generate_with_engine(pipe, args, batch)
    # One CPU generator per image, seeded as the engine seeds them: every row draws the same noise,
    # so the rows' images can be compared at every batch size.
    generators = [torch.Generator("cpu").manual_seed(args.seed + i) for i in range(batch)]
    return pipe([PROMPT] * batch, height=args.size, width=args.size, num_inference_steps=args.steps,
                guidance_scale=args.cfg, generator=generators, output_type="np").images


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark (Linux: KiB)


def generate_with_engine(engine, args, batch: int):
    """Our engine end to end: request -> per-image CPU noise -> denoise -> own VAE decode -> 8-bit images."""
    return engine.generate(engine_request(args), [args.seed + i for i in range(batch)])


def as_array(images):
    """A row's output as one float array in [0, 1], for comparing rows (outside the timed region): the
    pipelines give one already, the engine gives 8-bit images."""
    import numpy as np

    if isinstance(images, np.ndarray):
        return images
    return np.stack([np.asarray(r.image, dtype=np.float32) / 255 for r in images])


def engine_request(args):
    """The benchmark's workload as a request to our engine."""
    from webui.schemas import GenerationRequest

    return GenerationRequest(prompt=PROMPT, steps=args.steps, cfg_scale=args.cfg, width=args.size,
                             height=args.size, sampler_name="Euler")


def loop_sync_sites(engine, request, seeds: list[int]) -> list[str]:
    """Where the denoising loop waited for the GPU, from step 2 to the end (CUDA only): one entry per
    host-device synchronisation, naming the Python lines that asked for it. torch warns at each one while
    its sync debug mode is on, and the step callback turns that on after step 1."""
    import traceback
    import warnings

    sites: list[str] = []

    def note_site(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if f.filename != warnings.__file__][-SITE_FRAMES:]
            if frames and frames[-1].name == "set_sync_debug_mode":
                return  # the measuring itself (H100, 2026-11-27: on_step's switch counted as the one sync)
            sites.append(" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames)))

    def on_step(step: int, total: int, _latents) -> None:
        torch.cuda.set_sync_debug_mode("warn" if step < total else "default")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = note_site  # catch_warnings puts the original back
        try:
            engine.generate(request, seeds, on_step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def loop_syncs(engine, args, batch: int) -> list[str] | None:
    if args.device != "cuda":
        return None
    return loop_sync_sites(engine, engine_request(args), [args.seed + i for i in range(batch)])


def engine_for(pipe, args):
    import tempfile

    from webui.config import Settings
    from webui.engine.generate import Engine
    from webui.engine.models import ModelEntry, ModelRegistry

    folder = Path(tempfile.mkdtemp())
    engine = Engine(Settings(models_dir=folder, outdir=folder, device=args.device), ModelRegistry(folder, folder / "h.json"))
    engine.use_pipeline(pipe, ModelEntry("sd15-random-weights", "memory", "diffusers"))
    return engine


def time_row(pipe, args, batch: int) -> tuple[list[float], object, float]:
    for _ in range(args.warmup):
        generate(pipe, args, batch)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, images = [], None  # images: the last run, for the correctness check
    for _ in range(args.repeats):
        synchronize(args.device)
        start = time.perf_counter()
        out = generate(pipe, args, batch)
        synchronize(args.device)
        seconds.append(time.perf_counter() - start)
        images = out
    return seconds, as_array(images), peak_memory_mib(args.device)


def row_pipeline(name: str, components: dict, args, fast_pipe=None):
    if name == "eager":  # diffusers as it comes (it already uses SDPA attention)
        return make_pipeline(components)
    if name == "compiled_unet":  # the recipe in diffusers' docs; a wrapper, so shared modules stay untouched
        mode = {"mode": "reduce-overhead"} if args.compile_backend == "inductor" else {}
        compiled = torch.compile(components["unet"], fullgraph=True, backend=args.compile_backend, **mode)
        return make_pipeline({**components, "unet": compiled})
    pipe = fast_pipe or apply_fast_path(make_pipeline(components), compile=True, backend=args.compile_backend)
    return engine_for(pipe, args) if name == "engine" else pipe


@contextlib.contextmanager
def tuning(name: str):
    """The global setting behind one --tune row, held while its models compile and run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "cudnn_benchmark":
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = before
    elif name == "conv_1x1_as_mm":
        with torch._inductor.config.patch(conv_1x1_as_mm=True):
            yield
    elif name == "coordinate_descent":
        with torch._inductor.config.patch(coordinate_descent_tuning=True):
            yield
    elif name == "freezing":
        with torch._inductor.config.patch(freezing=True):
            yield
    elif name == "cudnn_attention":
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with sdpa_kernel(order, set_priority=True):
            yield
    else:  # fused_qkv and the fp8 rows change the models, not a global setting
        yield


@contextlib.contextmanager
def fp8_unet(components: dict, args):
    """A float8 copy of the shared UNet, made while the shared one waits in host memory so that the row's
    peak GPU memory counts one UNet, as the other rows' do."""
    from webui.engine.fp8_linear import use_fp8_linears

    shared = components["unet"]
    shared.to("cpu")
    try:
        unet = copy.deepcopy(shared)
        print(f"fp8_linear: {use_fp8_linears(unet)} linear layers in float8", flush=True)
        yield unet.to(args.device)
    finally:
        shared.to(args.device)


def tuned_pipeline(name: str, components: dict, args):
    # A fresh start for the compiler: inductor reads its settings when it compiles, and torch counts
    # compiled variants across rows. The CUDA graphs of the rows before are freed with it.
    torch._dynamo.reset()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return apply_fast_path(make_pipeline(components), compile=True, backend=args.compile_backend,
                           fused_qkv=name == "fused_qkv")


def measure_tuned(name: str, components: dict, args, measure) -> None:
    from webui.engine.fp8_linear import calibrated

    with tuning(name), contextlib.ExitStack() as stack:
        if name.startswith("fp8_linear"):
            unet = stack.enter_context(fp8_unet(components, args))
            components = {**components, "unet": unet}
            if name == "fp8_linear_static":  # one uncompiled run at the row's first batch size sets the scales
                with calibrated(unet):
                    generate(make_pipeline(components), args, args.tune_batch_sizes[0])
        measure(f"fast_path+{name}", tuned_pipeline(name, components, args), args.tune_batch_sizes)


def run(args, save=lambda report: None) -> dict:
    """Time every row; save(report) after each, so a run stopped by a time limit keeps what it measured."""
    components = build_components(args)
    flops = {batch: count_flops(make_pipeline(components), args, batch)
             for batch in sorted({*args.batch_sizes, *args.tune_batch_sizes})}
    eager_images, results = {}, []

    def measure(name: str, pipe, batch_sizes: list[int]) -> None:
        for batch in batch_sizes:
            seconds, images, memory = time_row(pipe, args, batch)
            median = statistics.median(seconds)
            if name == "eager":
                eager_images[batch] = images
            diff = float(abs(images - eager_images[batch]).max()) if batch in eager_images else None
            results.append({
                "row": name, "batch": batch, "median_s": median, "runs_s": seconds,
                "s_per_image": median / batch, "images_per_s": batch / median, "steps_per_s": args.steps / median,
                "flops_per_run": flops[batch], "tflops": flops[batch] / median / 1e12,
                "x_floor": median / (flops[batch] / (args.peak_tflops * 1e12)),
                "peak_mem_mib": memory, "max_abs_diff_vs_eager": diff,
            })
            if name == "engine":
                sites = loop_syncs(pipe, args, batch)
                results[-1].update(loop_syncs=None if sites is None else len(sites), loop_sync_sites=sites)
            print_row(results[-1])
            save(_report(args, results))

    fast_pipe = None  # the engine row reuses the fast path's compiled modules: no second compile
    for name in args.rows:
        pipe = row_pipeline(name, components, args, fast_pipe)
        fast_pipe = pipe if name == "fast_path" else fast_pipe
        measure(name, pipe, args.batch_sizes)
    for name in args.tune:
        try:
            measure_tuned(name, components, args, measure)
        except Exception as error:  # one setting this card or torch refuses must not cost the others' rows
            print(f"fast_path+{name}: failed: {type(error).__name__}: {error}"[:2000], flush=True)
            results.append({"row": f"fast_path+{name}", "error": f"{type(error).__name__}: {error}"[:2000]})
            save(_report(args, results))
    return _report(args, results)


def _report(args, results: list[dict]) -> dict:
    return {
        "date": dt.date.today().isoformat(), "card": card_name(args.device), "device": args.device,
        "dtype": str(args.dtype).removeprefix("torch."), "torch": torch.__version__, "diffusers": _version("diffusers"),
        "size": args.size, "steps": args.steps, "cfg": args.cfg, "sampler": "Euler", "warmup": args.warmup,
        "repeats": args.repeats, "peak_tflops": args.peak_tflops, "compile_backend": args.compile_backend,
        "tiny": args.tiny, "tune": args.tune, "peak_mem_kind": "cuda max_memory_allocated" if args.device == "cuda" else "cpu max RSS",
        "rows": results,
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


HEADER = (f"{'row':<28} {'batch':>5} {'s/img':>8} {'img/s':>8} {'steps/s':>8} {'TFLOP/s':>8} "
          f"{'x floor':>8} {'peak MiB':>9} {'max|diff|':>10}")


def print_row(r: dict) -> None:
    diff = "-" if r["max_abs_diff_vs_eager"] is None else f"{r['max_abs_diff_vs_eager']:.2e}"
    print(f"{r['row']:<28} {r['batch']:>5} {r['s_per_image']:>8.4f} {r['images_per_s']:>8.2f} "
          f"{r['steps_per_s']:>8.2f} {r['tflops']:>8.3g} {r['x_floor']:>8.3g} {r['peak_mem_mib']:>9.0f} {diff:>10}",
          flush=True)
    for site in r.get("loop_sync_sites") or []:
        print(f"    sync in the denoising loop: {site}", flush=True)


def default_json_path(args) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", card_name(args.device).lower()).strip("-")
    # tiny results are a smoke test, not a measurement: keep them out of bench/results/
    folder = ROOT / "bench" / ("out" if args.tiny else "results")
    return folder / f"{dt.date.today().isoformat()}-{'tiny-' if args.tiny else ''}{slug}.json"


def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the dtype-cast notices are expected here
    if args.tiny:
        # A tiny model gains nothing from threads, and on a shared CI box OpenMP's spin-waits stall
        # for seconds when the cores are oversubscribed.
        torch.set_num_threads(1)
    print(f"{card_name(args.device)}: {args.size}x{args.size}, {args.steps} Euler steps, CFG {args.cfg}, "
          f"{str(args.dtype).removeprefix('torch.')}, median of {args.repeats} after {args.warmup} warm-up")
    print(HEADER, flush=True)
    path = args.json or default_json_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = run(args, save=lambda partial: path.write_text(json.dumps(partial, indent=2) + "\n"))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
