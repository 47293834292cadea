"""Where a step goes: a profiler trace's work items grouped by the category table, time swept so that categories and
idle add up to the step, overlap counted once, rates from the step's FLOPs and the copies' bytes."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest

from flux2bench.profiling.steps import (CATEGORY_RULES, StepFlops, WorkItem, categorise, read_trace, step_span,
                                        step_time)
from flux2bench.store import RunStore
from flux2bench.units import GIB

from conftest import REPO

CPU, GPU, COPIES, NCCL = (1, 1), (0, 7), (0, 20), (0, 30)  # (pid, tid): the Python thread and three CUDA streams


def op(name: str, ts: float, dur: float, types: list[str] | None = None, cat: str = "cpu_op") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": CPU[0], "tid": CPU[1], "ts": ts, "dur": dur,
            "args": {"Input type": types or []}}


def launch(correlation: int, ts: float, cat: str = "cuda_runtime", name: str = "cudaLaunchKernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": CPU[0], "tid": CPU[1], "ts": ts, "dur": 2,
            "args": {"correlation": correlation}}


def kernel(name: str, ts: float, dur: float, correlation: int | None = None, stream: tuple = GPU,
           cat: str = "kernel", **args: float) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": stream[0], "tid": stream[1], "ts": ts, "dur": dur,
            "args": {"correlation": correlation, "stream": stream[1], **args}}


BF16 = "c10::BFloat16"
STEP = [
    op("ProfilerStep#5", 1000, 1000, cat="user_annotation"),
    op("aten::linear", 1010, 90, [BF16, BF16, BF16]), op("aten::addmm", 1020, 70, [BF16, BF16, BF16]),
    launch(1, 1030),
    op("aten::_scaled_mm", 1110, 40, ["c10::Float8_e4m3fn", "c10::Float8_e4m3fn", "float", "float"]), launch(2, 1120),
    op("aten::scaled_dot_product_attention", 1160, 90, [BF16] * 3),
    op("aten::_scaled_dot_product_flash_attention", 1165, 80, [BF16] * 3), launch(3, 1170),
    op("torchao::choose_scale_float8", 1260, 20, [BF16]), op("aten::amax", 1262, 10, [BF16]), launch(4, 1265),
    op("aten::copy_", 1285, 10, ["c10::Float8_e4m3fn", BF16, "Scalar"]), launch(5, 1287),
    op("aten::add", 1300, 10, [BF16, BF16]), launch(6, 1302),
    launch(7, 1320, name="cudaMemcpyAsync"),
    op("c10d::alltoall_", 1325, 10), launch(8, 1330),
    op("Torch-Compiled Region: 0/1", 1335, 15, cat="user_annotation"), launch(9, 1341, "cuda_driver", "cuLaunchKernel"),
    kernel("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", 990, 20),
    kernel("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NNT", 1100, 200, 1),
    kernel("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128_cublas", 1300, 100, 2),
    kernel("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
           "cutlass::bfloat16_t>>", 1400, 200, 3),
    kernel("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16>>", 1600, 20, 4),
    kernel("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>", 1620, 10, 5),
    kernel("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", 1650, 10,
           6),
    kernel("Memcpy HtoD (Pinned -> Device)", 1150, 300, 7, COPIES, "gpu_memcpy", bytes=2 * 2**20),
    kernel("ncclDevKernel_SendRecv(ncclDevComm*, unsigned long, ncclWork*)", 1660, 100, 8, NCCL),
    kernel("triton_poi_fused_mul_silu_0", 1760, 40, 9),
    kernel("void cub::DeviceRadixSortOnesweepKernel<Policy900, true>", 1800, 50),
    kernel("Memset (Device)", 1850, 10, stream=GPU, cat="gpu_memset"),
    kernel("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NNT", 2100, 100, 1),  # after the step: left out
]
FLOPS = StepFlops(matmul=3e9, attention=2e9, method="test", matmul_peak=(100.0, "datasheet"),
                  attention_peak=(None, "no peak listed"))


def test_the_categories_and_idle_add_up_to_the_step_and_overlap_counts_once():
    step = step_time({"traceEvents": STEP}, "cuda", timed_step_ms=0.9, flops=FLOPS)
    assert step.step_index == 5 and step.step_ms == 1.0
    assert {c.name: round(c.ms, 6) for c in step.categories} == {
        "matmul bf16": 0.2, "matmul fp8": 0.1, "attention flash": 0.2, "quantize/dequantize (torchao)": 0.02,
        "casts into or out of fp8/int8": 0.01, "elementwise, norms, RoPE, activations": 0.06, "memset": 0.01,
        "other": 0.05, "communication (NCCL)": 0.1, "copy HtoD": 0.0, "idle": 0.25}
    assert sum(c.ms for c in step.categories) == pytest.approx(step.step_ms)


def test_a_copy_hidden_behind_compute_keeps_its_busy_time_and_bandwidth():
    [copy] = [c for c in step_time({"traceEvents": STEP}, "cuda", None).categories if c.group == "copy"]
    assert (copy.ms, copy.busy_ms, copy.bytes) == (0.0, pytest.approx(0.3), 2 * 2**20)
    assert copy.gib_per_s == pytest.approx(2 * 2**20 / GIB / 300e-6)


def test_matrix_products_and_attention_are_rated_against_their_busy_time():
    rates = {r.group: r for r in step_time({"traceEvents": STEP}, "cuda", None, flops=FLOPS).rates}
    assert rates["matmul"].busy_ms == pytest.approx(0.3) and rates["matmul"].tflops == pytest.approx(10.0)
    assert (rates["matmul"].peak_tflops, rates["attention"].peak_tflops) == (100.0, None)
    assert rates["attention"].tflops == pytest.approx(10.0) and rates["attention"].peak_reason == "no peak listed"


def test_without_flops_the_step_says_why_it_has_no_rates():
    step = step_time({"traceEvents": STEP}, "cuda", None, flops_reason="a step cache reuses some steps")
    assert step.rates == [] and step.flops_reason == "a step cache reuses some steps"


@pytest.mark.parametrize("name, chain, expected", [
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn", [], ("matmul", "matmul bf16")),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>",
     ["aten::mm"], ("matmul", "matmul bf16")),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, float, 128, 16, 4, 4, false, true>", [], ("matmul",
                                                                                                 "matmul bf16")),
    ("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<CollectiveMainloopFwdSm90>>>",
     [], ("attention", "attention FlashAttention-3")),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_128x128x128_4x1x1_kernel0_0",
     ["aten::_scaled_dot_product_cudnn_attention"], ("attention", "attention cuDNN")),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel)", [],
     ("attention", "attention efficient")),
    ("void at::native::softmax_warp_forward<c10::BFloat16>", ["aten::_scaled_dot_product_attention_math",
                                                              "aten::_softmax"], ("attention", "attention math")),
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*)", [],
     ("quantize", "quantize/dequantize (bitsandbytes)")),
    ("triton_red_fused__to_copy_mean_mul_pow_rsqrt_0", [], ("elementwise", "elementwise, norms, RoPE, activations")),
    ("Memcpy DtoH (Device -> Pinned)", [], ("copy", "copy DtoH")),
    ("Memcpy DtoD (Device -> Device)", [], ("copy", "copy DtoD")),
    ("ncclDevKernel_AllToAll_RING_LL(ncclDevComm*, unsigned long, ncclWork*)", [], ("communication",
                                                                                   "communication (NCCL)")),
])
def test_kernel_names_of_each_library_fall_in_their_category(name, chain, expected):
    assert categorise(WorkItem(name, 0, 1, chain, [[] for _ in chain])) == expected


def test_the_int8_matmul_of_torchao_and_a_dequantizing_cast_are_told_apart():
    int_mm = WorkItem("void cutlass::Kernel2<int8_gemm>", 0, 1, ["aten::_int_mm"], [["c10::Char", "c10::Char"]])
    dequantize = WorkItem("direct_copy_kernel", 0, 1, ["aten::to", "aten::_to_copy", "aten::copy_"],
                          [[], [], [BF16, "c10::Char"]])
    assert categorise(int_mm) == ("matmul", "matmul int8")
    assert categorise(dequantize) == ("quantize", "casts into or out of fp8/int8")


def test_a_matrix_product_inside_a_bitsandbytes_operator_is_a_matmul_and_its_dequantization_is_not():
    """bitsandbytes' NF4 linear dequantizes the weight, then multiplies in bf16, all inside its own operator."""
    chain = ["bitsandbytes::gemm_4bit", "aten::linear", "aten::matmul", "aten::mm"]
    types = [["c10::BFloat16", "unsigned char"], ["c10::BFloat16"], ["c10::BFloat16"],
             ["c10::BFloat16", "c10::BFloat16"]]
    gemm = WorkItem("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN", 0, 1, chain, types)
    dequantize = WorkItem("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>", 0, 1, chain[:1], types[:1])
    gemv = WorkItem("void gemm_4bit_simt<__nv_bfloat16, 1>", 0, 1, chain[:1], types[:1])
    assert categorise(gemm) == ("matmul", "matmul bf16")
    assert categorise(dequantize) == ("quantize", "quantize/dequantize (bitsandbytes)")
    assert categorise(gemv) == ("matmul", "matmul nf4 (bitsandbytes, dequantized in the kernel)")


