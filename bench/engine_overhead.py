"""How much the engine (worker, queue, saving, history) adds over a bare diffusers call.

Runs the same txt2img request both ways on the same model, interleaved so that machine noise hits
both alike, and prints the median of each and their ratio. Target: ratio <= 1.05 at 20 steps.

    python bench/engine_overhead.py                  # tiny random model built in code
    python bench/engine_overhead.py --model models/sd-emoji-tiny --runs 10
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from webui.config import Settings  # noqa: E402
from webui.services import build_services  # noqa: E402


def bare_run(pipe, request: dict, seed: int) -> float:
    started = time.perf_counter()
    pipe(prompt=request["prompt"], negative_prompt=request["negative_prompt"],
         num_inference_steps=request["steps"], guidance_scale=request["cfg_scale"],
         generator=torch.Generator("cpu").manual_seed(seed))
    return time.perf_counter() - started


def engine_run(worker, request: dict, seed: int) -> float:
    started = time.perf_counter()
    job = worker.submit(request | {"seed": seed})
    job.wait()
    if job.error:
        raise RuntimeError(job.error)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a diffusers model folder (default: a tiny random model)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--preview-every", type=int, default=5, help="the engine's preview setting (app default 5)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from tests.tiny_sd import save_tiny_model

            model = save_tiny_model(Path(tmp) / "tiny-sd")
        model = model.resolve()
        settings = Settings(models_dir=model.parent, outdir=Path(tmp) / "outputs", ckpt=model.name,
                            device="cpu", preview_every=args.preview_every)
        services = build_services(settings)
        pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, dtype=torch.float32)
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        request = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": args.steps, "cfg_scale": 7.0,
                   "sampler_name": "Euler a", "save_images": True}

        bare_run(pipe, request, 0)  # warm-up, both paths
        engine_run(services.worker, request, 0)
        bare, engine = [], []
        for i in range(args.runs):
            bare.append(bare_run(pipe, request, i))
            engine.append(engine_run(services.worker, request, i))
        services.close()

    print(f"model: {model.name}, {args.steps} steps, {args.runs} runs each, torch threads: {torch.get_num_threads()}")
    # The minimum is the run least disturbed by other processes; the median shows the spread.
    for label, pick in (("median", statistics.median), ("min", min)):
        bare_s, engine_s = pick(bare), pick(engine)
        print(f"{label:6s} bare diffusers {bare_s * 1000:8.1f} ms   engine (queue+save+db) {engine_s * 1000:8.1f} ms"
              f"   ratio {engine_s / bare_s:.3f}")
    print("target: ratio <= 1.05")


if __name__ == "__main__":
    main()
