"""How long a compiled model takes to become ready: the first start (empty compile cache) and the second
(the cache that the first left on disk), each in a fresh process, as app.py starts.

    python bench/compile_start.py              # CUDA: SD 1.5 with random weights, fp16, inductor
    python bench/compile_start.py --tiny       # CPU: a model smaller than gpu_speed.py --tiny's, inductor

A start is timed from the process start to the end of Engine.warm_up (the compile, plus CUDA graph
recording on a GPU), and the first image after it is timed too, to show the compiled model is in use.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# --tiny checks the compile cache, not speed, and inductor runs g++ for a second or two per distinct kernel
# on a CPU: so a UNet and a VAE decoder of one level and no attention (15 kernels; gpu_speed.py --tiny's: 43).
FEWEST_KERNELS = {
    "unet": dict(block_out_channels=[16], layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=["DownBlock2D"], up_block_types=["UpBlock2D"], mid_block_type=None,
                 cross_attention_dim=32, norm_num_groups=8),
    "vae": dict(block_out_channels=[16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
                mid_block_add_attention=False, sample_size=8),
}


def child(args) -> dict:
    """One start: set the cache folder, build the model, compile it through the engine's warm-up."""
    import torch

    from webui.engine.fast_path import apply_fast_path, use_compile_cache
    from webui.schemas import GenerationRequest

    use_compile_cache(args.cache)  # before torch compiles anything, as the loader does
    from bench import gpu_speed

    bench_args = gpu_speed.parse_args(["--tiny"] if args.tiny else [])
    if args.tiny:
        torch.set_num_threads(1)
        # Trust the CPU's vector instructions: else inductor test-compiles each one into the first start's empty
        # cache (~12 s on 2 cores), a cost of C++ kernels that a GPU start's Triton kernels do not have.
        torch._inductor.config.cpp.vec_isa_ok = True
    pipe = gpu_speed.make_pipeline(gpu_speed.build_components(bench_args, {**gpu_speed.TINY, **FEWEST_KERNELS}))
    apply_fast_path(pipe, compile=True, backend=args.backend)
    engine = gpu_speed.engine_for(pipe, bench_args)
    built = time.perf_counter()
    engine.warm_up()
    gpu_speed.synchronize(bench_args.device)
    ready = time.perf_counter()
    # At the warm-up's (native) size: another size would compile again.
    engine.generate(GenerationRequest(prompt=gpu_speed.PROMPT, steps=bench_args.steps), [bench_args.seed])
    gpu_speed.synchronize(bench_args.device)
    done = time.perf_counter()
    size = engine.model.native_width
    counters = torch._dynamo.utils.counters
    return {"start_to_ready_s": ready - STARTED, "warm_up_s": ready - built, "first_image_s": done - ready,
            "warm_up_size": f"{size}x{size}", "card": gpu_speed.card_name(bench_args.device),
            # inductor's on-disk cache of compiled graphs: all misses on a first start, hits on a second
            "graph_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
            "graph_cache_misses": counters["inductor"]["fxgraph_cache_miss"]}


def start_once(args, cache: Path) -> dict:
    """One start in a fresh process; {"error": ...} when it fails or runs past --timeout."""
    command = [sys.executable, __file__, "--child", "--cache", str(cache), "--backend", args.backend]
    try:
        proc = subprocess.run(command + (["--tiny"] if args.tiny else []), capture_output=True, text=True,
                              cwd=ROOT, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"not ready within --timeout {args.timeout:g} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def save(args, report: dict) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU, the tiny model")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (tests pass eager)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one start may take")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    report = {"backend": args.backend, "tiny": args.tiny}
    with tempfile.TemporaryDirectory(prefix="compile-cache-") as cache:
        for name in ("first_start", "second_start"):  # the first finds the folder empty, the second filled
            report[name] = start = start_once(args, Path(cache))
            save(args, report)  # after each start: a run cut short keeps the first
            if "error" in start:
                raise SystemExit(f"{name} failed: {start['error']}")
            print(f"{name:<13} ready after {start['start_to_ready_s']:7.1f} s (warm-up {start['warm_up_s']:6.1f} s at "
                  f"{start['warm_up_size']}; graph cache {start['graph_cache_hits']} hits, "
                  f"{start['graph_cache_misses']} misses), then one image in {start['first_image_s']:.3f} s", flush=True)
    report["card"] = report["first_start"]["card"]
    report["warm_up_ratio_second_to_first"] = report["second_start"]["warm_up_s"] / report["first_start"]["warm_up_s"]
    save(args, report)
    print(f"second/first warm-up: {report['warm_up_ratio_second_to_first']:.2f} ({report['card']}, {args.backend})")
    return report


if __name__ == "__main__":
    main()
