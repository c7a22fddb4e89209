"""bench/gpu_check.py keeps running: its CPU sections pass at tiny sizes, its GPU sections are skipped
with the reason, and it writes its JSON and Markdown results."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_on_cpu(tmp_path):
    from model_parallel.state import child_environment

    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, env=child_environment(), capture_output=True, text=True, timeout=900)
    results = list(tmp_path.glob("gpu_cpu_*.json"))
    assert len(results) == 1, proc.stdout + proc.stderr
    report = json.loads(results[0].read_text())
    sections = report["sections"]
    from bench.gpu_sections import SECTIONS

    assert list(sections) == [name for name, _, _ in SECTIONS]
    for name, _, gpus in SECTIONS:
        r = sections[name]
        if gpus:
            assert r["status"] == "skipped" and r["reason"] == "needs a GPU", name
        else:
            assert r["status"] == "ok", (name, r.get("failed_checks"), r.get("error"), r.get("traceback"))
    assert sections["train_resume"]["zero3"]["max_abs_diff"] <= 2e-3
    assert sections["train_resume"]["decoder_only_sparse"]["max_abs_diff"] <= 2e-3  # under DALL-E's masks
    assert sections["train_resume"]["zero1"]["ema_max_abs_diff"] <= 1e-4  # (saved asynchronously)
    assert sections["sampling"]["greedy_equal_fp32"] == {"kv_cache": True, "decoder_only_kv_cache": True}
    assert set(sections["sampling"]["greedy_gap_fp32"]) == {"kv_cache", "decoder_only_kv_cache"}
    assert max(sections["sampling"]["greedy_gap_fp32"].values()) <= 1e-4
    assert sections["async_save"]["steps"]["latest"] == "step_00000020"  # the last save completed
    assert set(sections["async_save"]["steps"]["step_s_by_step"]["idle_fork_every_5"]) == {str(s) for s in range(1, 21)}
    assert sections["async_save"]["steps"]["usage"]["idle_fork_every_5"]["ru_minflt"] > 0
    assert sections["decode_compiled"]["greedy"]["gap_fp32"] <= 1e-4  # (inductor's static step, eager on CPU)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "| train_resume | ok |" in results[0].with_suffix(".md").read_text()


def test_planner_fit_recovers_the_constants_of_the_h200_run():
    """The GPU check's fit of the planner's step-time constants, on the first H200 run's parti-350m steps
    (one micro-batch per step): the slope is 50% of the peak, the intercept ~3.1 ms per layer (24 layers);
    on steps made from known constants it gives those back; steps that do not grow give none."""
    from bench.gpu_mfu import planner_fit
    from tests.conftest import H200_RUN

    run = json.loads(H200_RUN.read_text())["sections"]["mfu_350m"]
    fit = planner_fit(run["by_micro_batch"], run["train_flops_per_sample"], 989e12, 24, 1)
    assert abs(fit["hfu"] - 0.50) < 0.01 and abs(fit["overhead_ms_per_layer"] - 3.14) < 0.05, fit
    made = {str(b): {"step_s": 4 * (0.048 + b * 1e12 / (0.6 * 989e12))} for b in (2, 8, 32)}
    fit = planner_fit(made | {"64": {"error": "out of memory"}}, 1e12, 989e12, 12, 4)
    assert abs(fit["hfu"] - 0.6) < 1e-9 and abs(fit["overhead_ms_per_layer"] - 4.0) < 1e-9
    assert planner_fit({"4": {"step_s": 1.0}}, 1e12, 989e12, 12, 1) is None
    assert planner_fit({"4": {"step_s": 1.0}, "8": {"step_s": 0.9}}, 1e12, 989e12, 12, 1) is None
    assert planner_fit({"4": {"step_s": 1.0}, "8": {"step_s": 1.0}}, 1e12, 989e12, 12, 1) is None  # (no slope)


def test_a_section_stopped_at_its_limit_takes_its_children_with_it(tmp_path):
    """gpu_check runs each section with a time limit; a section stopped there must not leave what it started
    (torchrun's workers, a checkpoint writer) running on the GPU for the next one. A finished command whose
    leftover holds its stderr counts as finished, and the leftover is stopped too."""
    import os
    import time

    from bench.gpu_check import run_with_limit

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]  # (a zombie is not running)

    # (limits that a loaded machine's bash start-up stays well inside: the first is reached, the second is not)
    for script, limit, expected in [("sleep 60 & echo $! > {pid}; echo started >&2; wait", 5, None),
                                    ("sleep 60 & echo $! > {pid}; exit 3", 20, 3)]:
        pid_file = tmp_path / "pid"
        start = time.perf_counter()
        returncode, stderr = run_with_limit(["bash", "-c", script.format(pid=pid_file)], limit)
        assert returncode == expected and time.perf_counter() - start < 30
        time.sleep(0.2)
        assert not alive(int(pid_file.read_text())), script
    assert run_with_limit(["bash", "-c", "echo oops >&2; exit 0"], 10) == (0, "oops\n")
    # What it leaves in a session of its own (as torchrun's workers are) is out of its group's reach, and held its
    # stderr pipe: the wait lasted until that process ended, the limit long past.
    start = time.perf_counter()
    try:
        assert run_with_limit(["bash", "-c", f"setsid sleep 30 & echo $! > {pid_file}; exit 0"], 10) == (0, "")
        assert time.perf_counter() - start < 5
    finally:
        os.kill(int(pid_file.read_text()), 9)


def test_a_result_cut_short_by_the_limit_is_read_as_missing(tmp_path):
    """A section stopped mid-write left half a JSON file, and reading it ended the whole run (json.loads raised)."""
    from bench.gpu_check import _partial, _read_json, partial_file

    result = tmp_path / "mfu_3b.json"
    result.write_text('{"status": "ok", "best_mf')
    partial_file(result).write_text('{"micro_batch_2": {"step_')
    assert _read_json(result) is None and _partial(result) == {}
    partial_file(result).write_text('{"micro_batch_2": {"step_s": 1.5}}')
    assert _partial(result) == {"micro_batch_2": {"step_s": 1.5}}


def test_a_section_whose_limit_does_not_fit_the_budget_is_skipped(tmp_path):
    """--budget-s: a section starts only if its time limit fits in what is left; the shorter ones after it still run."""
    from bench.gpu_check import time_limit
    from model_parallel.state import child_environment

    budget = time_limit("vq", "cpu") + 5  # (train_resume, before it, needs more)
    assert time_limit("train_resume", "cpu") > budget
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--only",
                           "train_resume,vq", "--budget-s", str(budget), "--out", str(tmp_path)],
                          cwd=ROOT, env=child_environment(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = json.loads(next(tmp_path.glob("gpu_cpu_*.json")).read_text())["sections"]
    assert sections["train_resume"]["status"] == "skipped" and "out of time" in sections["train_resume"]["reason"]
    assert sections["vq"]["status"] == "ok"
    assert list(sections) == ["train_resume", "vq"]  # --only's order
    assert not list((tmp_path / "running").iterdir())  # (the sections' own files: in the report now)


def test_the_summary_reads_the_h200_run_and_survives_a_result_it_cannot_read():
    """The Markdown summary of the first H200 run's JSON; an MFU section on a GPU the peak table lacks (no MFU)
    says so; a result without the keys its line needs is summarised as such instead of ending the run."""
    from bench.gpu_check import summary_markdown
    from tests.conftest import H200_RUN

    report = json.loads(H200_RUN.read_text())
    assert "| mfu_350m | fail | 19 | FAILED: mfu_at_least_40pct; MFU 35.7% (353 TFLOP/s" in summary_markdown(report)
    from bench.gpu_mfu import kernel_breakdown

    report["sections"]["mfu_350m"]["device_profile_one_step"] = kernel_breakdown(
        [("nvjet_tst_a", 0.6, 1), ("flash_fwd_kernel", 0.2, 1), ("vectorized_elementwise_kernel", 0.1, 1)], 1.0)
    assert "GPU busy 90% of the step: matmul 67%, attention 22%, elementwise_other 11%" in summary_markdown(report)
    report["sections"]["mfu_350m"]["compiled"] = {"first_step_s": 41.2, "step_s": 1.0, "mfu": 0.43, "speedup": 1.11,
                                                   "device_profile_one_step": None}
    assert "; compiled layers: MFU 43.0% (1.11x eager, first step 41 s) |" in summary_markdown(report)
    report["sections"]["mfu_350m"]["compiled"] = {"error": "BackendCompilerFailed: backend='inductor' raised:\nmore"}
    assert "; compiled layers: BackendCompilerFailed: backend='inductor' raised: |" in summary_markdown(report)
    report["sections"]["flash_attention"]["helpers_left"] = [{"pid": 7, "name": "ForkProcess-1"}]
    assert ("| flash_attention | ok | 14 | 1 helper process(es) left running; self_attention_train: flash"
            in summary_markdown(report))
    report["sections"]["mfu_350m"]["too_large_for_memory"] = [96, 128]  # (an H100 stops at 64)
    assert "at micro-batch 64 (too large for memory: 96, 128), build" in summary_markdown(report)
    report["sections"]["mfu_350m"]["best_mfu"] = None
    assert "MFU n/a (no peak for this GPU: set train.peak_tflops) (353 TFLOP/s" in summary_markdown(report)
    report["sections"]["mfu_750m"] = {"status": "error", "error": "timed out after 180 s", "seconds": 180, "partial": {
        "build_s": 9.0, "micro_batch_8": {"mfu": 0.31}, "micro_batch_16": {"mfu": 0.36}, "compiled": {"mfu": 0.41}}}
    assert ("| mfu_750m | error | 180 | timed out after 180 s; recorded before: eager MFU 36.0% at micro-batch 16, "
            "compiled layers MFU 41.0% |") in summary_markdown(report)
    report["sections"]["mfu_750m"]["partial"] = {"build_s": 9.0, "optimizer_step": {}}
    assert "| timed out after 180 s; recorded before: build_s, optimizer_step |" in summary_markdown(report)
    del report["sections"]["mfu_3b"]["by_micro_batch"]
    line = "| mfu_3b | fail | 56 | (no summary: KeyError: 'by_micro_batch'; see the .json) |"
    assert line in summary_markdown(report)


def test_the_summary_reads_the_newer_sampling_and_async_save_results():
    """The second H200 run's sampling line with the CUDA graphs at generate's default GPU batch added, and an
    async_save line with the idle fork's ratio (results the next GPU run will write)."""
    from bench.gpu_check import summary_markdown

    report = json.loads((ROOT / "bench" / "results" / "gpu_nvidia-h200_2026-12-04.json").read_text())
    report["sections"]["sampling"]["measured"]["cuda_graph_batch_64"] = {
        "image_tokens_per_s": 41000.0, "of_bound": 0.31, "batch": 64}
    report["sections"]["sampling"]["measured"]["cuda_graph_batch_64_per_image_generators"] = {
        "image_tokens_per_s": 30000.0, "of_bound": 0.23, "batch": 64}
    report["sections"]["sampling"]["auto_batch_size"] = 64
    report["sections"]["async_save"] = {"status": "ok", "seconds": 50,
                                        "steps": {"ratio": 1.13, "idle_fork_ratio": 1.02}}
    text = summary_markdown(report)
    assert ("cuda_graph 8256 tok/s (17% of bound); batch 64: cuda_graph 41000 tok/s (31% of its bound), 30000 tok/s "
            "(23% of its bound, a generator per image), auto batch 64 |") in text
    assert "| async_save | ok | 50 | step during an async save / without: 1.13; beside an idle fork / without: 1.02 |" \
        in text


def test_greedy_gap_is_zero_for_greedy_codes_and_large_for_others(single_process):
    """The sampling section's measure of "greedy decoding" (teacher-forced): 0 for what full recomputation
    decodes greedily, above the tolerance once a single code is another, for both architectures."""
    from bench.gpu_common import train_config
    from bench.gpu_sections import GREEDY_TOLERANCE, greedy_gap
    from evaluation.sampling import SamplingConfig, sample
    from model_parallel.model import PartiModel

    for preset in ("parti-debug", "dalle-debug"):
        cfg = train_config([f"model.preset={preset}"]).model
        torch.manual_seed(0)
        model = PartiModel(cfg).eval()
        text = torch.randint(4, cfg.text_vocab_size, (2, cfg.text_seq_len))
        codes = sample(model, text, SamplingConfig(temperature=0.0), use_cache=False)
        assert greedy_gap(model, text, codes) <= 1e-5, preset
        other = codes.clone()
        other[1, 5] = (other[1, 5] + 1) % cfg.image_vocab_size
        assert greedy_gap(model, text, other) > GREEDY_TOLERANCE, preset


def test_kernel_breakdown_sorts_hopper_kernel_names_into_families():
    """The MFU sections' device profile: kernel names as the H200 run's profiler recorded them (cuBLAS, flash,
    fused AdamW, NCCL, elementwise, inductor's) fall into their families; the busy fraction is kernel time over
    wall time."""
    from bench.gpu_mfu import kernel_breakdown, kernel_kind

    names = {"nvjet_tst_192x192_64x4_2x1_v_bz_coopA_TNN": "matmul",
             "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64": "matmul",
             "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>": "attention",
             "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16": "attention",
             "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>":
                 "optimizer_and_foreach",
             "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
             "Memcpy DtoD (Device -> Device)": "copy",
             "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>": "norm",
             "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>": "loss_softmax",
             "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16, at::native::func_wrapper_t":
                 "reduction",
             "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>": "elementwise_other"}
    inductor = {"triton_red_fused__to_copy_amax_0": "compiled_fused",  # (not a copy, whatever its name says)
                "cpp_fused__to_copy_add_arange_eq_exp_mul_sub_unsqueeze_0": "compiled_fused"}
    # (more of a bf16 step's kernels: torch's LayerNorm weight gradients, cuBLAS's split-K reduction, memsets)
    more = {"void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernelTemplate<float, float, 32u, 1u, 32u, "
            "true, true, false>(long, long, float const*, float const*, float const*, float const*, float*, float*)":
                "norm",
            "void at::native::(anonymous namespace)::LayerNormForwardCUDAKernel<float, float>": "norm",
            "void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, false, false>"
            "(cublasSplitKParams<float>, float const*, __nv_bfloat16 const*, __nv_bfloat16*)": "matmul",
            "Memset (Device)": "copy",
            "void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>":
                "loss_softmax"}
    assert {n: kernel_kind(n) for n in names | inductor | more} == names | inductor | more
    r = kernel_breakdown([(n, 0.01 * (i + 1), 2) for i, n in enumerate(names)], wall_s=1.21, top=3)
    assert abs(r["kernel_s"] - 0.66) < 1e-12 and abs(r["busy"] - 0.66 / 1.21) < 1e-12 and r["launches"] == 22
    assert abs(r["by_kind_s"]["matmul"] - 0.03) < 1e-12 and abs(sum(r["by_kind_share"].values()) - 1) < 1e-12
    assert [k["kind"] for k in r["top_kernels"]] == ["elementwise_other", "reduction", "loss_softmax"]


def test_op_breakdown_names_each_operation_its_shapes_and_callers():
    """The MFU sections' operation profile, here on CPU time: the residual branch's bias add and residual add are
    told apart by their shapes and named with the function that made them; the bias gradient's sum by the
    backward node; a cat's tensors one by one, with the strides of those that are not contiguous; heaviest first."""
    from bench.gpu_mfu import _op_profile
    from model_parallel.kernels import plain_bias_dropout_add

    x = torch.randn(64, 8, 256, requires_grad=True)
    bias = torch.randn(256, requires_grad=True)
    permuted = torch.randn(8, 64, 16).permute(1, 0, 2)

    def step():
        plain_bias_dropout_add(x, bias, torch.randn(64, 8, 256), None, 0.0).sum().backward()
        torch.cat([permuted, torch.randn(64, 8, 16)], dim=-1)

    rows = _op_profile(step, "cpu")
    cat = [r for r in rows if r["op"] == "aten::cat"]
    assert cat[0]["shapes"].startswith("[[[64, 8, 16] strides [16, 1024, 1], [64, 8, 16]]")
    adds = {r["shapes"]: r for r in rows if r["op"] == "aten::add"}
    assert set(adds) == {"[[64, 8, 256], [256], []]", "[[64, 8, 256], [64, 8, 256], []]"}
    assert all(r["calls"] == 1 and "plain_bias_dropout_add" in r["called_from"][0] for r in adds.values())
    bias_grad = [r for r in rows if r["op"] == "aten::sum" and any("AddBackward0" in c for c in r["called_from"])]
    assert bias_grad and "[64, 8, 256]" in bias_grad[0]["shapes"]
    assert [r["s"] for r in rows] == sorted((r["s"] for r in rows), reverse=True)
    assert not any(r["op"].startswith("<built-in") or "): " in r["op"] for r in rows)


def test_op_breakdown_on_a_gpu_counts_each_operations_own_kernels():
    """op_breakdown's GPU path on profile events stood in for (kernel durations in microseconds, as torch records
    them): an operation's time is its own kernels', summed over its calls; one that launched none, Python frames,
    modules and annotations are no rows; its callers are its innermost 4 project frames; a size-1 dimension's stride
    does not make its tensor non-contiguous."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from bench.gpu_mfu import op_breakdown

    def event(name, parent=None, kernels=(1000.0,), annotation=False):
        return SimpleNamespace(name=name, device_type=DeviceType.CPU, cpu_parent=parent, self_cpu_time_total=7e6,
                               kernels=[SimpleNamespace(duration=us) for us in kernels], is_user_annotation=annotation,
                               input_shapes=[[64, 1, 16]], structured_input_shapes=[[64, 1, 16]],
                               structured_input_strides=[[16, 5, 1]])

    frames = [None]
    for name in ("deepspeed/runtime/engine.py(2100): backward", "megatron/core/a.py(10): f",
                 "training/engine.py(40): train_step", "tools/helper.py(3): g",
                 "model_parallel/layers.py(200): forward", "nn.Module: Linear_0",
                 "torch/nn/functional.py(2300): linear"):
        frames.append(event(name, frames[-1]))
    events = [*frames[1:], event("aten::mm", frames[-1], (300.0, 200.0)), event("aten::mm", frames[-1], (500.0,)),
              event("aten::view", frames[-1], ()), event("Optimizer.step#AdamW.step", annotation=True)]
    assert op_breakdown(events, "cuda") == [{"op": "aten::mm", "s": pytest.approx(1e-3), "calls": 2,
                                             "shapes": "[[64, 1, 16]]", "called_from": [
                                                 "torch/nn/functional.py(2300): linear",
                                                 "model_parallel/layers.py(200): forward",
                                                 "training/engine.py(40): train_step", "megatron/core/a.py(10): f"]}]


def test_fusion_timing_times_plain_and_fused_side_by_side():
    """The MFU sections' timing of the fused bias-dropout-add against plain (here on CPU, inductor's C++ kernel):
    each case and implementation timed, the ratios from those times."""
    from bench.gpu_mfu import fusion_timing
    from model_parallel.kernels import availability

    if availability()["bias_dropout_add"]["fused"]:
        pytest.skip(availability()["bias_dropout_add"]["fused"])
    r = fusion_timing((16, 2, 32), "cpu", calls=2)
    for case in ("no_dropout", "dropout_0.1"):
        assert r[f"{case}_plain_ms"] > 0 and r[f"{case}_fused_ms"] > 0
        assert r[f"{case}_plain_over_fused"] == r[f"{case}_plain_ms"] / r[f"{case}_fused_ms"]


def test_cross_entropy_timing_times_plain_and_fused_side_by_side(single_process):
    """The MFU sections' timing of the loss's fused cross-entropy against megatron's (here on CPU)."""
    from bench.gpu_mfu import cross_entropy_timing
    from model_parallel.kernels import availability

    if availability()["cross_entropy"]["fused"]:
        pytest.skip(availability()["cross_entropy"]["fused"])
    r = cross_entropy_timing((16, 2, 64), "cpu", calls=2)
    assert r["plain_ms"] > 0 and r["fused_ms"] > 0 and r["plain_over_fused"] == r["plain_ms"] / r["fused_ms"]


