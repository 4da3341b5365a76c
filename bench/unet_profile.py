"""Where a UNet call's time goes, and which attention kernel is fastest at SD 1.5's shapes (issue 7).

    python bench/unet_profile.py                       # CUDA, fp16, SD 1.5 UNet (random weights), 512x512
    python bench/unet_profile.py --tiny --json /tmp/p.json   # CPU smoke test with a tiny UNet (tests)

Part 1 profiles one UNet call per batch (rows = 2 x images with CFG; channels-last and SDPA as the fast
path sets them up, uncompiled so that every op shows) and sums each op's own time by kind: convolution,
linear layers, attention, normalisation, the rest. Part 2 times each of torch's attention backends alone
on the attention shapes of that UNet (self-attention at each level, and cross-attention on 77 tokens).
Part 3 times the whole call with cuDNN picking convolution algorithms by heuristics (torch's default)
and by trying them (torch.backends.cudnn.benchmark). Together they say where a faster kernel or setting
would pay before anyone writes one. No compile, so it takes about a minute on a GPU.

--compiled profiles instead the UNet as the fast path compiles it (inductor), but without CUDA graphs so that
each kernel shows: device time by kind of kernel (inductor's fused Triton kernels, convolutions, matmuls,
attention, the rest), the most expensive kernels by name, and the whole call's time. It says what is left
to win once compile has fused what it can. About a minute of compile per batch size on an H100.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_speed import build_components, card_name  # noqa: E402
from webui.engine.fast_path import apply_fast_path  # noqa: E402

# Op names (as the profiler reports them) by kind; the first match wins, the rest is "other".
KINDS = {
    "convolution": ("conv",),
    "attention": ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention", "bmm", "softmax", "baddbmm"),
    "linear": ("addmm", "aten::mm", "aten::linear", "matmul", "gemm"),
    "normalisation": ("group_norm", "layer_norm", "native_group_norm", "native_layer_norm"),
}
# Kernel names under --compiled (cuDNN, cuBLAS/CUTLASS, flash and inductor name their own); first match wins.
KERNEL_KINDS = {
    "fused (inductor)": ("triton",),
    "attention": ("flash", "fmha", "attention", "softmax"),
    "convolution": ("conv", "fprop", "dgrad", "implicit", "winograd"),
    "matmul": ("gemm", "cutlass", "nvjet", "matmul", "aten::mm", "addmm", "bmm"),  # nvjet: cuBLASLt on Hopper
}
TOP_KERNELS = 12


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU, tiny UNet, fp32, 64x64")
    p.add_argument("--batch-sizes", default=None, help="images per call, comma list (default 1,8; tiny 1)")
    p.add_argument("--json", type=Path, default=None, help="where to write the results (default: print only)")
    p.add_argument("--compiled", action="store_true", help="profile the compiled UNet's kernels (no CUDA graphs)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; tiny eager)")
    args = p.parse_args(argv)
    args.device = "cpu" if args.tiny else "cuda"
    args.dtype = torch.float32 if args.tiny else torch.float16
    args.size = 64 if args.tiny else 512
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("1" if args.tiny else "1,8")).split(",")]
    args.compile_backend = args.compile_backend or ("eager" if args.tiny else "inductor")
    if not args.tiny and not torch.cuda.is_available():
        p.error("no CUDA GPU visible; use --tiny for the CPU smoke test")
    return args


def unet_inputs(unet, args, images: int) -> tuple:
    rows = 2 * images  # CFG: the prompt and the negative prompt in one batch
    latent = args.size // 8
    make = dict(device=args.device, dtype=args.dtype)
    sample = torch.randn(rows, unet.config.in_channels, latent, latent, **make)
    context = torch.randn(rows, 77, unet.config.cross_attention_dim, **make)
    return sample.to(memory_format=torch.channels_last), torch.tensor(500.0, device=args.device), context


def kind_of(op_name: str, kinds: dict = KINDS) -> str:
    name = op_name.lower()
    return next((kind for kind, marks in kinds.items() if any(mark in name for mark in marks)), "other")


def profile_call(unet, args, images: int) -> dict[str, float]:
    """Milliseconds of one UNet call by kind of op (device time on CUDA, CPU time on the CPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    inputs = unet_inputs(unet, args, images)
    for _ in range(3):  # cuDNN picks its algorithms and the allocator settles
        unet(*inputs)
    on_cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        unet(*inputs)
        if on_cuda:
            torch.cuda.synchronize()
    totals: dict[str, float] = {kind: 0.0 for kind in (*KINDS, "other")}
    for event in prof.key_averages():
        if event.device_type != DeviceType.CPU:  # a kernel: already counted in the op that launched it
            continue
        own_us = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        totals[kind_of(event.key)] += own_us / 1000
    return totals


def profile_compiled_call(unet, args, images: int) -> dict:
    """The compiled UNet's kernels: milliseconds by kind, the top kernels by name, and the whole call.
    On the CPU (tests) there are no kernels: the ops that the compiled module runs stand in for them."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    inputs = unet_inputs(unet, args, images)
    for _ in range(3):  # the compile, then cuDNN's and the allocator's first calls
        unet(*inputs)
    on_cuda = args.device == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])) as prof:
        unet(*inputs)
        if on_cuda:
            torch.cuda.synchronize()
    wanted = DeviceType.CUDA if on_cuda else DeviceType.CPU
    kernels = [(event.key, (event.self_device_time_total if on_cuda else event.self_cpu_time_total) / 1000)
               for event in prof.key_averages() if event.device_type == wanted]
    kernels = sorted(((name, ms) for name, ms in kernels if ms > 0), key=lambda kernel: -kernel[1])
    by_kind: dict[str, float] = {kind: 0.0 for kind in (*KERNEL_KINDS, "other")}
    for name, ms in kernels:
        by_kind[kind_of(name, KERNEL_KINDS)] += ms
    return {"kernel_ms": by_kind, "top_kernels": [{"name": name[:120], "ms": ms} for name, ms in kernels[:TOP_KERNELS]],
            "call_ms": median_ms(lambda: unet(*inputs), args, repeats=10)}


def attention_shapes(unet, args, images: int) -> list[tuple[str, int, int, int, int]]:
    """(label, heads, query tokens, key tokens, head size) of each attention level of an SD 1.x UNet."""
    heads = unet.config.attention_head_dim  # SD 1.x: "attention_head_dim" holds the number of heads
    heads = heads[0] if isinstance(heads, (list, tuple)) else heads
    side = args.size // 8
    shapes = []
    for level, channels in enumerate(unet.config.block_out_channels):
        tokens = (side >> level) ** 2
        shapes.append((f"self {side >> level}x{side >> level}", heads, tokens, tokens, channels // heads))
        shapes.append((f"cross {side >> level}x{side >> level}", heads, tokens, 77, channels // heads))
    return shapes


def time_backends(shapes, args, images: int) -> list[dict]:
    """Median milliseconds of one attention call per backend; None where torch refuses the shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.MATH] if args.device == "cpu" else [
        SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    rows = []
    for label, heads, queries, keys, head_size in shapes:
        make = dict(device=args.device, dtype=args.dtype)
        q = torch.randn(2 * images, heads, queries, head_size, **make)
        kv = torch.randn(2 * images, heads, keys, head_size, **make)
        row = {"shape": label, "heads": heads, "queries": queries, "keys": keys, "head_size": head_size}
        for backend in backends:
            with sdpa_kernel(backend):
                row[backend.name.lower()] = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, kv, kv), args)
        rows.append(row)
    return rows


