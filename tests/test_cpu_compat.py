"""The CPU compatibility layer for megatron-core: needed, effective, and only applied without a GPU."""
from __future__ import annotations

import pytest
import torch

from model_parallel import cpu_compat


def test_megatron_rng_tracker_needs_cuda_without_the_patch():
    """Why the patch exists: megatron's own tracker calls torch.cuda.get_rng_state."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: megatron's CUDA tracker works as is")
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    with pytest.raises((RuntimeError, AssertionError, AttributeError)):
        CudaRNGStatesTracker().add("x", 1)


def test_not_applied_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_APPLIED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    sentinel = torch.cuda.current_device
    assert cpu_compat.apply_cpu_compat() is False
    assert torch.cuda.current_device is sentinel and not cpu_compat.is_applied()


def test_tracker_streams(single_process):
    """After the patch: named streams differ from the default one, fork restores the default,
    and the megatron tracker is the CPU one."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from model_parallel.state import seed_everything

    assert cpu_compat.is_applied() == (not torch.cuda.is_available())
    if torch.cuda.is_available():
        pytest.skip("GPU: megatron's CUDA tracker is used")
    assert isinstance(get_cuda_rng_tracker(), cpu_compat.CPURNGStatesTracker)
    seed_everything(3)
    tracker = get_cuda_rng_tracker()
    default_next = torch.rand(4, generator=torch.Generator().manual_seed(3))
    with tracker.fork():
        forked = torch.rand(4)
    assert torch.equal(torch.rand(4), default_next)  # the default stream did not move
    assert not torch.equal(forked, default_next)
    with tracker.fork():
        assert not torch.equal(torch.rand(4), forked)  # the named stream advanced
    seed_everything(3)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), forked)  # reseeding reproduces it
    assert torch.cuda.current_device() == "cpu"


def per_rank_dropout_masks():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from model_parallel.state import init_parallel, seed_everything

    init_parallel(tp=2)
    seed_everything(9)
    with get_cuda_rng_tracker().fork():
        tp_stream = torch.nn.functional.dropout(torch.ones(64), 0.5)
    default = torch.nn.functional.dropout(torch.ones(64), 0.5)
    return tp_stream, default


def test_model_parallel_stream_differs_per_tp_rank(pool2):
    (tp0, default0), (tp1, default1) = pool2.run(per_rank_dropout_masks)
    assert not torch.equal(tp0, tp1)          # split heads get independent dropout
    assert torch.equal(default0, default1)    # replicated activations get the same dropout


def test_cpu_tracker_refuses_what_megatrons_refuses():
    """CPURNGStatesTracker keeps megatron's tracker's rules: a seed or a name added twice and a fork of a stream
    never added are errors (a repeated seed would give two streams the same masks); set_states initialises it."""
    tracker = cpu_compat.CPURNGStatesTracker()
    assert not tracker.is_initialized()
    tracker.add("a", 1)
    assert tracker.is_initialized()
    with pytest.raises(Exception, match="seed 1 already exists"):
        tracker.add("b", 1)
    with pytest.raises(Exception, match="rng state a already exists"):
        tracker.add("a", 2)
    with pytest.raises(Exception, match="rng state b is not added"):
        with tracker.fork("b"):
            pass
    fresh = cpu_compat.CPURNGStatesTracker()
    fresh.set_states(tracker.get_states())
    assert fresh.is_initialized() and torch.equal(fresh.get_states()["a"], tracker.get_states()["a"])


def test_forced_on_a_gpu_machine_and_applied_once(monkeypatch):
    """apply_cpu_compat(force=True) patches even where CUDA is available (the CUDA calls, megatron's tracker);
    a second call changes nothing (the tracker, with its streams, stays the same object)."""
    from megatron.core.tensor_parallel import random as mrandom

    for name in ("current_device", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, getattr(torch.cuda, name))  # (restored after the test)
    for name in ("_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED"):
        monkeypatch.setattr(mrandom, name, getattr(mrandom, name))
    monkeypatch.setattr(cpu_compat, "_APPLIED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.apply_cpu_compat(force=True) and cpu_compat.is_applied()
    assert torch.cuda.current_device() == "cpu" and torch.cuda.synchronize() is None
    tracker = mrandom.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_compat.CPURNGStatesTracker) and mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED
    assert cpu_compat.apply_cpu_compat() and mrandom.get_cuda_rng_tracker() is tracker