def test_split_heads_timing_times_both_and_reads_the_gradients_layout():
    """The MFU sections' plain-against-fused head split (here on CPU, whose flash backward hands the gradients
    over in a [b, s, heads, d] layout whatever the inputs' layout: not contiguous once permuted back)."""
    from bench.gpu_mfu import split_heads_timing
    from model_parallel.kernels import availability

    if availability()["split_heads"]["fused"]:
        pytest.skip(availability()["split_heads"]["fused"])
    r = split_heads_timing(16, 2, 4, 8, "cpu", calls=2)
    s_first = [4 * 8, 8, 2 * 4 * 8, 1]  # [b, heads, s, d] strides of an [s, b, heads, d]-contiguous gradient
    for name in ("plain", "fused"):
        strides, contiguous = r[f"{name}_grad_strides"], r[f"{name}_contiguous_once_permuted_back"]
        assert contiguous == [st == s_first for st in strides] == [False] * 3
        assert r[f"{name}_ms"] > 0
    assert r["plain_over_fused"] == r["plain_ms"] / r["fused_ms"]


def test_a_failing_diagnostic_is_recorded_and_the_section_goes_on(tmp_path):
    from bench.gpu_common import Context
    from bench.gpu_mfu import _recorded

    ctx = Context("cpu", True, tmp_path)
    assert _recorded(ctx, "fine", lambda: [1]) == [1]
    assert _recorded(ctx, "broken", lambda: 1 / 0) == {"error": "ZeroDivisionError: division by zero"}
    assert ctx.partial == {"fine": [1], "broken": {"error": "ZeroDivisionError: division by zero"}}