def median_ms(call, args, repeats: int = 20) -> float | None:
    try:
        for _ in range(3):
            call()
    except RuntimeError:  # this backend does not take this shape, dtype or card
        return None
    if args.device != "cuda":
        import time

        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cudnn_choices(unet, args, images: int) -> dict[str, float | None]:
    """Median milliseconds of one UNet call as cuDNN chooses its convolutions: by heuristics, by trying."""
    inputs = unet_inputs(unet, args, images)
    times = {}
    for mode, benchmark in (("heuristics", False), ("benchmark", True)):
        torch.backends.cudnn.benchmark = benchmark
        times[mode] = median_ms(lambda: unet(*inputs), args, repeats=10)
    torch.backends.cudnn.benchmark = False
    return times


def run(args) -> dict:
    parts = build_components(args)  # reads args.tiny, .device and .dtype
    apply_fast_path(SimpleNamespace(**parts), compile=False)  # channels-last and SDPA, as the engine runs it
    unet = parts["unet"]
    report = {"card": card_name(args.device), "dtype": str(args.dtype).removeprefix("torch."),
              "torch": torch.__version__, "size": args.size, "profile_ms": {}, "attention_ms": {}, "cudnn_ms": {}}
    if args.compiled:
        report["compiled"] = {}
        unet = torch.compile(unet, fullgraph=False, dynamic=False, backend=args.compile_backend)
        with torch.inference_mode():
            for images in args.batch_sizes:
                report["compiled"][images] = profile_compiled_call(unet, args, images)
        return report
    with torch.inference_mode():
        for images in args.batch_sizes:
            report["profile_ms"][images] = profile_call(unet, args, images)
            report["attention_ms"][images] = time_backends(attention_shapes(unet, args, images), args, images)
            report["cudnn_ms"][images] = time_cudnn_choices(unet, args, images)
    return report


def print_report(report: dict) -> None:
    print(f"{report['card']}, {report['dtype']}, {report['size']}x{report['size']}, torch {report['torch']}")
    for images, compiled in report.get("compiled", {}).items():
        total = sum(compiled["kernel_ms"].values())
        parts = ", ".join(f"{kind} {ms:.2f} ({ms / total:.0%})" for kind, ms in compiled["kernel_ms"].items())
        print(f"compiled UNet call, {images} image(s) with CFG: {compiled['call_ms']:.2f} ms, "
              f"{total:.2f} ms in kernels: {parts}")
        for kernel in compiled["top_kernels"]:
            print(f"  {kernel['ms']:8.3f} ms  {kernel['name']}")
    for images, kinds in report["profile_ms"].items():
        total = sum(kinds.values())
        parts = ", ".join(f"{kind} {ms:.2f} ({ms / total:.0%})" for kind, ms in kinds.items())
        print(f"UNet call, {images} image(s) with CFG: {total:.2f} ms of own op time: {parts}")
        for row in report["attention_ms"][images]:
            times = "  ".join(f"{name} {'-' if ms is None else f'{ms:.3f}'}" for name, ms in row.items()
                              if name not in ("shape", "heads", "queries", "keys", "head_size"))
            print(f"  attention {row['shape']:<12} heads {row['heads']} x {row['head_size']:>3}: {times} ms")
        cudnn = report["cudnn_ms"][images]
        print(f"  whole call: cuDNN heuristics {cudnn['heuristics']:.3f} ms, cuDNN benchmark {cudnn['benchmark']:.3f} ms")


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