def test_every_rule_of_the_table_names_a_group_and_a_field_it_can_read():
    assert {rule.field for rule in CATEGORY_RULES} <= {"kernel", "op", "innermost", "cast"}
    assert all(rule.pattern or rule.field == "cast" for rule in CATEGORY_RULES)


def test_a_trace_without_a_profiler_step_is_refused():
    with pytest.raises(ValueError, match="no profiler step span"):
        step_span([op("aten::mm", 0, 10)])


def test_a_file_that_is_not_json_is_refused_with_its_name(tmp_path):
    path = tmp_path / "x.trace.json.gz"
    with gzip.open(path, "wt") as f:
        f.write("garbage")
    with pytest.raises(ValueError, match=r"x.trace.json.gz is not a readable Chrome trace"):
        read_trace(path)


def test_a_file_that_is_not_a_chrome_trace_is_refused(tmp_path):
    path = tmp_path / "x.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"events": []}, f)
    with pytest.raises(ValueError, match="not a Chrome trace"):
        read_trace(path)


COMMITTED_TRACES = sorted((REPO / "reports").glob("*/profiles/*.trace.json.gz"))


@pytest.mark.parametrize("path", COMMITTED_TRACES, ids=lambda p: f"{p.parents[1].name}/{p.name}")
def test_a_committed_full_size_trace_reads_as_its_record_says(path):
    """The profiled steps of full-size FLUX.2 cases on a GPU (reports/*/profiles): today's table reads each trace as
    the committed record says (scripts/recount_profiles.py keeps them in step), with no unnamed kernel time."""
    (result,) = [r for r in RunStore.open(path.parents[1]).results()
                 if r.profile and r.profile.step and r.profile.step.trace == f"profiles/{path.name}"]
    recorded = result.profile.step
    step = step_time(read_trace(path), recorded.activity, recorded.timed_step_ms, step_index=recorded.step_index)
    assert [(c.name, round(c.ms, 6)) for c in step.categories] == [(c.name, round(c.ms, 6))
                                                                   for c in recorded.categories]
    assert step.group_ms("matmul") > 0.2 * step.step_ms
    assert not [c for c in step.categories if c.name == "other"]


def test_a_trace_trimmed_for_a_fixture_keeps_its_step_breakdown(tmp_path):
    source, target = tmp_path / "full.trace.json.gz", tmp_path / "trimmed.trace.json.gz"
    with gzip.open(source, "wt") as f:
        json.dump({"traceEvents": STEP, "deviceProperties": [{"name": "test"}]}, f)
    subprocess.run([sys.executable, str(REPO / "scripts" / "trim_trace.py"), str(source), str(target)], check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                       str(REPO), os.environ.get("PYTHONPATH")]))})
    trimmed = read_trace(target)
    assert len(trimmed["traceEvents"]) == len(STEP) - 1  # the kernel after the step is left out
    assert step_time(trimmed, "cuda", None) == step_time({"traceEvents": STEP}, "cuda", None)