def test_a_lent_machines_run_reaches_the_checks_that_matter_most():
    """gpu_check's start rule (a section starts only if its limit fits in what is left) replayed over SECTIONS'
    order with the H200 runs' section times (a section that never finished there: its limit): the 540 s run of a
    lent machine checks the changed code's training, both MFU targets, the asynchronous save and sampling."""
    from bench.gpu_check import time_limit
    from bench.gpu_sections import SECTIONS

    took = {}
    for name in ("gpu_nvidia-h200_2026-12-04.json", "gpu_nvidia-h200_2026-12-04_rerun.json"):
        for section, r in json.loads((ROOT / "bench" / "results" / name).read_text())["sections"].items():
            if r["status"] in ("ok", "fail"):
                took[section] = r["seconds"]
    clock, started = 10.0, []  # (the imports and the GPU's start)
    for name, _, gpus in SECTIONS:
        if gpus <= 1 and time_limit(name, "cuda") <= 540 - clock:
            started.append(name)
            clock += took.get(name, time_limit(name, "cuda"))
    assert {"train_resume", "mfu_350m", "mfu_3b", "async_save", "sampling"} <= set(started), started
    assert started[:2] == ["environment", "train_resume"]


def test_the_device_profile_counts_kernels_not_the_annotations_around_them():
    """On a GPU, kineto puts a gpu_user_annotation on the CUDA timeline for each record_function range that launched
    kernels (torch's optimizer step, c10d's collectives): its span is those kernels' time again. torch's own table
    leaves them out of its device total (autograd/profiler_util.py: `not evt.is_user_annotation`); the kernel
    families and the busy fraction must too."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from bench.gpu_mfu import is_kernel, kernel_breakdown

    event = lambda key, device, annotation, s: SimpleNamespace(key=key, device_type=device, count=1,
                                                              is_user_annotation=annotation, self_device_time_total=s)
    averages = [event("nvjet_sm90_tst_256x128", DeviceType.CUDA, False, 6e5),
                event("multi_tensor_apply_kernel<FusedAdamMathFunctor>", DeviceType.CUDA, False, 1e5),
                event("Optimizer.step#AdamW.step", DeviceType.CUDA, True, 1.2e5),  # (the span around the kernel above)
                event("Optimizer.step#AdamW.step", DeviceType.CPU, True, 0),
                event("aten::mm", DeviceType.CPU, False, 0)]
    kernels = [(e.key, e.self_device_time_total / 1e6, e.count) for e in averages if is_kernel(e)]
    assert [k for k, _, _ in kernels] == ["nvjet_sm90_tst_256x128", "multi_tensor_apply_kernel<FusedAdamMathFunctor>"]
    profile = kernel_breakdown(kernels, 1.0)
    assert abs(profile["busy"] - 0.7) < 1e-9 and abs(profile["by_kind_s"]["optimizer_and_foreach"] - 0.1) < 1e-9
    assert is_kernel(SimpleNamespace(device_type=DeviceType.CUDA))  # (a torch without the attribute)


def _section_process_that(tmp_path: Path, code: str) -> dict:
    """os.environ for gpu_check's section processes with `code` run at their start (a sitecustomize module)."""
    from model_parallel.state import child_environment

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(f"import atexit, os, sys, time\nif '--section' in sys.argv:\n"
                                                        f"    {code}\n")
    env = child_environment(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def test_a_section_that_hangs_at_its_exit_keeps_its_result_and_frees_the_rest_of_its_limit(tmp_path, monkeypatch):
    """A section's process that wrote its result and then never exited (the VQ section on the H200: a helper kept its
    exit waiting) held the run for the rest of its limit (mfu_3b's: up to 240 s of a 540 s run), and its result was
    reported as an error. It is stopped EXIT_GRACE_S after its result appeared; the result stands, saying so."""
    import argparse
    import time

    from bench import gpu_check

    monkeypatch.setattr(gpu_check, "EXIT_GRACE_S", 2.0)
    monkeypatch.setitem(gpu_check.TIME_LIMITS, "environment", 100)  # (x3 on CPU)
    env = _section_process_that(tmp_path, "atexit.register(time.sleep, 1000)")
    args = argparse.Namespace(device="cpu", quick=True)
    (tmp_path / "scratch").mkdir()
    start = time.perf_counter()
    result = gpu_check._run_child("environment", args, tmp_path / "scratch", tmp_path / "running", env)
    assert time.perf_counter() - start < 120, result
    assert result["status"] == "ok" and "had not exited 2 s after writing its result" in result["exit"], result
    assert "its process had not exited" in gpu_check._key_results("environment", result)


def test_a_section_reads_no_result_left_by_an_earlier_run_into_the_same_folder(tmp_path):
    """A run stopped from outside leaves its running section's files under --out/running/; a later run into the same
    folder whose section process died without a result reported the earlier run's result (or records) as its own."""
    import argparse

    from bench import gpu_check

    running = tmp_path / "running"
    running.mkdir()
    (running / "environment.json").write_text('{"status": "ok", "from": "an earlier run"}')
    (running / "environment.partial.json").write_text('{"from": "an earlier run"}')
    env = _section_process_that(tmp_path, "os._exit(3)")
    (tmp_path / "scratch").mkdir()
    result = gpu_check._run_child("environment", argparse.Namespace(device="cpu", quick=True), tmp_path / "scratch",
                                  running, env)
    assert result["status"] == "error" and "exited with 3 and no result" in result["error"], result
    assert result["partial"] == {}


def _fake_sections(monkeypatch, limits: dict, needs: dict, statuses: dict) -> list:
    """gpu_check.main over made-up sections: their time limits and GPU needs, and a _run_child that runs none but
    leaves the files a section's process leaves under running/ and returns {"status": statuses[name]}; the names of
    the sections it was called for, in order."""
    from bench import gpu_check, gpu_sections

    monkeypatch.setattr(gpu_sections, "SECTIONS", [(name, None, needs[name]) for name in limits])
    monkeypatch.setattr(gpu_check, "TIME_LIMITS", limits)
    monkeypatch.setattr(gpu_check, "STARTED", __import__("time").perf_counter())  # (the budget counts from here)
    started = []

    def run_child(name, args, scratch, running, env):
        started.append(name)
        running.mkdir(exist_ok=True)
        for leftover in (f"{name}.json", f"{name}.partial.json"):
            (running / leftover).write_text("{}")
        return {"status": statuses[name], "seconds": 1.0}

    monkeypatch.setattr(gpu_check, "_run_child", run_child)
    return started


def test_the_runner_starts_a_section_only_if_its_limit_fits_and_reports_each(tmp_path, monkeypatch):
    """gpu_check.main's bookkeeping, its sections stood in for: a section starts only if its time limit (x3 on CPU)
    fits in what is left of --budget-s (a later, shorter one still starts), a GPU section is skipped on CPU with
    the reason, --only runs its sections in its order, every section is in the JSON and the Markdown summary, what
    a section left under running/ is removed once it is in the report, and a failed section sets the exit status."""
    from bench import gpu_check

    limits, needs = {"a": 10, "gpu": 5, "long": 60, "b": 20}, {"a": 0, "gpu": 1, "long": 0, "b": 0}
    started = _fake_sections(monkeypatch, limits, needs, {"a": "ok", "long": "ok", "b": "ok"})
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--budget-s", "150"]) == 0
    assert started == ["a", "b"]  # (long: 180 s on CPU > 150)
    report = json.loads(next(tmp_path.glob("gpu_cpu_*.json")).read_text())
    sections = report["sections"]
    assert list(sections) == ["a", "gpu", "long", "b"]
    assert sections["gpu"] == {"status": "skipped", "reason": "needs a GPU"}
    assert sections["long"]["status"] == "skipped"
    assert sections["long"]["reason"].startswith("out of time: its limit of 180 s > the 1") and "--budget-s 150" in \
        sections["long"]["reason"]
    assert [sections[n]["status"] for n in ("a", "b")] == ["ok", "ok"] and report["quick"]
    text = next(tmp_path.glob("gpu_cpu_*.md")).read_text()
    assert ("| a | ok | 1 |" in text and "| gpu | skipped | 0 | needs a GPU |" in text
            and "| long | skipped | 0 | out" in text)
    assert not list((tmp_path / "running").iterdir())

    started.clear()
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "x"), "--only", "b,a"]) == 0
    assert started == ["b", "a"]  # (no --budget-s on CPU: no limit)
    assert list(json.loads(next((tmp_path / "x").glob("*.json")).read_text())["sections"]) == ["b", "a"]
    for failed in ("fail", "error"):
        _fake_sections(monkeypatch, limits, needs, {"a": "ok", "long": "ok", "b": failed})
        assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path / failed), "--only", "a,b"]) == 1, failed
    with pytest.raises(SystemExit, match="unknown sections c"):
        gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "y"), "--only", "a,c"])


