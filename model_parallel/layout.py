"""The parallel layout of a run: how many ways the model is split, and every rule a layout must obey.

    layout = ParallelLayout.of(cfg.parallel, world_size=8).check(cfg.model, micro_batch=4, global_batch=64)
    init_parallel(layout.tp, layout.pp)        # model_parallel/state.py: megatron-core's process groups
    model = PartiModel(cfg.model, kernels, tp_group=layout.tp_group(), sequence_parallel=layout.sequence_parallel)

`ParallelConfig` is the `parallel:` section a user writes; `ParallelLayout` is what a run is built with
(torchtitan's ParallelDims plays this part there): tp x pp x dp = world size, the ZeRO stage and sequence
parallelism, validated once here and passed to the model, the engine, the checkpoint and the planner.
Rank order (megatron-core's, which DeepSpeed's topology follows too): TP fastest, then DP, then PP.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.config import ConfigError, require

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass
class ParallelConfig:
    """How the model is split over processes."""

    tp: int = 1
    """Tensor-parallel size (megatron-core): heads and MLP columns split over this many ranks."""
    pp: int = 1
    """Pipeline-parallel stages."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (only 0 or 1 with pp > 1)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: norms and dropout on sequence shards (needs tp > 1, pp = 1, ZeRO 0)."""
    activation_checkpointing: str = "none"
    """Activation recomputation: none | selective (attention core) | full (whole layers)."""
    zero_overlap_comm: bool | None = None
    """ZeRO 2/3 and fp32 ZeRO-1: reduce gradients (ZeRO-3: also gather parameters) in the background while backward
    runs (DeepSpeed's overlap_comm; null: DeepSpeed's default, on at ZeRO-3 only). Not for bf16 ZeRO-1, whose
    gradients DeepSpeed's BF16_Optimizer reduces after backward, nor ZeRO-0. The values are those of any setting."""
    zero_bucket_size: int = 500_000_000
    """ZeRO 1-3: elements per gradient reduction and per parameter all-gather (DeepSpeed's reduce_bucket_size and
    allgather_bucket_size, its default 5e8): larger, fewer and more efficient collectives; smaller, less memory
    held in buckets (with zero_overlap_comm several are held at once: gigabytes at the default)."""
    zero3_prefetch_size: int = 50_000_000
    """ZeRO-3: elements of the next modules' parameters gathered ahead of their use (stage3_prefetch_bucket_size)."""
    zero3_persistence_threshold: int = 100_000
    """ZeRO-3: parameters of fewer elements (biases, norms) stay gathered whole on every rank between steps
    (stage3_param_persistence_threshold): fewer small all-gathers, at their memory on every rank."""


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @classmethod
    def of(cls, parallel: ParallelConfig, world_size: int | None = None) -> "ParallelLayout":
        """The layout `parallel` asks for on `world_size` processes (None: as many as one model replica
        needs, dp = 1), checked against the rules that need no model."""
        p = parallel
        require(p.activation_checkpointing in RECOMPUTE_MODES, f"parallel.activation_checkpointing="
                f"{p.activation_checkpointing!r} must be one of {', '.join(RECOMPUTE_MODES)}")
        for name in ("tp", "pp", "zero_bucket_size", "zero3_prefetch_size"):
            require(getattr(p, name) >= 1, f"parallel.{name}={getattr(p, name)} must be >= 1")
        require(p.zero3_persistence_threshold >= 0,
                f"parallel.zero3_persistence_threshold={p.zero3_persistence_threshold} must be >= 0")
        require(p.zero_overlap_comm is None or p.zero_stage >= 1, "parallel.zero_overlap_comm applies to ZeRO 1-3 "
                f"(DeepSpeed's reduction at ZeRO-0 does not overlap backward); got parallel.zero_stage={p.zero_stage}")
        if world_size is not None:
            require(world_size % (p.tp * p.pp) == 0,
                    f"world size {world_size} must be divisible by parallel.tp x parallel.pp = {p.tp * p.pp}")
        dp = world_size // (p.tp * p.pp) if world_size is not None else 1
        return cls(p.tp, p.pp, dp, p.zero_stage, p.sequence_parallel).check()

    def check(self, model=None, micro_batch: int | None = None, global_batch: int | None = None) -> "ParallelLayout":
        """Raise ConfigError naming the fields for the first rule this layout breaks, alone or with the
        model (a ModelConfig) and the batch sizes when given; returns the layout."""
        tp, pp = self.tp, self.pp
        require(self.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        require(pp == 1 or self.zero_stage <= 1,
                f"parallel.zero_stage={self.zero_stage} needs parallel.pp=1 (DeepSpeed allows only ZeRO-0/1 "
                f"with pipeline parallelism; got parallel.pp={pp})")
        if self.sequence_parallel:
            require(tp > 1, "parallel.sequence_parallel=true needs parallel.tp > 1")
            # Its norm and bias gradients are summed over the TP group between backward and step
            # (training/engine.py). DeepSpeed's ZeRO-1/2 take the gradients over inside engine.backward()
            # (stage_1_and_2.py reduces them into its fp32 partitions), before that sum: the losses then drift
            # from TP=1 (4.0132 vs 4.0208 at step 2 of the debug model), so those stages are refused.
            require(pp == 1 and self.zero_stage == 0,
                    "parallel.sequence_parallel=true works with parallel.pp=1 and parallel.zero_stage=0 only (its "
                    "norm gradients are summed over the TP group after backward, when ZeRO has already taken them)")
        if model is not None:
            self._check_model(model)
        if micro_batch is not None and global_batch is not None:
            require(global_batch % (micro_batch * self.dp) == 0,
                    f"global batch {global_batch} is not a multiple of micro-batch {micro_batch} x DP {self.dp} = "
                    f"{micro_batch * self.dp} (train.global_batch_size must be divisible by "
                    f"train.micro_batch_size x data-parallel size = {micro_batch} x {self.dp})")
        return self

    def _check_model(self, m) -> None:
        tp = self.tp
        for name, why in (("num_heads", ""), ("ffn_hidden_size", ""),
                          ("image_vocab_size", " (the output head is split over the vocabulary)"),
                          ("vocab_pad_multiple", "")):
            require(getattr(m, name) % tp == 0, f"model.{name}={getattr(m, name)} must be divisible by "
                                                f"parallel.tp={tp}{why}")
        if m.decoder_only and m.text_loss_weight > 0:
            require(m.text_vocab_size % tp == 0, f"model.text_vocab_size={m.text_vocab_size} must be divisible by "
                    f"parallel.tp={tp} with model.text_loss_weight > 0 (the text head is split over the vocabulary)")
        require(m.decoder_layers % self.pp == 0,
                f"model.decoder_layers={m.decoder_layers} must be divisible by parallel.pp={self.pp} "
                "(decoder layers are balanced over pipeline stages)")
        if self.sequence_parallel:  # (each sequence a layer sees is split over the TP ranks)
            lengths = ((("text_seq_len + image_seq_len (the stream)", m.stream_len),) if m.decoder_only else
                       (("text_seq_len", m.text_seq_len), ("image_seq_len (image_grid**2)", m.image_seq_len)))
            for name, n in lengths:
                require(n % tp == 0, f"model.{name}={n} must be divisible by parallel.tp={tp} "
                                     "with sequence parallelism")

    def fits(self, model=None, micro_batch: int | None = None, global_batch: int | None = None) -> str | None:
        """None when `check` passes, else why not (the planner's reason for refusing a layout)."""
        try:
            self.check(model, micro_batch, global_batch)
        except ConfigError as e:
            return str(e)
        return None

    def record(self) -> dict:
        """What a checkpoint notes of the layout it was saved at (its RNG states reload only on the same)."""
        return {"world_size": self.world_size, "tp": self.tp, "pp": self.pp}

    def tp_group(self):
        """megatron-core's tensor-parallel group of this rank (after `init_parallel`): the one place the
        model's TP group is read from megatron's globals; the model and its layers get it passed in."""
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_group()

    def describe(self) -> str:
        return (f"world {self.world_size} = tp {self.tp} x pp {self.pp} x dp {self.dp}; zero {self.zero_stage}"
                + ("; sequence parallel" if self.sequence_parallel else ""))
