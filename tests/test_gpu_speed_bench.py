"""The GPU benchmark and the fast path, checked on the CPU with a tiny model (no timing asserts)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_sd import make_tiny_pipeline
from webui.engine.fast_path import apply_fast_path

ROOT = Path(__file__).resolve().parent.parent
POSITIVE = ("median_s", "s_per_image", "images_per_s", "steps_per_s", "flops_per_run", "tflops", "x_floor",
            "peak_mem_mib")


CPU_TUNINGS = ("conv_1x1_as_mm", "freezing", "fp8_linear", "fp8_linear_static", "fused_qkv")


@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory):
    """The two benchmark scripts on the tiny model, started together: each is mostly one process compiling, and
    two at once take little longer than one (68 s against 107 s one after the other, on this 2-core machine)."""
    folder = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE"):
        env.pop(name, None)  # compile_start gives each start its own empty cache folder
    # The tuned rows at batch 1 only: each batch size is another compile, and batch 2 is checked on the rows
    # before them.
    # One timed run a row: the median of several is for the GPU; here only the numbers' presence is checked.
    # The tunings that change nothing on a CPU (cuDNN's, and inductor's Triton-only coordinate descent) are left out:
    # each would cost a compile here for nothing to see; their switching is checked without a run below.
    commands = {"speed": ["gpu_speed.py", "--tiny", "--json", str(folder / "speed.json"),
                          "--tune", ",".join(CPU_TUNINGS),
                          "--tune-batch-sizes", "1", "--repeats", "1"],
                "start": ["compile_start.py", "--tiny", "--json", str(folder / "start.json")]}
    runs = {name: (subprocess.Popen([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), folder / f"{name}.json")
            for name, (script, *args) in commands.items()}
    yield runs
    for process, _ in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def finished(runs, name: str) -> tuple[subprocess.CompletedProcess, dict]:
    """A benchmark run waited for to its end: its output, and the JSON it wrote."""
    process, out = runs[name]
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), json.loads(out.read_text())


def test_tiny_bench_writes_every_row_with_positive_numbers(bench_runs):
    proc, report = finished(bench_runs, "speed")
    rows = {(r["row"], r["batch"]): r for r in report["rows"]}
    tuned = [f"fast_path+{name}" for name in ("conv_1x1_as_mm", "fused_qkv", "freezing", "fp8_linear",
                                                 "fp8_linear_static")]
    assert set(rows) == {(row, batch) for row in ("eager", "compiled_unet", "fast_path", "engine")
                         for batch in (1, 2)} | {(row, 1) for row in tuned}
    for key, row in rows.items():
        for field in POSITIVE:
            assert row[field] > 0, (key, field, row[field])
        assert len(row["runs_s"]) == report["repeats"]
        if key[0].startswith("fast_path+fp8_linear"):  # 8-bit operands: near the picture, never on it
            assert 1e-3 < row["max_abs_diff_vs_eager"] < 0.15, row["max_abs_diff_vs_eager"]
            continue
        # Same seeds, same pictures; the engine returns 8-bit images, so allow one rounding step.
        assert row["max_abs_diff_vs_eager"] < (1e-3 if key[0] != "engine" else 1.5 / 255), key
    assert rows[("eager", 2)]["flops_per_run"] == 2 * rows[("eager", 1)]["flops_per_run"]
    assert "fast_path" in proc.stdout and "max|diff|" in proc.stdout  # the table is printed


def two_step_image(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red fox in snow", num_inference_steps=2, height=64, width=64, guidance_scale=7.5,
                generator=torch.Generator("cpu").manual_seed(42), output_type="np").images


def test_fast_path_gives_the_eager_image_for_the_same_seed(fresh_dynamo):
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = make_tiny_pipeline(seed=3)
    eager = two_step_image(pipe)
    # "eager" backend: torch.compile traces the modules (graph capture is what we check) without the
    # minute of C++ compilation inductor needs on a CPU.
    assert apply_fast_path(pipe, compile=True, backend="eager") is pipe
    torch._dynamo.utils.counters.clear()
    fast = two_step_image(pipe)

    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the UNet/VAE really went through dynamo
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"  # compiled in place: class and keys unchanged
    assert fast.shape == eager.shape == (1, 64, 64, 3)
    assert abs(fast - eager).max() < 1e-4


def test_fused_qkv_projections_give_the_same_image():
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    pipe = make_tiny_pipeline(seed=5)
    plain = two_step_image(pipe)
    apply_fast_path(pipe, compile=False, fused_qkv=True)
    fused = two_step_image(pipe)

    processors = list(pipe.unet.attn_processors.values()) + list(pipe.vae.attn_processors.values())
    assert processors and all(isinstance(p, FusedAttnProcessor2_0) for p in processors)
    assert abs(fused - plain).max() < 1e-4


def test_each_tuning_is_set_only_while_its_row_runs():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_speed

    before = torch.backends.cudnn.benchmark
    with gpu_speed.tuning("cudnn_benchmark"):
        assert torch.backends.cudnn.benchmark is True
    with gpu_speed.tuning("conv_1x1_as_mm"):
        assert torch._inductor.config.conv_1x1_as_mm is True
    with gpu_speed.tuning("coordinate_descent"):  # (its row does not run on the CPU: it tunes Triton kernels)
        assert torch._inductor.config.coordinate_descent_tuning is True
    with gpu_speed.tuning("cudnn_attention"):  # likewise: a CUDA kernel
        pass  # the priority list is accepted by this torch
    assert torch.backends.cudnn.benchmark is before and torch._inductor.config.conv_1x1_as_mm is False
    assert torch._inductor.config.coordinate_descent_tuning is False
    assert gpu_speed.parse_args(["--tiny", "--tune", "fused_qkv,freezing,cudnn_benchmark"]).tune == [
        "cudnn_benchmark", "freezing", "fused_qkv"]  # fused_qkv last: it leaves fused weights in the shared modules
    # The tuned rows run at --batch-sizes unless --tune-batch-sizes says otherwise (the tiny bench above).
    assert gpu_speed.parse_args(["--tiny", "--batch-sizes", "1,4"]).tune_batch_sizes == [1, 4]


def test_the_second_start_compiles_from_the_disk_cache(bench_runs):
    """bench/compile_start.py with inductor on the tiny model: the first start fills the cache folder
    (all misses), the second, a fresh process, finds every graph there (hits, no misses)."""
    proc, report = finished(bench_runs, "start")
    first, second = report["first_start"], report["second_start"]
    assert first["graph_cache_misses"] >= 2 and first["graph_cache_hits"] == 0  # the UNet and the VAE decoder
    assert second["graph_cache_hits"] == first["graph_cache_misses"] and second["graph_cache_misses"] == 0
    for start in (first, second):
        assert start["warm_up_s"] > 0 and start["first_image_s"] > 0
    assert "second/first warm-up" in proc.stdout


def test_loop_sync_sites_name_the_line_that_waited(monkeypatch):
    """The GPU benchmark's sync count says where each sync came from. On a CPU, a warning worded as torch's
    sync debug mode words it stands in for a sync; only those after step 1 and before the last count."""
    import warnings

    from bench.gpu_speed import loop_sync_sites

    modes = []

    def set_sync_debug_mode(mode: str) -> None:
        if modes and modes[-1] == "warn":  # torch's own switch warned on an H100: not the loop's sync
            warnings.warn("called a synchronizing CUDA operation", UserWarning)
        modes.append(mode)

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_sync_debug_mode)

    def waits_for_the_gpu() -> None:
        if modes and modes[-1] == "warn":  # torch warns only in its sync debug mode
            warnings.warn("called a synchronizing CUDA operation", UserWarning)

    class Engine:
        def generate(self, request, seeds, on_step):
            waits_for_the_gpu()  # before step 1 is done: the scheduler may look itself up once
            for step in (1, 2, 3):
                on_step(step, 3, None)
                if step == 2:
                    waits_for_the_gpu()
                    warnings.warn("an unrelated warning", UserWarning)

    sites = loop_sync_sites(Engine(), request=None, seeds=[1])
    assert len(sites) == 1
    innermost = sites[0].split(" <- ")[:2]
    assert [frame.split(" ")[1] for frame in innermost] == ["waits_for_the_gpu", "generate"]
    assert innermost[0].startswith("test_gpu_speed_bench.py:")
    assert modes == ["warn", "warn", "default", "default"]


def test_unet_profile_sorts_op_time_by_kind_and_times_attention_per_level(tmp_path):
    from bench.unet_profile import main

    report = main(["--tiny", "--json", str(tmp_path / "profile.json")])
    kinds = report["profile_ms"][1]
    assert all(kinds[kind] > 0 for kind in ("convolution", "attention", "linear", "normalisation")), kinds
    shapes = [row["shape"] for row in report["attention_ms"][1]]
    assert shapes == ["self 8x8", "cross 8x8", "self 4x4", "cross 4x4"]  # the tiny UNet's two levels
    assert all(row["math"] > 0 for row in report["attention_ms"][1])
    assert report["cudnn_ms"][1]["heuristics"] > 0 and report["cudnn_ms"][1]["benchmark"] > 0
    assert json.loads((tmp_path / "profile.json").read_text())["attention_ms"]["1"][1]["keys"] == 77


def test_unet_profile_compiled_sums_kernels_by_kind_and_names_the_largest(tmp_path):
    """On the CPU the compiled module's ops stand in for the GPU's kernels; the kinds must add up to them."""
    from bench.unet_profile import KERNEL_KINDS, TOP_KERNELS, kind_of, main

    report = main(["--tiny", "--compiled", "--json", str(tmp_path / "compiled.json")])
    compiled = report["compiled"][1]
    assert report["profile_ms"] == {}, "--compiled profiles only the compiled UNet"
    tops = compiled["top_kernels"]
    assert 0 < len(tops) <= TOP_KERNELS and compiled["call_ms"] > 0
    assert [kernel["ms"] for kernel in tops] == sorted((kernel["ms"] for kernel in tops), reverse=True)
    assert compiled["kernel_ms"]["convolution"] > 0 and sum(compiled["kernel_ms"].values()) >= sum(k["ms"] for k in tops)
    assert json.loads((tmp_path / "compiled.json").read_text())["compiled"]["1"]["call_ms"] > 0
    # Kernel names as the H100 reports them (cuDNN, CUTLASS, flash, inductor) land in their kinds.
    assert [kind_of(name, KERNEL_KINDS) for name in (
        "triton_per_fused_native_group_norm_silu_3", "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc",
        "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64", "nvjet_sm90_hsh_128x256_64x4_2x1_v_bz_coopA_bias_TNN",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0",
        "void at::native::elementwise_kernel<128, 2>")] == [
        "fused (inductor)", "convolution", "matmul", "matmul", "attention", "other"]