def test_a_sections_failed_check_or_error_is_its_status(tmp_path, monkeypatch):
    """The section process's verdict (gpu_check.run_section, here in this process): a False check makes the section
    'fail' with the check named, an exception 'error' with its message and traceback, all checks True 'ok'; what
    the section recorded as it went is in its partial file."""
    import faulthandler
    import time

    from bench import gpu_check, gpu_sections

    def fine(ctx):
        ctx.record("part", 1)
        return {"checks": {"x": True, "y": True}, "value": 3}

    def broken(ctx):
        raise ValueError("no GPU here")

    sections = [("failing", lambda ctx: {"checks": {"x": True, "y": False}}, 0), ("fine", fine, 0),
                ("broken", broken, 0), ("nochecks", lambda ctx: {}, 0)]
    monkeypatch.setattr(gpu_sections, "SECTIONS", sections)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    results = {}
    try:
        for name, _, _ in sections:
            result_file = tmp_path / f"{name}.json"
            gpu_check.run_section(name, "cpu", True, tmp_path, result_file, time.time() + 3600)
            results[name] = json.loads(result_file.read_text())
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert results["failing"]["status"] == "fail" and results["failing"]["failed_checks"] == ["y"]
    assert (results["fine"]["status"] == "ok" and "failed_checks" not in results["fine"]
            and results["fine"]["value"] == 3)
    assert json.loads(gpu_check.partial_file(tmp_path / "fine.json").read_text()) == {"part": 1}
    assert results["broken"]["status"] == "error" and results["broken"]["error"] == "ValueError: no GPU here"
    assert "raise ValueError" in results["broken"]["traceback"]
    assert results["nochecks"]["status"] == "ok"
    assert all(r["seconds"] >= 0 and isinstance(r["helpers_left"], list) for r in results.values())


def test_a_section_stopped_at_its_limit_or_its_exit_is_reported_as_such(tmp_path, monkeypatch):
    """gpu_check._run_child's reading of what its section's process left, the process stood in for: a result
    written and the process stopped before the limit (EXIT_GRACE_S after its result) stands, saying so; one stopped
    at its limit is a time-out that keeps the result apart; no result at all is a time-out with the records; an
    errored result carries the stderr's tail and the records."""
    import argparse

    from bench import gpu_check

    outcome = {}

    def run_with_limit(cmd, limit, env=None, done=None):
        if outcome["result"] is not None:
            done.write_text(json.dumps(outcome["result"]))
        gpu_check.partial_file(done).write_text('{"micro_batch_4": {"mfu": 0.3}}')
        return outcome["returncode"], "the stderr"

    monkeypatch.setattr(gpu_check, "run_with_limit", run_with_limit)
    args = argparse.Namespace(device="cpu", quick=True)

    def child(result, returncode, limit=100):
        monkeypatch.setitem(gpu_check.TIME_LIMITS, "vq", limit)
        outcome.update(result=result, returncode=returncode)
        scratch = tmp_path / f"scratch{len(list(tmp_path.iterdir()))}"
        scratch.mkdir()
        return gpu_check._run_child("vq", args, scratch, tmp_path / "running", {})

    r = child({"status": "ok", "seconds": 5}, None)  # stopped after its result, well inside the limit
    assert r["status"] == "ok" and "had not exited" in r["exit"] and r["stderr_tail"] == "the stderr"
    r = child({"status": "ok", "seconds": 5}, None, limit=0)  # stopped at its limit
    assert r["status"] == "error" and r["error"] == "timed out after 0 s, after its work, at its exit"
    assert r["finished_result"] == {"status": "ok", "seconds": 5} and r["partial"] == {"micro_batch_4": {"mfu": 0.3}}
    r = child(None, None)
    assert r["status"] == "error" and r["error"] == "timed out after 300 s" and r["partial"]["micro_batch_4"]
    r = child({"status": "error", "error": "ValueError: x"}, 0)
    assert r["error"] == "ValueError: x" and r["stderr_tail"] == "the stderr" and r["partial"]["micro_batch_4"]
    r = child({"status": "fail", "failed_checks": ["a"]}, 0)
    assert r == {"status": "fail", "failed_checks": ["a"]}
    r = child(None, 3)
    assert r["error"] == "the section's process exited with 3 and no result" and r["partial"]["micro_batch_4"]


def test_the_summary_reads_results_without_the_gpus_numbers():
    """The Markdown lines of results a CPU run (or a GPU without a peak) writes: train_resume without a memory
    figure, sampling without the CUDA graphs, an MFU section stopped before its MFU was known (no peak: MFU None),
    records named in order."""
    from bench.gpu_check import _key_results

    run = {"status": "ok", "seconds": 3}
    resume = {**run, **{f"zero{z}": {"max_abs_diff": 1e-4, "mem_gb": None} for z in (0, 1, 3)}}
    assert _key_results("train_resume", resume).startswith("ZeRO-0: resume diff 1.0e-04, 0.00 GiB, ZeRO-1:")
    measured = {"dtype": "float32", "batch": 4, "full_recomputation": {"image_tokens_per_s": 10.0},
                "kv_cache": {"image_tokens_per_s": 50.0, "of_bound": 0.5}}
    assert _key_results("sampling", {**run, "preset": "parti-debug", "measured": measured}) == \
        "parti-debug float32 batch 4 (+guidance): full_recomputation 10 tok/s, kv_cache 50 tok/s (50% of bound)"
    stopped = {"status": "error", "error": "timed out after 170 s", "partial": {
        "optimizer_step": {}, "build_s": 9.0, "micro_batch_4": {"mfu": None, "tflops": 300.0}}}
    assert _key_results("mfu_350m", stopped) == \
        "timed out after 170 s; recorded before: build_s, micro_batch_4, optimizer_step"


def test_an_mfu_sections_summary_line_reads_each_of_its_results():
    """The whole Markdown line of an MFU section, every part present and each number distinct, so that a part read
    from the wrong field shows: the best size's share of the measured matmul (not the first size's), the first four
    kernel families, the planner's constants, full recomputation against the compiled step, compiled layers without
    an MFU (no peak), a daemonic helper left (not the other), how its process ended; and a bare result whose
    compiled layers failed with a '|' in the message (a Markdown table's column separator)."""
    from bench.gpu_check import _compiled_summary, _key_results
    from bench.gpu_mfu import kernel_breakdown

    profile = kernel_breakdown([("nvjet_a", 0.45, 1), ("flash_fwd_kernel", 0.25, 1), ("Memcpy DtoD", 0.15, 1),
                                ("vectorized_layer_norm_kernel", 0.1, 1), ("reduce_kernel", 0.05, 1)], 1.25)
    r = {"status": "fail", "failed_checks": ["mfu_at_least_40pct"], "exit": "stopped 20 s after its result",
         "helpers_left": [{"pid": 1, "daemon": False}, {"pid": 2, "daemon": True}], "best_micro_batch": 8,
         "best_mfu": 0.375, "best_tflops": 371.2, "accumulation": 4, "too_large_for_memory": [16], "build_s": 12.4,
         "by_micro_batch": {"4": {"vs_measured_matmul": 0.5}, "8": {"vs_measured_matmul": 0.62}},
         "optimizer_step": {"optimizer_s": 0.0421}, "device_profile_one_step": profile,
         "planner_fit": {"hfu": 0.55, "overhead_ms_per_layer": 3.14},
         "full_recompute": {"vs_none": 1.31, "planner_vs_none": 1.36, "layers_compiled": True},
         "compiled": {"first_step_s": 41.2, "step_s": 1.0, "mfu": None, "speedup": 1.11,
                      "device_profile_one_step": kernel_breakdown([("nvjet_a", 1.0, 1)], 2.0)}}
    assert _key_results("mfu_350m", r) == (
        "1 helper process(es) left running; stopped 20 s after its result; FAILED: mfu_at_least_40pct; MFU 37.5% "
        "(371 TFLOP/s, 62% of the measured matmul) at micro-batch 8 x 4 (too large for memory: 16), build 12 s, "
        "optimizer 0.042 s/step; GPU busy 80% of the step: matmul 45%, attention 25%, copy 15%, norm 10%; "
        "planner fit: hfu 0.55, 3.1 ms per layer and micro-batch; full recomputation 1.31x the step of the compiled "
        "layers (planner 1.36x); compiled layers: MFU n/a (1.11x eager, first step 41 s); GPU busy 50% of the step: "
        "matmul 100%")
    bare = {"status": "ok", "best_micro_batch": 4, "best_mfu": 0.41, "best_tflops": 400.0, "by_micro_batch": {"4": {}},
            "build_s": 3.0, "compiled": {"error": "TypeError: expected int | None\ntraceback"}}
    assert _key_results("mfu_3b", bare) == \
        "MFU 41.0% (400 TFLOP/s) at micro-batch 4, build 3 s; compiled layers: TypeError: expected int / None"
    assert _compiled_summary({"skipped": "no C++ compiler"}) == "; compiled layers: no C++ compiler"
    assert _compiled_summary({}) == _compiled_summary(None) == ""


