"""Optimizer state through checkpoints, for every optimizer `kernels.optimizer` can name, and bf16 at
ZeRO-0 against bf16 at ZeRO-1.

- torch's fused AdamW (what `auto` picks on a GPU; it runs on CPU too): save at step 3 and resume =
  the uninterrupted run, fp32 and bf16, ZeRO-0 and ZeRO-1; bf16 ZeRO-0 = bf16 ZeRO-1 within bf16 noise.
- DeepSpeed's FusedAdam and apex's FusedAdam JIT-compile / need CUDA ops, so they run here as stand-ins:
  subclasses of `deepspeed.ops.adam.FusedAdam` without the op build, whose step is the op's math
  (csrc/adam/multi_tensor_adam.cu) in plain torch with each optimizer's own step-count semantics.
  Being FusedAdam instances, DeepSpeed's engine wraps them at bf16 ZeRO-0 in FP16_Optimizer (flat fp32
  master per param group) exactly as on a GPU. They are injected in the worker processes by replacing
  model_parallel.kernels._optimizer_factory.

"save at step 3 and resume": the uninterrupted run saves at step 3 (and 6); its step-3 checkpoint is
copied into a fresh run directory which then resumes from it, so each comparison costs two engine
start-ups, not three.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported (here and in the pool's workers)
from deepspeed.ops.adam import FusedAdam  # noqa: E402

from common.checkpoints import tag_for  # noqa: E402
from tests.conftest import STEPS, run  # noqa: E402

SAVED_AT = 3


class DeepSpeedFusedAdamOnCPU(FusedAdam):
    """deepspeed.ops.adam.FusedAdam (DeepSpeed 0.19) with its CUDA op replaced by the op's math.

    State semantics as in FusedAdam.step: the group gets `step = 0` if it has none (and keeps it);
    an empty per-tensor state is created with `step = group.get('step', 0)` (an int) and zero moments;
    after the loop over the group's parameters, `state['step'] += 1` is applied to the state left in
    the loop variable, i.e. the last parameter's with a gradient, once per dtype list, and that count
    is the bias-correction step of the whole group."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, amsgrad=False, set_grad_none=True):
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay)
        torch.optim.Optimizer.__init__(self, params, defaults)  # FusedAdam.__init__ would build the CUDA op
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.set_grad_none = set_grad_none

    @torch.no_grad()
    def _multi_tensor_adam(self, group, tensors, step: int) -> None:
        """multi_tensor_adam.cu: fp32 math, AdamW (mode 1: decay added to the update) or L2 (mode 0)."""
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        bc1, bc2 = (1 - beta1 ** step, 1 - beta2 ** step) if group["bias_correction"] else (1.0, 1.0)
        for g, p, m, v in tensors:
            g32, p32 = g.float(), p.float()
            if not self.adam_w_mode:
                g32 = g32 + decay * p32
            m.mul_(beta1).add_(g32, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
            update = (m / bc1) / ((v / bc2).sqrt() + eps)
            if self.adam_w_mode:
                update = update + decay * p32
            p.copy_(p32 - lr * update)

    def _grouped(self, group, new_state):
        """(per dtype in FusedAdam's order: [(grad, param, exp_avg, exp_avg_sq)]), the loop's last state."""
        lists, state = {torch.float16: [], torch.bfloat16: [], torch.float32: []}, None
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if len(state) == 0:
                state.update(new_state(group), exp_avg=torch.zeros_like(p.data), exp_avg_sq=torch.zeros_like(p.data))
            lists[p.dtype].append((p.grad, p.data, state["exp_avg"], state["exp_avg_sq"]))
        return lists, state

    def step(self, closure=None, grads=None, output_params=None, scale=None, grad_norms=None, grad_scaler=None):
        if any(x is not None for x in (grads, output_params, scale, grad_norms)):
            raise RuntimeError("FusedAdam has been updated: call step() with no arguments")
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if len(group["params"]) == 0:
                continue
            if "step" not in group:
                group["step"] = 0
            lists, state = self._grouped(group, lambda g: {"step": g.get("step", 0)})
            for tensors in lists.values():
                if tensors:
                    state["step"] += 1
                    self._multi_tensor_adam(group, tensors, state["step"])
        return loss


class ApexFusedAdamOnCPU(DeepSpeedFusedAdamOnCPU):
    """apex.optimizers.FusedAdam's step-count semantics: the count lives in the param group only
    (`group['step']`, 1 at the first step, +1 at every step; the per-tensor state holds just the moments).
    A FusedAdam subclass, so that DeepSpeed wraps it in FP16_Optimizer as it wraps apex's FusedAdam when
    apex is installed; its module name is apex's, which is how training/deepspeed_glue.py recognises it."""

    def step(self, closure=None, grads=None, output_params=None, scale=None, grad_norms=None, grad_scaler=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if len(group["params"]) == 0:
                continue
            group["step"] = group["step"] + 1 if "step" in group else 1
            lists, _ = self._grouped(group, lambda g: {})
            for tensors in lists.values():
                if tensors:
                    self._multi_tensor_adam(group, tensors, group["step"])
        return loss


ApexFusedAdamOnCPU.__module__ = "apex.optimizers.fused_adam"
STAND_INS = {"deepspeed": DeepSpeedFusedAdamOnCPU, "apex": ApexFusedAdamOnCPU}


def run_with(run_dir: str, *overrides: str, stand_in: str | None = None) -> dict:
    """In a pool worker: `run` (tests/conftest.py) with the optimizer replaced by a stand-in (None: as
    configured). Returns the losses, the classes of DeepSpeed's optimizer wrapper and of the torch
    optimizer inside it, and the latter's `fused` flag."""
    import model_parallel.kernels as kernels
    import training.engine as engine_module
    from training.deepspeed_glue import base_optimizer

    seen = {}
    build_engine, factory = engine_module.build_engine, kernels._optimizer_factory

    def capturing_build_engine(*args, **kwargs):
        built = build_engine(*args, **kwargs)
        base = base_optimizer(built.engine)
        seen.update(wrapper=type(built.engine.optimizer).__name__, optimizer=type(base).__name__,
                    fused=base.defaults.get("fused"), betas=base.defaults.get("betas"), eps=base.defaults.get("eps"))
        return built

    engine_module.build_engine = capturing_build_engine
    if stand_in:
        cls = STAND_INS[stand_in]
        kernels._optimizer_factory = lambda name: (lambda params, **kw: cls(params, adam_w_mode=True, **kw))
    try:
        return {"losses": run(run_dir, *overrides), **seen}
    finally:
        engine_module.build_engine, kernels._optimizer_factory = build_engine, factory


def saved_weights_off_the_bf16_grid(run_dir: str, tag: str) -> float:
    """In a pool worker: the fraction of a checkpoint's saved weights that no bf16 number equals."""
    from training.export import open_checkpoint, read_weights

    weights = read_weights(open_checkpoint(run_dir, tag))
    flat = torch.cat([w.flatten() for w in weights.values()])
    return (flat != flat.bfloat16().float()).float().mean().item()


def uninterrupted_and_resumed(pool2, tmp_path, *overrides, stand_in=None) -> tuple[dict, dict]:
    """The uninterrupted 6-step run, and a run resumed from its step-3 checkpoint (steps 4-6)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    first = pool2.run(run_with, str(full), *overrides, stand_in=stand_in)
    assert first[0]["losses"] == first[1]["losses"] and len(first[0]["losses"]) == STEPS
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / tag_for(SAVED_AT), resumed / "checkpoints" / tag_for(SAVED_AT))
    (resumed / "checkpoints" / "latest").write_text(tag_for(SAVED_AT) + "\n")
    second = pool2.run(run_with, str(resumed), *overrides, stand_in=stand_in)[0]
    assert len(second["losses"]) == STEPS - SAVED_AT
    return first[0], second


def optimizer_steps(run_dir, step: int) -> int:
    return json.loads((run_dir / "checkpoints" / tag_for(step) / "trainer_state.json").read_text())["optimizer_steps"]


# DeepSpeed's optimizer (wrapper) around a torch optimizer, by precision and ZeRO stage.
WRAPPERS = {("fp32", 0): "AdamW", ("fp32", 1): "DeepSpeedZeroOptimizer",
            ("bf16", 0): "FP16_UnfusedOptimizer", ("bf16", 1): "BF16_Optimizer"}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torch_fused_adamw_resumes_at_zero0_and_zero1_and_bf16_zero0_equals_zero1(pool2, tmp_path, precision):
    runs = {}
    for stage in (0, 1):
        full, resumed = uninterrupted_and_resumed(pool2, tmp_path / f"zero{stage}", "kernels.optimizer=torch_fused",
                                                  f"train.precision={precision}", f"parallel.zero_stage={stage}",
                                                  "train.adam_beta2=0.96", "train.adam_eps=1e-7")
        assert (full["optimizer"], full["fused"], full["wrapper"]) == ("AdamW", True, WRAPPERS[precision, stage])
        assert (full["betas"], full["eps"]) == ((0.9, 0.96), 1e-7)  # train.adam_* reach the optimizer
        assert resumed["losses"] == pytest.approx(full["losses"][SAVED_AT:], rel=1e-6, abs=1e-6), f"zero {stage}"
        assert optimizer_steps(tmp_path / f"zero{stage}" / "full", STEPS) == STEPS
        runs[stage] = full["losses"]
    # ZeRO-0 and ZeRO-1 take the same steps. In bf16 they differ only by bf16 rounding (ZeRO-0 accumulates
    # and all-reduces gradients in bf16, ZeRO-1 in fp32): <7e-4 over the first 4 steps here, after which the
    # bf16 weights' rounding lets the runs drift apart (4e-3 at step 6). DeepSpeed's bf16 ZeRO-0 wrapper used
    # to take an optimizer step on zero gradients when built (weight decay, and Adam's bias correction one
    # step ahead): losses 0.017-0.029 higher from step 2 on (training/deepspeed_glue.py, no_optimizer_steps).
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-5)
    compared = STEPS if precision == "fp32" else 4
    assert runs[0][:compared] == pytest.approx(runs[1][:compared], rel=0, abs=1e-5 if precision == "fp32" else 2e-3)


def test_deepspeed_fused_adam_flat_fp32_groups_resume_at_bf16_zero0(pool2, tmp_path):
    """bf16 ZeRO-0 with DeepSpeed's FusedAdam: FP16_Optimizer's flat fp32 master per param group, which
    the checkpoint must read and write (not the bf16 working weights)."""
    full, resumed = uninterrupted_and_resumed(pool2, tmp_path, "train.precision=bf16", "parallel.zero_stage=0",
                                              stand_in="deepspeed")
    assert (full["wrapper"], full["optimizer"]) == ("FP16_Optimizer", "DeepSpeedFusedAdamOnCPU")
    assert resumed["losses"] == pytest.approx(full["losses"][SAVED_AT:], rel=1e-6, abs=1e-6)
    assert all(x == x for x in full["losses"]) and full["losses"][-1] < full["losses"][0] - 0.3
    assert optimizer_steps(tmp_path / "full", SAVED_AT) == SAVED_AT
    # The saved weights are the fp32 masters: after 3 AdamW steps of ~lr, nearly none is a bf16 number.
    assert pool2.run(saved_weights_off_the_bf16_grid, str(tmp_path / "full"), tag_for(SAVED_AT))[0] > 0.9


def test_deepspeed_fused_adam_resumes_at_fp32_zero0(pool2, tmp_path):
    """fp32 ZeRO-0 with DeepSpeed's FusedAdam: the client optimizer updates each parameter, and only the
    last parameter's state of each group counts the steps (the others stay at 0)."""
    full, resumed = uninterrupted_and_resumed(pool2, tmp_path, "parallel.zero_stage=0", stand_in="deepspeed")
    assert (full["wrapper"], full["optimizer"]) == ("DeepSpeedFusedAdamOnCPU", "DeepSpeedFusedAdamOnCPU")
    assert resumed["losses"] == pytest.approx(full["losses"][SAVED_AT:], rel=1e-6, abs=1e-6)
    assert optimizer_steps(tmp_path / "full", SAVED_AT) == SAVED_AT


def test_apex_fused_adam_step_count_in_param_groups_is_restored(pool2, tmp_path):
    """apex's FusedAdam counts steps in its param groups: a resume must restore the count there, or
    Adam's bias correction restarts (the first update after the resume ~2x too large); and a checkpoint
    saved after a resume must record the count the groups have reached."""
    full, resumed = uninterrupted_and_resumed(pool2, tmp_path, "train.precision=bf16", "parallel.zero_stage=0",
                                              stand_in="apex")
    assert (full["wrapper"], full["optimizer"]) == ("FP16_Optimizer", "ApexFusedAdamOnCPU")
    assert resumed["losses"] == pytest.approx(full["losses"][SAVED_AT:], rel=1e-6, abs=1e-6)
    assert optimizer_steps(tmp_path / "full", SAVED_AT) == SAVED_AT
    assert optimizer_steps(tmp_path / "resumed", STEPS) == STEPS


def test_no_optimizer_steps_silences_the_step_and_gives_back_the_one_it_found():
    """Inside the block `step` does nothing; after it the optimizer's own step (its class's, or the instance
    attribute torch's LR scheduler wraps it in) is back."""
    from training.deepspeed_glue import no_optimizer_steps

    w = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([w], lr=1.0)
    w.grad = torch.ones(1)
    with no_optimizer_steps(optimizer):
        optimizer.step()
    assert w.item() == 1.0 and "step" not in vars(optimizer)
    optimizer.step()
    assert w.item() == 0.0
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    wrapped = vars(optimizer)["step"]
    with no_optimizer_steps(optimizer):
        optimizer.step()
    assert w.item() == 0.0 and vars(optimizer)["step"] is wrapped


def test_the_step_count_is_the_largest_held_and_is_restored_where_it_is_kept():
    """optimizer_step_count: the largest count in the state or the param groups (DeepSpeed's FusedAdam advances
    only one tensor's; apex's counts in the groups); set_optimizer_step_count sets every one, keeping a tensor
    count a tensor of its dtype, and adds none to a group that keeps none."""
    import types

    from training.deepspeed_glue import optimizer_step_count, set_optimizer_step_count

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([a, b])
    optimizer.state[a]["step"], optimizer.state[b]["step"] = torch.tensor(0.0), torch.tensor(4.0)
    engine = types.SimpleNamespace(optimizer=optimizer)
    assert optimizer_step_count(engine) == 4
    set_optimizer_step_count(engine, 9)
    assert all(torch.is_tensor(s["step"]) and s["step"].dtype == torch.float32 and s["step"].item() == 9
               for s in (optimizer.state[a], optimizer.state[b]))
    assert "step" not in optimizer.param_groups[0]
    optimizer.param_groups[0]["step"] = 11
    assert optimizer_step_count(engine) == 11
    set_optimizer_step_count(engine, 12)
    assert optimizer.param_groups[0]["step"] == 12 and optimizer.state[a]["step"].item() == 12


def test_apex_fused_adams_step_count_is_set_in_its_param_groups_before_its_first_step():
    """apex's FusedAdam (known by its module) keeps the count in each param group and makes it at its first step:
    set_optimizer_step_count adds it to a group that has none yet (a resume before any step), as a plain int;
    its per-tensor state, which holds no count, gets none."""
    import types

    from training.deepspeed_glue import optimizer_step_count, set_optimizer_step_count

    p = torch.nn.Parameter(torch.zeros(2))
    apex = type("FusedAdam", (torch.optim.SGD,), {"__module__": "apex.optimizers.fused_adam"})([p], lr=0.1)
    apex.state[p]["exp_avg"] = torch.zeros(2)
    engine = types.SimpleNamespace(optimizer=types.SimpleNamespace(optimizer=apex))  # (behind a wrapper)
    set_optimizer_step_count(engine, 7)
    assert apex.param_groups[0]["step"] == 7 and "step" not in apex.state[p]
    assert optimizer_step_count(engine) == 7
