"""Token merging's speed: the same txt2img request through the engine at ratio 0 and at a ratio (0.5 by default),
interleaved so that machine noise hits both alike; the fastest run of each (on a shared machine other work only ever
adds time), their medians, and how many times faster the merged run is.

Merging only touches self-attention at the full latent size, so what it saves grows with the token count there
(the size) and with how much of a step that attention is. The default model is the tests' tiny random model in
SD 1.x's layout (attention at the full latent size); at 128x128 its latent is 64x64, SD 1.5's token count at 512x512,
with far fewer channels, so attention weighs more in its step than in SD 1.5's. --sd-v1 runs SD 1.5's real UNet
(random weights; slow on a CPU). The embedded model has no attention at the full latent size: nothing merges there,
as in A1111 with SDXL, and the bench says so.

    python bench/token_merging.py                                   # tiny SD 1.x-layout model, 128x128, 4 steps
    python bench/token_merging.py --sd-v1 --size 512 --steps 2 --runs 2
    python bench/token_merging.py --model models/sd-emoji-tiny      # nothing to merge (64x64, its own size)
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def load_pipeline(args):
    """The model to time, as a diffusers pipeline on the CPU in float32."""
    from diffusers import StableDiffusionPipeline

    if args.model:
        return StableDiffusionPipeline.from_pretrained(args.model, local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
    if args.sd_v1:
        from bench.gpu_speed import build_components

        return StableDiffusionPipeline(**build_components(SimpleNamespace(device="cpu", dtype=torch.float32,
                                                                          tiny=False)))
    from tests.tiny_sd import make_tiny_pipeline

    return make_tiny_pipeline(full_size_attention=True)


def engine_for(pipe):
    from webui.config import Settings
    from webui.engine.generate import Engine
    from webui.engine.models import ModelEntry, ModelRegistry

    pipe.set_progress_bar_config(disable=True)  # as the engine's own loads
    folder = Path(tempfile.mkdtemp())
    engine = Engine(Settings(models_dir=folder, outdir=folder, device="cpu"), ModelRegistry(folder, folder / "h.json"))
    engine.use_pipeline(pipe, ModelEntry("benchmarked", "memory", "diffusers"))
    return engine


def merged_calls(pipe, size: int, ratio: float) -> int:
    """How many self-attention calls of one UNet call run on merged tokens at this size."""
    from webui.engine.token_merging import merged_tokens

    unet = pipe.unet
    side = size // pipe.vae_scale_factor
    sample = torch.randn(1, unet.config.in_channels, side, side)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.inference_mode(), merged_tokens(unet, ratio) as calls:
        unet(sample, 500, context)
    return calls.count


def timed(engine, request) -> float:
    started = time.perf_counter()
    engine.generate(request, [request.seed])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, help="a diffusers model folder (default: the tiny SD 1.x-layout model)")
    model.add_argument("--sd-v1", action="store_true", help="SD 1.5's UNet, VAE and text encoder, random weights")
    parser.add_argument("--size", type=int, help="width and height (default: 128; 512 with --sd-v1; the model's "
                                                 "own with --model)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5, help="timed runs at each ratio, after one warm-up each")
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    from diffusers.utils.logging import disable_progress_bar
    from transformers.utils.logging import disable_progress_bar as disable_loading_bar

    from webui.schemas import GenerationRequest

    disable_progress_bar()
    disable_loading_bar()
    pipe = load_pipeline(args)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    args.size = args.size or (512 if args.sd_v1 else native if args.model else 128)
    engine = engine_for(pipe)
    side = args.size // pipe.vae_scale_factor
    calls = merged_calls(pipe, args.size, args.ratio)
    name = args.model.name if args.model else "SD 1.5 (random weights)" if args.sd_v1 else "tiny, SD 1.x layout"
    print(f"model: {name}; {args.size}x{args.size} ({side}x{side} latent tokens), {args.steps} Euler steps, CFG 7, "
          f"batch 1, {args.runs} runs each, torch threads: {torch.get_num_threads()}")
    print(f"self-attention calls merged per UNet call at ratio {args.ratio:g}: {calls}")
    if not calls:
        print("nothing merges with this model (no attention at the full latent size), as in A1111")
    base = dict(prompt="a red apple", negative_prompt="blurry", steps=args.steps, cfg_scale=7.0, sampler_name="Euler",
                width=args.size, height=args.size, seed=1)
    requests = {ratio: GenerationRequest(**base, token_merging_ratio=ratio) for ratio in (0.0, args.ratio)}
    for request in requests.values():  # warm-up, both
        timed(engine, request)
    seconds = {ratio: [] for ratio in requests}
    for _ in range(args.runs):
        for ratio, request in requests.items():
            seconds[ratio].append(timed(engine, request))
    for ratio, runs in seconds.items():
        print(f"ratio {ratio:g}: fastest {min(runs):.3f} s per image, median {statistics.median(runs):.3f} "
              f"(runs {', '.join(f'{run:.3f}' for run in runs)})")
    plain, merged = (min(seconds[ratio]) for ratio in requests)
    print(f"speed-up: {plain / merged:.2f}x (ratio 0's fastest run / ratio {args.ratio:g}'s)")


if __name__ == "__main__":
    main()