@pytest.mark.parametrize("name, result, line", [
    ("environment", {"torch": "2.9.0", "torch_cuda": None, "measured_matmul_tflops": 0.4, "peak": "no peak (cpu)"},
     "cpu, driver None, torch 2.9.0 (CUDA None), NCCL None; matmul 0.4 TFLOP/s; no peak (cpu)"),
    ("train_resume", {"zero0": {"max_abs_diff": 1e-4, "mem_gb": 1.5}, "zero1": {"max_abs_diff": 2e-4, "mem_gb": 2.25},
                      "zero3": {"max_abs_diff": 3e-4, "mem_gb": None}},
     ("ZeRO-0: resume diff 1.0e-04, 1.50 GiB, ZeRO-1: resume diff 2.0e-04, 2.25 GiB, ZeRO-3: resume diff 3.0e-04, "
      "0.00 GiB")),
    ("recompute", {"selective": {"max_abs_loss_diff": 1e-5}, "full": {"max_abs_loss_diff": 2e-5}},
     "selective: loss diff 1.0e-05, full: loss diff 2.0e-05"),
    ("decode_compiled", {"greedy": {"gap_fp32": 3e-7, "preset": "parti-350m", "first_call_s": 52.4},
                         "compiled_over_eager": 1.8},
     ("greedy gap 3.0e-07 (parti-350m, first call 52 s); parti-350m CUDA graphs: compiled step 1.80x the eager "
      "step's tok/s")),
    ("vq", {"max_abs_diff": 2e-6, "autocast_code_agreement": 0.998, "pretokenize_images_per_s": 310.0,
            "encode_only_images_per_s": 1200.0},
     "resume diff 2.0e-06, autocast code agreement 0.998, pretokenize 310 img/s vs encode 1200"),
    ("compile_speedup", {"speedup": {"dropout_0.1": 1.25, "dropout_0.0": 1.1}, "compiled_mask_speedup": 1.4,
                         "dropout_cost": {"eager_mask": 0.3, "eager": 0.12, "compiled": 0.05}},
     ("compiled layers 1.25x eager (dropout 0.1), compiled dropout masks 1.40x eager masks; dropout's cost: "
      "eager_mask +30%, eager +12%, compiled +5%")),
    ("multi_gpu", {"status": "fail", "failed_checks": ["pp2_equals_tp1"],
                   "checks": {"tp2_equals_tp1": True, "pp2_equals_tp1": False}},
     "FAILED: pp2_equals_tp1; tp2_equals_tp1: True, pp2_equals_tp1: False"),
    ("train_resume", {"status": "error", "error": "TypeError: expected str | None\n  more"},
     "TypeError: expected str / None"),
])
def test_each_sections_summary_line_reads_its_own_results(name, result, line):
    """Each section's Markdown line from a hand-made result whose numbers are all distinct (a part read from another
    field, or a stage or mode left out, shows); an error's '|' cannot split the table's row."""
    from bench.gpu_check import _key_results

    assert _key_results(name, {"status": "ok", **result}) == line


def test_a_result_the_summary_cannot_format_is_named_not_raised():
    """A number that is None where the line formats it (TypeError), or not a number (ValueError), gives the line
    that says so instead of ending the run."""
    from bench.gpu_check import _key_results

    resume = {"status": "ok", **{f"zero{z}": {"max_abs_diff": None, "mem_gb": None} for z in (0, 1, 3)}}
    assert _key_results("train_resume", resume).startswith("(no summary: TypeError: ")
    vq = {"status": "ok", "max_abs_diff": "n/a", "autocast_code_agreement": 1.0, "pretokenize_images_per_s": 1.0,
          "encode_only_images_per_s": 1.0}
    assert _key_results("vq", vq).startswith("(no summary: ValueError: ")


def test_the_device_slug_names_the_result_files(monkeypatch):
    """gpu_check.device_slug: the GPU's name in lower case, each run of other characters one '-', none at the ends
    (bench/results/gpu_nvidia-h200_*); 'cpu' without a GPU."""
    from bench.gpu_check import device_slug

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3 (MIG 1g.10gb)")
    assert device_slug("cuda") == "nvidia-h100-80gb-hbm3-mig-1g-10gb" and device_slug("cpu") == "cpu"


def test_helpers_left_names_a_helper_that_ignores_sigterm():
    """gpu_check.helpers_left: each helper process still running, daemonic or not, and whether it ignores SIGTERM
    (what once kept a section's process from exiting)."""
    import multiprocessing

    from bench.gpu_check import helpers_left

    ready = multiprocessing.get_context("fork").Event()
    children = [multiprocessing.get_context("fork").Process(target=_sleep_ignoring_sigterm, args=(ignore, ready),
                                                            daemon=ignore) for ignore in (True, False)]
    try:
        for child in children:
            ready.clear()
            child.start()
            assert ready.wait(10)
        left = {h["pid"]: h for h in helpers_left()}
        assert [(left[c.pid]["daemon"], left[c.pid]["ignores_sigterm"]) for c in children] == [(True, True),
                                                                                              (False, False)]
    finally:
        for child in children:
            child.kill()
            child.join(5)


def _sleep_ignoring_sigterm(ignore: bool, ready) -> None:
    import signal
    import time

    if ignore:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(60)



def test_the_mfu_target_is_met_by_the_eager_or_the_compiled_layers():
    """An MFU section's verdict (gpu_mfu._target): the better of the eager and the compiled layers' MFU against the
    target, met at the target itself; no peak for the GPU (MFU None) or compiled layers that failed count as 0."""
    from bench.gpu_mfu import _target

    check = lambda eager, compiled: _target({"best_mfu": eager, "compiled": compiled}, 0.40)
    r = check(0.35, {"mfu": 0.41})
    assert r["checks"] == {"mfu_at_least_40pct": True} and r["best_mfu_eager_or_compiled"] == 0.41
    assert check(0.45, {"error": "BackendCompilerFailed"})["checks"] == {"mfu_at_least_40pct": True}
    assert check(0.40, {"skipped": "no compiler"})["checks"] == {"mfu_at_least_40pct": True}
    assert check(0.39, {"mfu": 0.2})["checks"] == {"mfu_at_least_40pct": False}
    assert check(None, {"mfu": None})["checks"] == {"mfu_at_least_40pct": False}
    assert check(0.3, {"mfu": 0.3})["best_mfu"] == 0.3  # (the section's result kept whole)
    assert list(_target({"best_mfu": 0.5, "compiled": {}}, 0.50)["checks"]) == ["mfu_at_least_50pct"]


def test_the_largest_micro_batch_steps_down_past_out_of_memory_errors():
    """The MFU sections' search (gpu_mfu._largest_micro_batch), measurements stood in for: the two smallest sizes,
    then the largest the planner says fits, the next smaller one after an out-of-memory error, and no more once one
    ran; the best is the fastest (TFLOP/s) of those measured."""
    from bench.gpu_mfu import _largest_micro_batch

    measured = []

    def measure(mbs):
        measured.append(mbs)
        if mbs >= 48:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at {mbs}\nmore")
        return {"tflops": {4: 100.0, 8: 150.0, 32: 140.0, 16: 120.0}[mbs]}

    best, results = _largest_micro_batch(measure, [4, 8, 16, 32, 48, 64, 96], lambda b: b <= 64)
    assert measured == [4, 8, 64, 48, 32] and best == 8
    assert results[64] == {"error": "out of memory: CUDA out of memory at 64"} and "error" in results[48]
    assert results[32] == {"tflops": 140.0} and 16 not in results
    measured.clear()
    assert _largest_micro_batch(measure, [4, 8, 16, 32], lambda b: b != 32)[0] == 8 and measured == [4, 8, 16]


def test_realign_runs_single_micro_batches_until_a_step_starts(monkeypatch):
    """gpu_mfu._realign, DeepSpeed's engine stood in for: from mid-step (micro-step 5 of 4 per step) it runs the 3
    micro-batches that end that step, and none from a step's start."""
    from types import SimpleNamespace

    import training.engine
    from bench.gpu_mfu import _realign

    engine = SimpleNamespace(micro_steps=5, gradient_accumulation_steps=lambda: 4)
    ran = []

    def train_step(engine_, cfg, data, device):
        ran.append(len(data))
        engine_.micro_steps += 1

    monkeypatch.setattr(training.engine, "train_step", train_step)
    _realign(engine, None, "batch", "cpu")
    assert ran == [1, 1, 1] and engine.micro_steps == 8
    _realign(engine, None, "batch", "cpu")
    assert ran == [1, 1, 1]


def test_milliseconds_per_call_after_the_warm_up(monkeypatch):
    """gpu_mfu._ms_per_call and _seconds_per_step on a clock that each call advances by a known time: the warm-up
    calls run and are not timed, the time is per call."""
    from types import SimpleNamespace

    import training.engine
    from bench import gpu_mfu

    clock = [0.0]
    monkeypatch.setattr(gpu_mfu, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    calls, warm_up = [], [2]

    def step():
        calls.append(clock[0])
        clock[0] += 0.5 if len(calls) > warm_up[0] else 100.0  # (the warm-up: compilation)

    assert gpu_mfu._ms_per_call(step, "cpu", 4) == 500.0 and len(calls) == 6
    calls.clear()
    warm_up[0] = 1
    monkeypatch.setattr(training.engine, "train_step", lambda engine, cfg, data, device: step())
    assert gpu_mfu._seconds_per_step(None, None, [], "cpu") == 0.5 and len(calls) == 4  # (1 warm-up, 3 timed)


def test_the_kernel_families_are_listed_busiest_first():
    """kernel_breakdown's families by time, busiest first (the summary line names the first four), whatever the
    order of the kernels; a family's kernels summed; no wall time: no busy fraction."""
    from bench.gpu_mfu import kernel_breakdown

    r = kernel_breakdown([("vectorized_elementwise_kernel", 0.1, 1), ("flash_fwd_kernel", 0.2, 1),
                          ("nvjet_tst_a", 0.3, 1), ("sm90_xmma_gemm", 0.3, 1), ("Memcpy DtoD", 0.05, 1)], 0.0)
    assert list(r["by_kind_s"]) == list(r["by_kind_share"]) == ["matmul", "attention", "elementwise_other", "copy"]
    assert abs(r["by_kind_share"]["matmul"] - 0.6 / 0.95) < 1e-12 and r["busy"] is None
    assert kernel_breakdown([], 1.0)["by_kind_share"] == {}


def test_random_micro_batches_sit_at_distinct_sample_positions():
    """The MFU sections' data (gpu_mfu._random_micro_batches): `count` micro-batches of `mbs` samples at successive
    positions of the sample stream (what keys the dropout masks), codes and captions in their vocabularies."""
    from bench.gpu_common import train_config
    from bench.gpu_mfu import _random_micro_batches

    m = train_config(["model.preset=parti-debug"]).model
    batches = _random_micro_batches(m, 3, 2, "cpu")
    assert len(batches) == 2
    assert [b[2].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5]]
    assert batches[0][0].shape == (3, m.text_seq_len) and batches[0][1].shape == (3, m.image_seq_len)
    assert int(batches[0][1].max()) < m.image_vocab_size and int(batches[0][0].min()) >= 4
    assert not torch.equal(batches[0][1], batches[1][1])


