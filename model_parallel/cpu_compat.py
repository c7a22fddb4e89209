"""Make megatron-core 0.16 run on CPU (gloo) when no GPU is present.

megatron-core's tensor-parallel layers work on CPU except for a handful of CUDA calls (found by running
them under gloo; tests/test_cpu_compat.py exercises each): `torch.cuda.current_device()` used to place buffers
(gather_output, sequence-parallel gathers, the global memory buffer), `torch.cuda.synchronize()`,
and the RNG tracker that keeps separate dropout streams for tensor-parallel regions through
`torch.cuda.get_rng_state`. No upstream option turns these off, so this module patches them,
only when CUDA is not available, and is tested itself (tests/test_cpu_compat.py).

    from model_parallel.cpu_compat import apply_cpu_compat
    apply_cpu_compat()      # no-op on a machine with a GPU
"""
from __future__ import annotations

import contextlib

import torch

_APPLIED = False


class CPURNGStatesTracker:
    """megatron-core's CudaRNGStatesTracker with the named streams kept as CPU generator states.

    `fork(name)` swaps the default CPU generator's state for the named one and back, which is what
    the CUDA tracker does with the CUDA generator; dropout inside `fork()` then draws from the named
    stream (different per tensor-parallel rank for the model-parallel stream).
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def apply_cpu_compat(force: bool = False) -> bool:
    """Patch the CUDA calls megatron-core makes so that it runs on CPU. Returns True if applied.

    Applied only when CUDA is unavailable (or `force`), once per process.
    """
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    from megatron.core.tensor_parallel import random as mrandom

    # Buffers are placed on torch.cuda.current_device(); "cpu" is a valid device for torch.empty.
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    # Replace the tracker object that get_cuda_rng_tracker() returns; mark it initialised so
    # megatron does not build a CUDA one over it.
    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _APPLIED = True
    return True


def is_applied() -> bool:
    return _APPLIED
