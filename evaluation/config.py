"""Typed configuration of an evaluation run (`python -m evaluation.benchmark`), read from YAML with dotted
overrides by the same rules as the training config (configs/eval/*.yaml).

    cfg = load_eval_config("configs/eval/partiprompts.yaml", ["model.checkpoint=runs/x/export", "benchmark.limit=64"])
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from common.config import ConfigError, load_typed
from evaluation.sampling import SamplingConfig, check_counts

BENCHMARKS = ("partiprompts", "coco30k", "prompts")


@dataclass
class ModelPaths:
    """The model being evaluated."""

    checkpoint: str = ""
    """An export folder of the Parti model (python -m training.export)."""
    vq: str = ""
    """The frozen image tokenizer file (vq.train's export)."""
    text_tokenizer: str = ""
    """The SentencePiece model the captions were tokenized with."""
    upsampler: str = ""
    """Optional: an sr.train export.pt (Parti's last stage); images are then also written upsampled into
    <out>/images_upsampled/ ('' = none)."""


@dataclass
class SamplingSettings(SamplingConfig):
    """How images are sampled: each code (SamplingConfig's keys) and each prompt's images."""

    guidance_scale: float | None = 1.2
    """Classifier-free guidance scale (null: unguided; Parti used 1.2 with reranking)."""
    samples_per_prompt: int = 1
    """Images sampled per prompt."""
    keep: int = 0
    """Keep the best N samples per prompt by CLIP score (0: all; needs clip.model)."""
    seed: int = 0
    """Seeds depend on (seed, prompt index, sample index) only."""
    batch_size: int = 0
    """Images decoded together per process (0: 8 on a CPU; on a GPU as many as their KV caches fit in half its
    free memory, at most 64: evaluation.sampling.auto_batch_size)."""
    compile_decode: bool = False
    """The decode step through inductor (the static KV cache's step; on a GPU before its CUDA graphs are
    captured): fewer, fused kernels per step, one compilation per attended prefix length and batch shape
    (evaluation/sampling.py). Off by default until a GPU has measured it (bench/gpu_check.py decode_compiled)."""

    def per_code(self) -> SamplingConfig:
        """The settings that choose each code (what `sample` takes and generation.json records)."""
        return SamplingConfig(**{f.name: getattr(self, f.name) for f in fields(SamplingConfig)})


@dataclass
class ClipSettings:
    """The CLIP model for the CLIP score and reranking (open_clip; weights from a local file)."""

    model: str = ""
    """local-dir:FOLDER (recommended: its open_clip_config.json carries the weights' preprocessing and
    activation) or an open_clip architecture (ViT-L-14); empty: no CLIP score."""
    weights: str = ""
    """An open_clip checkpoint file for an architecture name ('random': untrained, smoke tests only)."""
    tag: str = ""
    """The open_clip pretrained tag clip.weights was published under (openai, laion2b_s32b_b82k, ...): its
    mean/std and QuickGELU are taken from open_clip's table. Empty: the architecture's defaults (OpenAI
    mean/std, the architecture's activation; a warning), wrong for weights trained otherwise."""


@dataclass
class BenchmarkSettings:
    """What is evaluated and where the results go."""

    name: str = "partiprompts"
    """partiprompts (CLIP score per category/challenge), coco30k (FID and CLIP score) or prompts (images only)."""
    prompts: str = "shared:PartiPrompts.tsv"
    """Prompt file (TSV/CSV/COCO captions .json/JSONL/text); 'shared:NAME' reads the shipped reference data."""
    real: str = ""
    """coco30k: the folder of real images for FID."""
    real_center_crop: bool = True
    """coco30k: centre-crop each real image to a square and resize it to the generated images' size before
    FID's 299x299 resize, as the training images were (Parti: 30k real images at 256x256); false: the whole
    photo stretched to 299x299, a distortion the generated squares do not have (a higher FID). Recorded in
    the FID protocol and the real statistics' cache key."""
    limit: int = 0
    """Only the first N prompts (0: all)."""
    out: str = "eval"
    """Output folder: images/, results.json, report.html."""
    grid_prompts: int = 8
    """Prompts shown per category (or in total) in the report's grids."""
    device: str = "auto"
    """auto | cuda | cpu: cuda makes a missing GPU an error instead of hours of generation on the CPU (the
    generation record keeps the device, so a folder begun on the CPU would not resume on the GPU); cpu hides
    the GPUs."""
    resolution: str = "base"
    """base (the detokenizer's images) | upsampled (after model.upsampler): the images CLIP score, FID and the
    report's grids are computed on; results.json records which, and their size in pixels."""


@dataclass
class EvalConfig:
    model: ModelPaths = field(default_factory=ModelPaths)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    clip: ClipSettings = field(default_factory=ClipSettings)
    benchmark: BenchmarkSettings = field(default_factory=BenchmarkSettings)

    def validate(self) -> EvalConfig:
        missing = [f"model.{k}" for k, v in vars(self.model).items() if not v and k != "upsampler"]
        if missing:
            raise ConfigError(f"{', '.join(missing)} must be set (paths of the model to evaluate)")
        if self.benchmark.name not in BENCHMARKS:
            raise ConfigError(f"benchmark.name={self.benchmark.name!r} must be one of {', '.join(BENCHMARKS)}")
        if self.benchmark.resolution not in ("base", "upsampled"):
            raise ConfigError(f"benchmark.resolution={self.benchmark.resolution!r} must be base or upsampled")
        if self.benchmark.resolution == "upsampled" and not self.model.upsampler:
            raise ConfigError("benchmark.resolution=upsampled needs model.upsampler (an sr.train export.pt)")
        if self.benchmark.name == "coco30k" and not self.benchmark.real:
            raise ConfigError("benchmark.real must name a folder of real images for coco30k (FID)")
        if self.sampling.keep and not self.clip.model:
            raise ConfigError("sampling.keep ranks samples by CLIP score: set clip.model (and clip.weights)")
        if (self.clip.weights or self.clip.tag) and not self.clip.model:  # (they were ignored: no CLIP score)
            raise ConfigError(f"clip.weights={self.clip.weights!r} clip.tag={self.clip.tag!r} without clip.model: set "
                              "clip.model (the open_clip architecture of the weights, e.g. ViT-L-14), or drop them")
        if self.clip.tag and (not self.clip.weights or self.clip.weights == "random"
                              or self.clip.model.startswith("local-dir:")):
            raise ConfigError(f"clip.tag={self.clip.tag!r} names the open_clip pretrained weights of a checkpoint "
                              "file: it needs clip.model=ARCHITECTURE and clip.weights=FILE (a local-dir: carries "
                              "its own preprocessing)")
        if not 0 <= self.sampling.seed < 2**32:  # (evaluation.generate.MAX_SEED says why)
            raise ConfigError(f"sampling.seed={self.sampling.seed} must be in [0, 2**32)")
        if self.benchmark.grid_prompts < 1:
            raise ConfigError(f"benchmark.grid_prompts={self.benchmark.grid_prompts} must be >= 1 (prompts shown in "
                              "each sample grid of the report)")
        if self.benchmark.limit < 0:
            raise ConfigError(f"benchmark.limit={self.benchmark.limit} must be >= 0 (0: every prompt)")
        try:
            check_counts(self.sampling.samples_per_prompt, self.sampling.batch_size, self.sampling.keep)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self


def load_eval_config(path: str | None, overrides: list[str] | None = None) -> EvalConfig:
    return load_typed(EvalConfig, path, overrides).validate()