def test_max_diff_compares_whole_sequences():
    """gpu_common.max_diff: the largest difference, and sequences of different lengths (a run that stopped short)
    are an error, not a comparison of their common prefix."""
    from bench.gpu_common import max_diff

    assert max_diff([1.0, 2.0], [1.5, 1.0]) == 1.0
    with pytest.raises(ValueError):
        max_diff([1.0, 2.0], [1.0])


def test_tiny_runs_save_and_measure_where_train_resume_resumes(tmp_path):
    """gpu_common.tiny_run_sets, the runs train_resume and recompute compare: a checkpoint and a held-out loss at step
    3 (where the resumed run stops and restarts), on the section's device, the smaller preset when quick."""
    from bench.gpu_common import Context, tiny_run_sets, train_config

    for device, quick, preset in (("cuda", False, "parti-tiny"), ("cpu", True, "parti-debug")):
        cfg = train_config(tiny_run_sets(Context(device, quick, tmp_path)))
        assert cfg.train.save_interval == cfg.train.eval_interval == 3 and cfg.train.device == device
        assert cfg.model == train_config([f"model.preset={preset}", "model.dropout=0.1",
                                          "model.attention_dropout=0.1"]).model


def test_the_attention_kind_is_read_from_the_kernel_names():
    """flash_attention's reading of the profiler's kernel names (gpu_sections._attention_kind): the second H200 run's
    kernels give the kinds it recorded (cuDNN's flash SDPA; the decode step's flash kernel beside a memory-efficient
    one); cuDNN's SDPA without flash, the memory-efficient kernel alone and no attention kernel are told apart."""
    from bench.gpu_sections import _attention_kind

    run = json.loads((ROOT / "bench" / "results" / "gpu_nvidia-h200_2026-12-04.json").read_text())["sections"]
    recorded = run["flash_attention"]
    assert {k: _attention_kind(v) for k, v in recorded["attention_kernels"].items()} == recorded["kinds"]
    mem_eff = recorded["attention_kernels"]["decode_one_token"][0]
    assert mem_eff.startswith("fmha_cutlassF") and _attention_kind([mem_eff, "ampere_bf16_gemm"]) == "memory-efficient"
    assert _attention_kind(["cudnn_generated_fort_native_sdpa_sm90_fprop"]) == "cudnn"
    assert _attention_kind(["cudnn_infer_gemm_kernel", "softmax_warp_forward"]) == "math (no fused attention kernel)"
    assert _attention_kind(["cudnn_infer_gemm_kernel", mem_eff]) == "memory-efficient"  # (cuDNN's, but no attention)
    assert _attention_kind(["void pytorch_flash::flash_fwd_kernel<...>"]) == "flash"


def test_resume_and_recompute_checks_judge_the_losses(tmp_path, monkeypatch):
    """train_resume's and recompute's verdicts, the training runs stood in for (gpu_sections.train_run): resumed =
    uninterrupted within 2e-3 with 3 steps after the resume, the held-out losses of both at steps 3 and 6, the loss
    going down, the ZeRO stages within 2e-2 of each other; recomputation's losses and gradient norms those of none."""
    from bench import gpu_sections
    from bench.gpu_common import Context

    def check(full, resumed_steps=(4, 5, 6), held_out=(2.0, 1.5), held_out_resumed=(2.0, 1.5), zero3_shift=0.0,
              grad_norms=(1.0, 1.0, 1.0), ema_shift=0.0):
        def train_run(run_dir, sets, steps):
            losses = [full[s - 1] + (zero3_shift if "parallel.zero_stage=3" in sets else 0.0)
                      for s in (range(1, 4) if steps == 3 else range(1, 7) if "full" in run_dir.name
                                else resumed_steps)]
            held = held_out if "full" in run_dir.name else held_out_resumed if steps == 6 else held_out[:1]
            lines = [{"step": s, "loss": loss, "mem_gb": 1.0,
                      "grad_norm": grad_norms[0] * (1.05 if "recompute_full" in run_dir.name else 1.0)}
                     for s, loss in enumerate(full[:steps], 1)]  # (a resumed run's file: its first part's too)
            for i, h in enumerate(held):  # (the steps a held-out loss was measured at: 3 and 6)
                lines[min(3 * i + 2, len(lines) - 1)]["valid_loss"] = h
            return losses, lines

        monkeypatch.setattr(gpu_sections, "train_run", train_run)
        # (the moving average each run's last checkpoint holds: the resumed run's off by ema_shift)
        monkeypatch.setattr(gpu_sections, "averaged_weights", lambda run_dir: {"w": torch.full(
            (2,), 1.0 + (ema_shift if run_dir.name.endswith("resumed") else 0.0))})
        ctx = Context("cpu", True, tmp_path)
        return {k: v for k, v in gpu_sections.train_resume(ctx)["checks"].items() if k.startswith("zero1")
                or k == "zero_stages_agree"}, gpu_sections.recompute(ctx)["checks"]

    losses = [3.0, 2.9, 2.8, 2.7, 2.6, 2.5]
    resume, recompute = check(losses)
    assert all(resume.values()) and len(resume) == 5 and resume["zero_stages_agree"]
    assert check(losses, ema_shift=1e-3)[0]["zero1_ema_resumed_equals_uninterrupted"] is False
    assert recompute == {"selective_equals_none": True, "full_equals_none": False}  # (gradient norms 5% off)
    # (a resumed run that stopped short, or restarted from step 1 without a checkpoint: a failed check, not an error)
    for resumed_steps in ((4, 5), (1, 2, 3, 4, 5, 6)):
        assert check(losses, resumed_steps=resumed_steps)[0]["zero1_resume_equals_uninterrupted"] is False
    assert check(losses, held_out=(2.0,), held_out_resumed=(2.0,))[0][
        "zero1_held_out_resumed_equals_uninterrupted"] is False
    assert check(losses, held_out_resumed=(2.0,))[0]["zero1_held_out_resumed_equals_uninterrupted"] is False
    assert check(losses, held_out_resumed=(2.0, 1.51))[0]["zero1_held_out_resumed_equals_uninterrupted"] is False
    assert check(losses[::-1])[0]["zero1_learns"] is False
    assert check(losses, zero3_shift=0.03)[0]["zero_stages_agree"] is False
    assert check(losses, zero3_shift=0.01)[0]["zero_stages_agree"] is True

def _step_lines(times: dict) -> list[dict]:
    """A stood-in train_run's metrics lines for step times {step: seconds} (batch 8: samples/s = 8 / seconds)."""
    return [{"step": s, "loss": 1.0, "samples_per_s": 8 / t} for s, t in times.items()]


def test_async_save_compares_the_steps_after_each_save_with_the_reference(tmp_path, monkeypatch):
    """async_save's ratios, the training runs stood in for (gpu_sections.train_run, forking_idly_every): the median
    of the two steps after each save call (6, 7, 11, 12, 16, 17: not a save's own step, not the first five) over
    the median of the run without saves past step 5, and the same for the idle fork's run; on a GPU the target
    (<= 1.10) and the last save's step are checks, on CPU there are none."""
    from bench import gpu_sections
    from bench.gpu_common import Context

    # Without saves: the first five steps fast (0.1 s), then 1.0, 1.1, ..., 2.3 s and an outlier at step 20
    # (its median past step 5: 1.7 s at step 13; a mean or the first five steps counted would move it).
    without = {s: 0.1 for s in range(1, 6)} | {s: 1.0 + 0.1 * (s - 6) for s in range(6, 20)} | {20: 31.0}

    def with_saves(after: list[float]) -> dict:
        times = {s: 1.0 for s in range(1, 21)} | {1: 50.0, 2: 50.0} | {s: 9.0 for s in (5, 10, 15, 20)}
        return times | dict(zip((6, 7, 11, 12, 16, 17), after))

    runs = {"warm_up": {1: 5.0, 2: 5.0}, "no_saves": without}

    def train_run(run_dir, sets, steps):
        assert len(runs[run_dir.name]) == steps
        return [1.0] * steps, _step_lines(runs[run_dir.name])

    monkeypatch.setattr(gpu_sections, "train_run", train_run)
    monkeypatch.setattr(gpu_sections, "forking_idly_every", lambda interval: contextlib.nullcontext())

    def run(device: str, saving_after: list[float], latest: str = "step_00000020") -> dict:
        scratch = tmp_path / f"scratch{len(list(tmp_path.iterdir()))}"
        (scratch / "async_save" / "checkpoints").mkdir(parents=True)
        (scratch / "async_save" / "checkpoints" / "latest").write_text(latest + "\n")
        runs["async_save"] = with_saves(saving_after)
        runs["idle_fork"] = with_saves([3.0, 3.2, 3.4, 3.6, 3.8, 60.0])  # (median 3.6)
        return gpu_sections.async_save(Context(device, False, scratch))

    r = run("cuda", [2.0, 2.2, 2.4, 2.6, 2.8, 40.0])  # (median 2.6)
    steps = r["steps"]
    assert steps["step_s_without"] == pytest.approx(1.7) and steps["step_s_during_save"] == pytest.approx(2.6)
    assert steps["ratio"] == pytest.approx(2.6 / 1.7) and steps["idle_fork_ratio"] == pytest.approx(3.6 / 1.7)
    assert steps["step_s_beside_an_idle_fork"] == pytest.approx(3.6)
    assert r["checks"] == {"async_step_within_10pct": False, "last_save_completed": True}
    r = run("cuda", [1.6, 1.7, 1.8, 1.85, 1.9, 40.0], latest="step_00000015")  # (1.85 / 1.7 = 1.088)
    assert r["checks"] == {"async_step_within_10pct": True, "last_save_completed": False}
    assert run("cpu", [2.0, 2.2, 2.4, 2.6, 2.8, 40.0])["checks"] == {}


def test_forking_idly_every_keeps_one_idle_child_and_kill_all_reaps_them(monkeypatch):
    """async_save's idle fork: Trainer.complete_saves patched while inside, a sleeping child forked at each
    `interval`-th step (the previous one killed first: one at a time), none left afterwards and the method
    restored; kill_all kills, reaps and empties its list."""
    import multiprocessing
    from types import SimpleNamespace

    from bench.gpu_sections import forking_idly_every, kill_all
    from training.trainer import Trainer

    called = []
    monkeypatch.setattr(Trainer, "complete_saves", lambda trainer, wait=False: called.append(trainer.step))
    plain = Trainer.complete_saves
    before = set(multiprocessing.active_children())
    children = []
    try:
        with forking_idly_every(5):
            for step in range(1, 11):
                Trainer.complete_saves(SimpleNamespace(step=step))
                children = [c for c in multiprocessing.active_children() if c not in before]
                assert len(children) == (0 if step < 5 else 1), step
                if step == 5:
                    first = children[0]
            assert children[0] is not first and first.exitcode is not None  # (killed at step 10, reaped)
        assert called == list(range(1, 11)) and Trainer.complete_saves is plain
        assert children[0].exitcode is not None and not children[0].is_alive()
        ctx = multiprocessing.get_context("fork")
        children = [ctx.Process(target=__import__("time").sleep, args=(60,), daemon=True) for _ in range(2)]
        for child in children:
            child.start()
        left = list(children)
        kill_all(children)
        assert children == [] and all(c.exitcode is not None for c in left)
    finally:
        for child in children:
            child.kill()


def test_greedy_gap_is_the_largest_shortfall_of_the_teacher_forced_pass(monkeypatch):
    """greedy_gap on a stood-in model: one teacher-forced pass over BOS + the codes but the last, and the largest
    amount (not the mean) by which a position's best logit exceeds the chosen code's."""
    from types import SimpleNamespace

    import megatron.core.tensor_parallel

    from bench.gpu_sections import greedy_gap

    monkeypatch.setattr(megatron.core.tensor_parallel, "gather_from_tensor_model_parallel_region", lambda t: t)
    codes = torch.tensor([[1, 2, 3, 0], [3, 3, 1, 2]])  # [b, n]
    logits = torch.zeros(4, 2, 5)  # [n, b, V]: each code the argmax by 1.0 ...
    logits[torch.arange(4)[:, None], torch.arange(2)[None, :], codes.t()] = 1.0
    logits[2, 1, 4] = 1.5  # ... but image 1's third code, 0.5 below the best there
    passed = []

    def decode(tokens, memory, mask):
        passed.append(tokens)
        return logits

    model = SimpleNamespace(bos_id=9, encode=lambda text: ("memory", "mask"), decode=decode)
    assert greedy_gap(model, torch.zeros(2, 3), codes) == 0.5
    assert passed[0].tolist() == [[9, 1, 2, 3], [9, 3, 3, 1]]
    logits[2, 1, 4] = 0.0
    assert greedy_gap(model, torch.zeros(2, 3), codes) == 0.0


def test_sampling_checks_judge_the_gaps_and_the_decoding_rates(tmp_path, monkeypatch, single_process):
    """sampling's verdicts, the models, decoding and timing stood in for: each decoding mode's greedy gap within
    GREEDY_TOLERANCE (at it: still greedy), a mode that ran (its rate measured), and on a GPU the KV cache faster
    than full recomputation (equal is not faster); on CPU no CUDA-graph modes and no speed check."""
    import bench.sample
    import evaluation.sampling
    import model_parallel.model
    from bench import gpu_sections
    from bench.gpu_common import Context

    class Model:
        def __init__(self, cfg):
            pass

        def to(self, *args, **kwargs):
            return self

        def eval(self):
            return self

    def sample(model, text, cfg, use_cache=True, cuda_graph=False, steps=None, **kwargs):
        return torch.full((2, 4), 1 if cuda_graph else 0)

    randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda *args, device=None, **kwargs: randint(*args, **kwargs))  # (no GPU)
    monkeypatch.setattr(model_parallel.model, "PartiModel", Model)
    monkeypatch.setattr(evaluation.sampling, "sample", sample)
    monkeypatch.setattr(evaluation.sampling, "StaticSteps", lambda: "steps")
    monkeypatch.setattr(evaluation.sampling, "auto_batch_size", lambda model, guided: 64)
    gaps, rates = [], {}
    monkeypatch.setattr(gpu_sections, "greedy_gap", lambda model, text, codes: gaps.pop(0))

    def measure_decoding(model, batch, tokens, modes, reference_tokens=None, guidance_scale=None,
                         per_image_generators=False):
        return {"batch": batch, "dtype": "bfloat16", **{m: dict(rates[m]) for m in modes}}

    monkeypatch.setattr(bench.sample, "measure_decoding", measure_decoding)

    def run(device, gap_values, kv_cache, cuda_graph=None):
        gaps[:] = gap_values
        rates.update(full_recomputation={"image_tokens_per_s": 100.0}, kv_cache=kv_cache,
                     cuda_graph=cuda_graph or {"image_tokens_per_s": 300.0}, bound={"image_tokens_per_s": 1000.0})
        scratch = tmp_path / f"scratch{len(list(tmp_path.iterdir()))}"
        return gpu_sections.sampling(Context(device, True, scratch))

    modes = [a + m for a in ("", "decoder_only_") for m in ("kv_cache", "cuda_graph", "cuda_graph_restarted")]
    greedy = lambda ok: {f"greedy_{m}_is_greedy_under_recomputation": v for m, v in zip(modes, ok)}
    r = run("cuda", [0.0, 1e-6, 0.0, 0.0, 0.0, 0.0], {"image_tokens_per_s": 150.0})
    assert r["checks"] == greedy([True] * 6) | {"kv_cache_ran": True, "cuda_graph_ran": True,
                                                "kv_cache_faster_than_recomputation": True}
    assert r["greedy_equal_fp32"] == {m: m.endswith("kv_cache") for m in modes}
    assert r["measured"]["kv_cache"]["vs_full_recomputation"] == 1.5 and r["auto_batch_size"] == 64
    r = run("cuda", [gpu_sections.GREEDY_TOLERANCE, 0.0, 0.0, 0.0, 0.002, 0.0], {"image_tokens_per_s": 100.0},
            {"error": "RuntimeError: capture failed"})
    assert r["checks"] == greedy([True, True, True, True, False, True]) | {
        "kv_cache_ran": True, "cuda_graph_ran": False, "kv_cache_faster_than_recomputation": False}
    assert run("cuda", [0.0] * 6, {"error": "RuntimeError: x"})["checks"]["kv_cache_faster_than_recomputation"] is False
    r = run("cpu", [0.0, 0.5], {"image_tokens_per_s": 50.0})  # (slower: reported on CPU, not judged)
    assert r["checks"] == {"greedy_kv_cache_is_greedy_under_recomputation": True, "kv_cache_ran": True,
                           "greedy_decoder_only_kv_cache_is_greedy_under_recomputation": False}
    assert set(r["measured"]) >= {"full_recomputation", "kv_cache"} and "cuda_graph" not in r["measured"]


def test_multi_gpu_compares_tp2_and_pp2_with_tp1(tmp_path, monkeypatch):
    """multi_gpu's verdict, torchrun stood in for (it writes the run's metrics): TP=2 and PP=2 each within 1e-3 of
    TP=1's losses, each on its own."""
    import subprocess

    from bench import gpu_sections
    from bench.gpu_common import Context

    losses, commands = {}, []

    def run(cmd, check, env, cwd):
        commands.append(cmd)
        run_dir = Path(cmd[cmd.index("--run-dir") + 1])
        run_dir.mkdir(parents=True)
        name = run_dir.name.removeprefix("multi_")
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": v}) + "\n"
                                                       for s, v in enumerate(losses[name], 1)))

    monkeypatch.setattr(subprocess, "run", run)
    tp1 = [3.0, 2.9, 2.8, 2.7]
    losses.update(tp1=tp1, tp2=[v + 0.0009 for v in tp1], pp2=[3.0, 2.9, 2.8, 2.702])
    r = gpu_sections.multi_gpu(Context("cuda", False, tmp_path / "a"))
    assert r["checks"] == {"tp2_equals_tp1": True, "pp2_equals_tp1": False} and r["losses"]["pp2"][-1] == 2.702
    assert [c[c.index("--set") + 8:] for c in commands] == [[], ["parallel.tp=2"], ["parallel.pp=2"]]
    assert [c[3] for c in commands] == ["--nproc_per_node=1", "--nproc_per_node=2", "--nproc_per_node=2"]
    losses.update(tp2=[v + 0.002 for v in tp1], pp2=tp1)
    r = gpu_sections.multi_gpu(Context("cuda", False, tmp_path / "b"))
    assert r["checks"] == {"tp2_equals_tp1": False, "pp2_equals_tp1": True}


def test_the_sections_that_need_a_gpu_are_those_that_cannot_run_on_cpu():
    """SECTIONS' needs: what the CPU run (--quick) skips. A section marked as needing a GPU that could run on CPU
    would drop out of the test suite's run unnoticed (skipped with the reason, as the test expects of it); one
    that needs two GPUs and is marked for one would fail on a lent one-GPU machine instead of being skipped."""
    from bench.gpu_sections import SECTIONS

    needs = {name: n for name, _, n in SECTIONS}
    assert {name for name, n in needs.items() if n == 1} == {"mfu_350m", "mfu_3b", "mfu_750m", "flash_attention",
                                                             "compile_speedup"}
    assert needs["multi_gpu"] == 2 and sum(n == 0 for n in needs.values()) == len(needs) - 6


def test_fusion_timing_ratios_are_plain_over_fused(monkeypatch):
    """fusion_timing's ratios from stood-in times (gpu_mfu._ms_per_call), whether or not this machine can fuse:
    plain's time over fused's, each case its own."""
    import model_parallel.kernels
    from bench import gpu_mfu

    plain = model_parallel.kernels.plain_bias_dropout_add
    monkeypatch.setattr(model_parallel.kernels, "fused_bias_dropout_add", lambda: plain)
    times = [4.0, 2.0, 9.0, 3.0]  # (no dropout: plain, fused; dropout 0.1: plain, fused)
    monkeypatch.setattr(gpu_mfu, "_ms_per_call", lambda step, device, calls: times.pop(0))
    r = gpu_mfu.fusion_timing((4, 2, 8), "cpu")
    assert r["no_dropout_plain_over_fused"] == 2.0 and r["dropout_0.1_plain_over_fused"] == 3.0
    assert r["dropout_0.1_fused_ms"] == 3.0 and r["shape"] == [4, 2, 8]


def test_the_compiled_step_reports_its_speed_up_over_the_eager_layers(tmp_path, monkeypatch):
    """gpu_mfu._compiled_step with the compilation and the steps stood in for: the speed-up is eager's step time
    over the compiled one's, TFLOP/s and MFU from the compiled step; a compilation that fails is recorded and the
    eager engine realigned."""
    from types import SimpleNamespace

    import model_parallel.compile
    import model_parallel.kernels
    import training.engine
    from bench import gpu_mfu
    from bench.gpu_common import Context

    monkeypatch.setattr(model_parallel.kernels, "compile_unavailable", lambda: None)
    monkeypatch.setattr(model_parallel.compile, "compile_layers", lambda module: module)
    monkeypatch.setattr(training.engine, "train_step", lambda engine, cfg, data, device: [1.0])
    monkeypatch.setattr(gpu_mfu, "_seconds_per_step", lambda engine, cfg, data, device: 0.5)
    engine = SimpleNamespace(module=torch.nn.Linear(2, 2))
    r = gpu_mfu._compiled_step(Context("cpu", True, tmp_path), engine, None, ["batch"], 4e12, 16e12, 0.6)
    assert r["speedup"] == pytest.approx(1.2) and r["tflops"] == pytest.approx(8.0) and r["mfu"] == pytest.approx(0.5)
    assert r["step_s"] == 0.5 and r["first_step_s"] >= 0

    def broken(module):
        raise RuntimeError("inductor failed")

    realigned = []
    monkeypatch.setattr(model_parallel.compile, "compile_layers", broken)
    monkeypatch.setattr(gpu_mfu, "_realign", lambda engine, cfg, batch, device: realigned.append(batch))
    r = gpu_mfu._compiled_step(Context("cpu", True, tmp_path), engine, None, ["batch"], 4e12, None, 0.6)
    assert r == {"error": "RuntimeError: inductor failed"} and realigned == ["batch"]


def test_the_mfu_section_turns_step_times_into_tflops_and_mfu(tmp_path, monkeypatch):
    """gpu_mfu._mfu with the GPU, the trainer and its steps stood in for, on numbers worked out by hand: a step is
    micro-batch x accumulation samples, so 1e12 FLOPs a sample at micro-batch 8, 4 micro-batches in 0.32 s is 100
    TFLOP/s, 50% of a 200 TFLOP/s peak; the compiled layers get that step's FLOPs; the optimizer's share is the
    last micro-batch's time less the others' mean; a size the planner rules out or that ran out of memory is too
    large for memory; full recomputation's cost is its step over the plain one's."""
    from types import SimpleNamespace

    import bench.train_throughput
    import model_parallel.activation_checkpointing as checkpointing
    import training.engine
    import training.flops
    import training.plan
    import training.trainer
    from bench import gpu_mfu
    from bench.gpu_common import Context

    clock, step_s, compiled_flops, tried = [0.0], {4: 0.2, 8: 0.32}, [], []

    def seconds_per_step(engine, cfg, data, device):
        tried.append(data[0])
        if data[0] >= 16:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at {data[0]}")
        return step_s[data[0]] * (4 / 3 if engine.recompute else 1)

    def train_step(engine, cfg, data, device):  # 0.1 s a micro-batch, the 4th one 0.05 s more: the optimizer step
        engine.micro_steps += len(data)
        clock[0] += 0.1 * len(data) + (0.05 if engine.micro_steps % 4 == 0 else 0)

    engine = SimpleNamespace(micro_steps=0, recompute=False, module=None)
    trainer = SimpleNamespace(engine=engine, peak_flops=200e12, log=SimpleNamespace(close=lambda: None))
    for module, name, value in [
            (training.trainer, "Trainer", lambda cfg, run_dir: trainer),
            (training.flops, "train_flops_per_sample", lambda m: 1e12),
            (bench.train_throughput, "matmul_flops", lambda device: 400e12),
            (training.plan, "estimate", lambda *a: SimpleNamespace(peak_gb=float(a[5]), step_s=1.0)),
            (training.engine, "train_step", train_step),
            (gpu_mfu, "time", SimpleNamespace(perf_counter=lambda: clock[0])),
            (gpu_mfu, "_random_micro_batches", lambda m, mbs, count, device: [mbs] * count),
            (gpu_mfu, "_seconds_per_step", seconds_per_step),
            (gpu_mfu, "_realign", lambda *a: None),
            (gpu_mfu, "_host_profile", lambda fn: []),
            (gpu_mfu, "_device_profile", lambda fn: {}),
            (gpu_mfu, "_op_profile", lambda fn, device: []),
            (gpu_mfu, "_compiled_step", lambda ctx, e, cfg, data, flops, *a: compiled_flops.append(flops) or {}),
            (torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=32.5 * 2**30)),
            *((torch.cuda, name, lambda *a: 0) for name in ("reset_peak_memory_stats", "max_memory_allocated",
                                                             "max_memory_reserved", "synchronize", "empty_cache"))]:
        monkeypatch.setattr(module, name, value)
    monkeypatch.setattr(checkpointing, "apply_activation_checkpointing",
                        lambda module, mode: setattr(engine, "recompute", True))
    for name in ("fusion_timing", "cross_entropy_timing", "split_heads_timing"):
        monkeypatch.setattr(gpu_mfu, name, lambda *a: {})

    r = gpu_mfu._mfu(Context("cpu", True, tmp_path), "parti-debug", [4, 8, 16, 32])
    assert 16 in tried and 32 not in tried  # (planned to fit: 16 GiB, not 32, within 95% of 32.5 GiB)
    assert r["best_micro_batch"] == 8 and r["best_tflops"] == pytest.approx(100) and r["best_mfu"] == pytest.approx(0.5)
    assert r["by_micro_batch"][4]["mfu"] == pytest.approx(0.4)
    assert r["by_micro_batch"][8]["vs_measured_matmul"] == pytest.approx(0.25)
    assert compiled_flops == [pytest.approx(32e12)] and r["too_large_for_memory"] == [16, 32]
    assert r["optimizer_step"]["optimizer_s"] == pytest.approx(0.05)
    assert r["full_recompute"]["vs_none"] == pytest.approx(4 / 3)
    assert r["planner_fit"]["hfu"] == pytest.approx(1e12 / (0.0075 * 200e12))  # (0.03 s more a micro-batch for 4 more)


def test_compile_speedup_divides_the_eager_step_by_the_compiled_one(tmp_path, monkeypatch):
    """compile_speedup's ratios and checks, the trainers and their steps stood in for: the speed-up per dropout is
    eager's step time over compiled's, the compiled mask's speed-up eager_mask's over eager's at dropout 0.1, each
    variant's dropout cost its 0.1 step over its 0.0 one less 1; first losses: compiled = eager within 2e-2, the two
    eager masks within 1e-3."""
    from types import SimpleNamespace

    import training.engine
    import training.trainer
    from bench import gpu_mfu
    from bench.gpu_common import Context
    from model_parallel.layers import SampleDropout

    seconds = {"eager_mask": {0.1: 6.0, 0.0: 4.0}, "eager": {0.1: 3.0, 0.0: 2.5}, "compiled": {0.1: 2.0, 0.0: 1.0}}
    first_loss = {}
    variant = lambda cfg: ("compiled" if cfg.kernels.compile
                           else "eager_mask" if cfg.kernels.dropout_mask == "eager" else "eager")

    class Trainer:
        def __init__(self, cfg, run_dir):
            site = SampleDropout(0.1, False, None)
            self.engine = SimpleNamespace(module=torch.nn.Sequential(site), variant=variant(cfg), site=site)

        def close(self):
            pass

    monkeypatch.setattr(training.trainer, "Trainer", Trainer)
    monkeypatch.setattr(training.engine, "train_step", lambda engine, cfg, data, device: [first_loss[engine.variant]])
    monkeypatch.setattr(gpu_mfu, "_seconds_per_step",
                        lambda engine, cfg, data, device: seconds[engine.variant][engine.site.p])

    def run(**losses):
        first_loss.update(losses)
        return gpu_mfu.compile_speedup(Context("cpu", True, tmp_path))

    r = run(eager_mask=3.0, eager=3.0005, compiled=3.015)
    assert r["speedup"] == {"dropout_0.1": 1.5, "dropout_0.0": 2.5} and r["compiled_mask_speedup"] == 2.0
    assert r["dropout_cost"] == pytest.approx({"eager_mask": 0.5, "eager": 0.2, "compiled": 1.0})
    assert r["checks"] == {"compiled_first_loss_equals_eager": True, "compiled_mask_first_loss_equals_eager_mask": True}
    assert run(eager_mask=3.0, eager=3.002, compiled=3.03)["checks"] == {
        "compiled_first_loss_equals_eager": False, "compiled_mask_first_loss_equals_eager_mask": False}
