r"""Generate images for a prompt file with an exported Parti model and a frozen VQ tokenizer.

    python -m evaluation.generate --checkpoint runs/x/export --vq runs/vq/export.pt --text-tokenizer tok/spm.model \
        --prompts ../shared/data/PartiPrompts.tsv --out samples/ [--samples-per-prompt 4] [--guidance-scale 1.2] \
        [--temperature 1.0 --top-k 0 --top-p 1.0] [--seed 0] [--batch-size 0] [--limit N] \
        [--clip ViT-L-14 --clip-weights clip.pt --keep 1] [--upsampler runs/sr/export.pt] [--compile-decode]
    torchrun --nproc_per_node 8 -m evaluation.generate ...      # each process takes every 8th prompt

For prompt i it writes `{i:05d}_{r}.png` for its samples, then `{i:05d}.json` (the prompt and its other
columns, seed, settings, files); a rerun skips prompts whose .json exists. What the images depend on is
recorded in `generation.json` and in every prompt's .json: the checkpoint (its resolved path, the export's
checkpoint tag, size and mtime of model.safetensors), the content hashes of the VQ and text tokenizers,
seed, sampling settings, samples per prompt, CLIP reranking and --keep, device, dtype and the decoder (a GPU's
CUDA graphs, or the growing KV cache; --compile-decode). A rerun into the same --out with any of these changed,
or with other prompts at the same indices, is refused (the differing settings are named): it would mix two
configurations' images. Give such a run a new --out.

Seeds depend on (seed, i, k) only (numpy's SeedSequence of the three; folders begun under the earlier affine
seeds are refused, as "seeding" changed), so the images do not depend on the number of processes or the batch
size (on a GPU up to bf16 rounding: its matmul kernels are chosen by the batch's shape). On a GPU the model runs
in bf16, decodes through CUDA graphs of its static KV cache and draws from CUDA generators (the same seeds give
other images than on CPU). --batch-size 0 (the default) decodes 8 images at a time on a CPU, and on a GPU as many
as their caches fit in half its free memory, at most 64 (evaluation.sampling.auto_batch_size). With a CLIP model
the samples are reranked by CLIP score (r = 0 is the best; their scores go into the .json) and `--keep N` keeps
only the best N. At the end rank 0 gathers the .json files of this run's prompts (those below --limit) into
metadata.jsonl.

The VQ tokenizer may have fewer codes than the model's image vocabulary (only its codes are drawn); a text
tokenizer with more tokens than the model's text vocabulary, another VQ grid, or more VQ codes are refused.
Guidance on a model trained without caption dropout (model.caption_drop_prob=0) is allowed with a warning:
its null caption was never learned. --guidance-scale 1 samples as no guidance does.

With `--upsampler` (an sr.train export: Parti's last stage) every kept image is also upsampled and written
with the same name into the sibling folder `<out>_upsampled/` (e.g. 256 px in samples/, 1024 px in
samples_upsampled/, each a flat folder that evaluation.fid and evaluation.clip_score read as they are, with its
own metadata.jsonl); reranking scores the images before upsampling. The upsampler's identity goes into the
record like the checkpoint's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.cli import add_dataclass_args, command, dataclass_from_args, description
from common.files import atomic_path, write_atomic
from data_pipeline.code_shards import other_tokenizers
from data_pipeline.text_tokenizer import TextTokenizer
from evaluation.clip_score import ClipScorer, add_clip_args, check_clip
from evaluation.prompts import read_prompts
from evaluation.sampling import SamplingConfig, StaticSteps, auto_batch_size, check_counts, sample
from model_parallel.state import DeviceError, init_distributed, use_device
from sr.model import load_upsampler, upsample
from training.export import exported_data_tokenizers, exported_model_config, load_exported, read_export_config
from vq.tokenizer import load_image_tokenizer


def to_pil(image: torch.Tensor):
    """float [3, H, W] in [-1, 1] -> the uint8 PIL image that is saved (and scored)."""
    from PIL import Image

    return Image.fromarray(((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())


def save_png(image, path: Path) -> None:
    """Written atomically and flushed to the disk before the rename: the prompt's .json, written after its
    images, marks them done, so a crash must not leave it beside an empty PNG."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # (a .tmp.png name: FID and reruns skip it)
        image.save(f, format="PNG")
        f.flush()
        os.fsync(f.fileno())


def upsampled_folder(out: Path) -> Path:
    """Where the upsampled images of an output folder go (--upsampler): its sibling `<name>_upsampled`."""
    out = Path(out).resolve()  # (--out . has no name to add to)
    return out.with_name(out.name + "_upsampled")


def finish_prompt(i: int, prompt: dict, images: list[torch.Tensor], out: Path, settings: dict, scorer=None,
                  keep: int = 0, upsampler=None) -> None:
    """Write prompt i's samples (float [3, H, W] in [-1, 1]; best CLIP score first when a scorer is given, the
    best `keep` of them when keep > 0; with an upsampler also upsampled into upsampled_folder(out)) and then its .json,
    which marks the prompt done."""
    pictures = [to_pil(image) for image in images]
    order, scores = list(range(len(images))), None
    if scorer is not None:
        scores = scorer.score(pictures, [prompt["prompt"]] * len(images)).tolist()
        order.sort(key=lambda k: -scores[k])
    order = order[:keep or None]
    if upsampler is not None:
        device = next(upsampler.parameters()).device
        large = upsample(upsampler, torch.stack([images[k] for k in order]).to(device, torch.float32))
        upsampled_folder(out).mkdir(exist_ok=True)
        for r, image in enumerate(large):
            save_png(to_pil(image), upsampled_folder(out) / f"{i:05d}_{r}.png")
    for r, k in enumerate(order):
        save_png(pictures[k], out / f"{i:05d}_{r}.png")
    meta = {**prompt, "index": i, **settings, "files": [f"{i:05d}_{r}.png" for r in range(len(order))],
            "sample_index": order}
    if scores is not None:
        meta.update(clip_scores=[scores[k] for k in order], all_clip_scores=scores, clip=scorer.protocol["weights"])
    write_atomic(out / f"{i:05d}.json", json.dumps(meta))  # its presence marks the prompt done


WAIT_FOR_PEERS_MINUTES = 48 * 60
"""Process-group timeout of generation (this command and evaluation.benchmark): their one collective is the
barrier after generating, where a rank waits as long as any other still generates (ranks with fewer prompts
left, as in a rerun that finds one rank's share written, finish hours early); training's 30 minutes would end
such a job in NCCL's watchdog. A rank that dies still ends the job at once (torchrun, srun stop the others)."""

RECORD = "generation.json"
_MISSING = "(not recorded)"
SEEDING = "SeedSequence([seed, prompt, sample])"
"""How each image's seed is made (recorded: folders begun under the earlier affine seeds do not resume)."""


RERANK_KEYS = ("weights_sha256", "model", "tag", "preprocess", "quick_gelu")
"""What of the reranking scorer's protocol (evaluation.clip_score) the images depend on, besides its weights path."""
MAX_SEED = 2**32
"""--seed / sampling.seed below it: SeedSequence splits larger numbers into 32-bit words, and seed a * 2**32 + b,
prompt p, sample 0 would draw as seed b, prompt a, sample p."""


def image_seed(seed: int, prompt: int, sample: int) -> int:
    """The seed of sample `sample` of prompt `prompt`: numpy's SeedSequence hash of the three (distinct for every
    triple in practice). The earlier seed*1_000_003 + prompt*1_009 + sample repeated itself across prompts
    from 1,010 samples per prompt on, and across --seed values (seed 1 = seed 0's prompt 991, sample 84)."""
    return int(np.random.SeedSequence([seed, prompt, sample]).generate_state(1, np.uint64)[0])


def generation_record(model, vq, text_tok, cfg: SamplingConfig, samples_per_prompt: int, seed: int,
                      scorer=None, keep: int = 0, upsampler=None, decoding: str = "kv_cache") -> dict:
    """Everything the images of an output folder depend on (batch size and process count do not).
    The checkpoint's identity is the one load_for_sampling attached (None for a model built in-process);
    `decoding`: decoding_mode's name (in bf16 another decoder's kernels can tip a near-tie to another code)."""
    weight = next(model.parameters())
    record = {"checkpoint": getattr(model, "export_identity", None),
              "vq": getattr(vq, "weights_hash", getattr(vq, "content_hash", None)),  # (decoded images: all weights)
              "text_tokenizer": getattr(text_tok, "content_hash", None),
              "seed": seed, "seeding": SEEDING, "sampling": asdict(cfg), "samples_per_prompt": samples_per_prompt,
              "keep": keep,
              # (the scorer's weights and how they are run: a rerun with another --clip-tag changed the
              # activation and normalisation, and resumed)
              "rerank": None if scorer is None else {"clip": scorer.protocol.get("weights"),
                                                     **{k: scorer.protocol.get(k) for k in RERANK_KEYS}},
              "upsampler": None if upsampler is None else getattr(upsampler, "export_identity", "in-process"),
              "device": weight.device.type, "dtype": str(weight.dtype).removeprefix("torch."), "decoding": decoding}
    return json.loads(json.dumps(record))  # as it reads back from a file (tuples as lists)


def _differences(old, new, name: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in dict.fromkeys([*old, *new])
                for d in _differences(old.get(k, _MISSING), new.get(k, _MISSING), f"{name}.{k}" if name else k)]
    return [] if old == new else [f"{name}: {old!r} then, {new!r} now"]


def _with_decoding(record: dict) -> dict:
    """A record written before the decoding mode was recorded: those images came from the growing KV cache (the
    CUDA-graph decoding of the commits just before the record had it, e10281b..bcb955d, never ran on a GPU)."""
    return {"decoding": "kv_cache", **record}


def decoding_mode(device: torch.device, compile_decode: bool) -> tuple[str, dict]:
    """How generate decodes on `device`, as recorded, and sample()'s arguments for it: a GPU's CUDA graphs
    (evaluation/sampling.py: parti-350m on an H200 decoded 9x the image tokens/s of the growing cache, whose
    every step waits on the host), else the growing KV cache; with `compile_decode` the static cache's step
    through inductor."""
    graphs = device.type == "cuda"
    name = "cuda_graph" if graphs else "static_cache" if compile_decode else "kv_cache"
    return name + ("+inductor" if compile_decode else ""), {
        "cuda_graph": graphs, "static_cache": compile_decode, "compiled": "inductor" if compile_decode else None}


def read_record(path: Path) -> dict:
    """A record (generation.json, a prompt's .json) as a dict; ValueError naming it when it is damaged."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        record = f"{type(e).__name__}: {e}"
    if not isinstance(record, dict):
        raise ValueError(f"{path}: a damaged record ({record if isinstance(record, str) else 'not a JSON object'}); "
                         "delete it, and the images it describes, to have them generated again")
    return record


def check_out_folder(out: str | Path, name: str) -> None:
    """ValueError when the output folder `name` names an existing file (it would fail at mkdir, after loading)."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"{name} {out}: a file, not a folder; expected the output folder (new, or an earlier "
                         "run's to resume)")


def check_resumable(out: Path, record: dict, prompts: list[dict], rank: int = 0, world: int = 1) -> None:
    """Refuse to add images to a folder made with other settings (ValueError naming them): the folder's
    record, and for each rank's finished prompts their own record and prompt text (each rank reads its own
    prompts' files; all refuse together: a rank whose prompts matched went on writing while another refused,
    and left a folder that no prompt file could resume)."""
    problems: list[str] = []
    if (out / RECORD).is_file():
        problems += _differences(_with_decoding(read_record(out / RECORD)), record)
    for i in range(rank, len(prompts), world):
        done = out / f"{i:05d}.json"
        if problems or not done.is_file():
            continue
        meta = _with_decoding(read_record(done))
        problems += _differences({k: meta.get(k, _MISSING) for k in record}, record)
        if meta.get("prompt") != prompts[i]["prompt"]:
            problems.append(f"prompt {i}: {meta.get('prompt')!r} then, {prompts[i]['prompt']!r} now")
    problems = every_ranks(problems, world)
    if problems:
        raise ValueError(f"{out} holds images made with other settings, which a resumed run would mix with "
                         f"new ones: {'; '.join(problems[:6])}{'; ...' if len(problems) > 6 else ''}. "
                         "Give this run a new --out (or delete the folder to start it over)")


def every_ranks(problems: list[str], world: int) -> list[str]:
    """The problems every rank found, in rank order, each once (this rank's alone outside a process group of
    `world` ranks)."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized() or dist.get_world_size() != world:
        return problems
    gathered: list = [None] * world
    dist.all_gather_object(gathered, problems)
    return list(dict.fromkeys(p for found in gathered for p in found))


def remove_unfinished(out: Path, todo: list[int]) -> None:
    """The temporary files (common.files.temporary_name: .NAME.host.pid.token.tmp.EXT) that a killed run left of
    the prompts this rank is about to make: no one else writes those prompts, and a half-written PNG left in the
    folder is read by whatever globs it for images."""
    mine = set(todo)
    for folder in (out, upsampled_folder(out)):
        for tmp in folder.glob(".*.tmp.*") if folder.is_dir() else ():
            prompt = tmp.name[1:].split(".", 1)[0].split("_", 1)[0]
            if prompt.isdigit() and int(prompt) in mine:
                tmp.unlink(missing_ok=True)


def generate(model, vq, text_tok, prompts: list[dict], out: Path, cfg: SamplingConfig, samples_per_prompt: int = 1,
             seed: int = 0, batch_size: int = 0, rank: int = 0, world: int = 1, scorer=None, keep: int = 0,
             upsampler=None, compile_decode: bool = False) -> int:
    """Images for this rank's prompts that are not done yet; returns how many prompts it generated.
    With a CLIP scorer the samples of each prompt are reranked; keep > 0 keeps only the best ones; with an
    upsampler (sr.model) the kept images are also written upsampled into upsampled_folder(out).
    A folder holding images made with other settings is refused (check_resumable) before anything is written.
    `compile_decode`: the decode step through inductor (evaluation.sampling's static step; SamplingSettings)."""
    out = Path(out)
    check_counts(samples_per_prompt, batch_size, keep)
    check_fits(model.cfg, vq, text_tok)
    if rank == 0:
        warn_untrained_guidance(model.cfg, cfg)
    device = next(model.parameters()).device
    decoding, decode_args = decoding_mode(device, compile_decode)
    settings = generation_record(model, vq, text_tok, cfg, samples_per_prompt, seed, scorer, keep, upsampler,
                                 decoding)
    check_resumable(out, settings, prompts, rank, world)
    batch_size = batch_size or auto_batch_size(model, cfg.guided)
    if rank == 0:
        log.info(f"decoding {batch_size} images at a time ({decoding})")
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not (out / RECORD).is_file():
        write_atomic(out / RECORD, json.dumps(settings, indent=1))
    todo = [i for i in range(rank, len(prompts), world) if not (out / f"{i:05d}.json").exists()]
    remove_unfinished(out, todo)
    jobs = [(i, k) for i in todo for k in range(samples_per_prompt)]
    pending: dict[int, list] = {}  # prompt -> its decoded samples so far (a prompt may span two batches)
    steps = StaticSteps()  # (a GPU's CUDA graphs, captured once per batch shape)
    with tqdm(total=len(jobs), desc="generate", unit="img", disable=rank != 0 or not jobs) as bar:  # (none: all done)
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            text = torch.tensor([text_tok.encode(prompts[i]["prompt"])[0] for i, _ in batch], device=device)
            # A generator per image on the model's device: on a GPU the draws stay there (no host sync).
            generators = [torch.Generator(device).manual_seed(image_seed(seed, i, k)) for i, k in batch]
            # One batch through the KV cache (decoding_mode's), a generator per image, only codes the VQ
            # tokenizer has.
            codes = sample(model, text, cfg, generators, codebook_size=vq.codebook_size, steps=steps, **decode_args)
            images = vq.decode(codes.view(-1, vq.grid, vq.grid).to(next(vq.parameters()).device))
            for (i, k), image in zip(batch, images):
                pending.setdefault(i, []).append(image.float())
                if k == samples_per_prompt - 1:
                    finish_prompt(i, prompts[i], pending.pop(i), out, settings, scorer, keep, upsampler)
            bar.update(len(batch))
    return len(todo)


def check_fits(model_cfg, vq, text_tok, trained_on: dict | None = None) -> None:
    """ValueError when the VQ or the text tokenizer is not one the model can have been trained with: another
    grid, more codes than its image vocabulary (fewer are fine: sample() draws only the VQ's), more text
    tokens than its text vocabulary (ids without an embedding), or, where the export records them
    (`trained_on`: training.export.exported_data_tokenizers), a content hash other than its training data's."""
    if vq.grid * vq.grid != model_cfg.image_seq_len or vq.codebook_size > model_cfg.image_vocab_size:
        raise ValueError(f"the VQ tokenizer (--vq; grid {vq.grid}, {vq.codebook_size} codes) does not fit the model "
                         f"({model_cfg.image_seq_len} image tokens, vocabulary {model_cfg.image_vocab_size})")
    if text_tok.vocab_size > model_cfg.text_vocab_size:
        raise ValueError(f"the text tokenizer (--text-tokenizer) has {text_tok.vocab_size} tokens, more than the "
                         f"model's text vocabulary (model.text_vocab_size={model_cfg.text_vocab_size}): expected the "
                         "SentencePiece model the model was trained with")
    if trained_on:
        given = {"vq": {"hash": vq.content_hash}, "text_tokenizer": {"hash": text_tok.content_hash}}
        differ = other_tokenizers(trained_on, given)
        if differ:
            raise ValueError(f"the {' and '.join(differ)} given (--vq / --text-tokenizer) is not the one the model's "
                             "training data was made with (content hashes differ from the export's config.json "
                             "data_tokenizers): the model's codes would decode to other images, or the prompts "
                             "become other words; give the tokenizers of its training data")


log = logging.getLogger("parti")


def warn_untrained_guidance(model_cfg, cfg: SamplingConfig) -> None:
    """One line when guidance relies on a null caption the model never saw (trained without caption dropout):
    allowed (the images are made), but the guided logits extrapolate from an untrained condition."""
    if cfg.guided and model_cfg.caption_drop_prob == 0:
        log.warning(f"warning: guidance_scale={cfg.guidance_scale} on a model trained without caption dropout "
                    "(model.caption_drop_prob=0): its null caption was never learned; expect worse images than "
                    "unguided sampling")


EXPORT_FILES = ("config.json", "model.safetensors")


def check_export(path: str | Path, name: str = "checkpoint") -> Path:
    """`path` if it is an export folder (training/export.py's config.json + model.safetensors); else a
    FileNotFoundError or ValueError naming `name` and saying what to pass instead (a training run, its
    checkpoints folder or one of its step folders is exported first)."""
    path = Path(path)
    expected = ("expected an export folder (config.json + model.safetensors) made by "
                "`python -m training.export --run-dir RUN`")
    if not path.exists():
        raise FileNotFoundError(f"{name} {path} does not exist; {expected}")
    if path.is_file():
        hint = f"; pass the folder holding it: {path.parent}" if path.name in EXPORT_FILES else ""
        raise ValueError(f"{name} {path} is a file; {expected}{hint}")
    if all((path / f).is_file() for f in EXPORT_FILES):
        return path
    run, step = None, None
    if (path / "checkpoints").is_dir():
        run, what = path, "a training run folder"
    elif (path / "latest").is_file() or path.name == "checkpoints":
        run, what = path.parent, f"the checkpoints folder of the training run {path.parent}"
    elif (path / "trainer_state.json").is_file() or re.fullmatch(r"step_\d+", path.name):
        run, step = path.parent.parent, path.name
        what = f"a checkpoint step folder of the training run {run}"
    if run is None:
        missing = " and ".join(f for f in EXPORT_FILES if not (path / f).is_file())
        raise ValueError(f"{name} {path} has no {missing}; {expected}")
    export = run / "export"
    exported = all((export / f).is_file() for f in EXPORT_FILES)
    config = read_export_config(export) if exported else {}
    exported_tag, averaged = config.get("checkpoint"), config.get("averaged")
    ema = ": the moving average of the weights" if config.get("weights") == "ema" else ""  # (training.export --ema)
    made_from = (f" (the mean of {averaged}{ema})" if averaged else f" (made from {exported_tag}{ema})" if exported_tag
                 else "")
    if exported and (step is None or (step == exported_tag and not averaged and not ema)):
        advice = f"pass its export {export}{made_from}"
    elif step:
        target = run / f"export_{step}" if exported else export
        advice = (f"export it first with `python -m training.export --run-dir {run} --tag {step}"
                  f"{f' --out {target}' if exported else ''}` and pass {target}")
    else:
        advice = f"export it first with `python -m training.export --run-dir {run}` and pass {export}"
    raise ValueError(f"{name} {path} is {what}, not an export folder; {advice}")


def export_identity(path: str | Path) -> dict:
    """Which checkpoint an export folder holds, cheaply: its resolved path, the checkpoint tag written by
    training.export, and size and modification time (ns) of model.safetensors (an export rewritten in
    place gets a new mtime)."""
    path = Path(path).resolve()
    weights = (path / "model.safetensors").stat()
    config = read_export_config(path)
    return {"path": str(path), "tag": config.get("checkpoint"), "weights_bytes": weights.st_size,
            "weights_mtime_ns": weights.st_mtime_ns,
            **({"averaged": config["averaged"]} if config.get("averaged") else {}),  # (training.export --average)
            **({"weights": config["weights"]} if config.get("weights") else {})}  # (training.export --ema)


def gather_metadata(out: Path, count: int | None = None) -> Path:
    """The prompts' .json files as out/metadata.jsonl (and a copy beside the upsampled images, when there are);
    with `count`, only those of prompts 0..count-1: a rerun with fewer prompts (a smaller --limit) leaves the
    earlier run's later prompts in the folder, which are not this run's (None: every prompt's)."""
    done = sorted((p for p in out.glob("[0-9]*.json") if p.stem.isdigit()), key=lambda p: int(p.stem))  # (6 digits
    # from prompt 100,000 on: sorted as text, they came before 99,999's)
    if count is not None:
        done = [p for p in done if int(p.stem) < count]
    lines = "".join(p.read_text() + "\n" for p in done)
    if upsampled_folder(out).is_dir():
        write_atomic(upsampled_folder(out) / "metadata.jsonl", lines)
    write_atomic(out / "metadata.jsonl", lines)
    return out / "metadata.jsonl"


def load_for_sampling(checkpoint, vq_path, text_tokenizer, device: str, dtype: torch.dtype | None = None):
    """The exported model (on `device`, in `dtype`: default bf16 on CUDA, fp32 on CPU), the frozen VQ
    tokenizer and the text tokenizer at the model's text length. The model carries `export_identity`,
    which generate() records beside the images."""
    identity = export_identity(check_export(checkpoint))
    # The tokenizers first (seconds), checked against the export's config, before the model (minutes).
    model_cfg = exported_model_config(checkpoint)
    vq, text_tok = load_image_tokenizer(vq_path, device), TextTokenizer(text_tokenizer, model_cfg.text_seq_len)
    check_fits(model_cfg, vq, text_tok, exported_data_tokenizers(checkpoint))
    model = load_exported(checkpoint, device, dtype)
    model.export_identity = identity
    return model, vq, text_tok


def load_upsampler_for_sampling(path: str | Path, device: str, flag: str = "--upsampler "):
    """An sr.train export on `device`, carrying its identity (resolved path, size, sha256) for the record;
    FileNotFoundError (missing) or ConfigError (not such an export) naming `flag` and the path. Small: loaded
    before the model, so that a wrong file stops a run before minutes of model loading."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}{path}: no such file; expected the export.pt an sr.train run writes")
    upsampler = load_upsampler(path, device, where=f"{flag}{path}")
    upsampler.export_identity = {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return upsampler


def check_inputs(args: argparse.Namespace) -> tuple[list[dict], SamplingConfig]:
    """The prompts and the sampling settings, after checking what can be checked before minutes of model
    loading: each problem is a ValueError or FileNotFoundError naming the flag and what was expected."""
    check_counts(args.samples_per_prompt, args.batch_size, args.keep)
    if args.limit < 0:
        raise ValueError(f"--limit must be >= 0 (0: all prompts), not {args.limit}")
    if not 0 <= args.seed < MAX_SEED:
        raise ValueError(f"--seed must be in [0, 2**32), not {args.seed}")
    if (args.clip_weights or args.clip_tag) and not args.clip:  # (they were ignored: no reranking, no CLIP scores)
        raise ValueError("--clip-weights/--clip-tag without --clip: give --clip (the open_clip architecture of the "
                         "weights, e.g. ViT-L-14, or local-dir:FOLDER), or drop them")
    cfg = dataclass_from_args(SamplingConfig, args)
    check_export(args.checkpoint, "--checkpoint")
    check_out_folder(args.out, "--out")
    return read_prompts(args.prompts, args.limit), cfg


def check_input_files(args: argparse.Namespace) -> None:
    """FileNotFoundError naming the flag of a missing tokenizer or upsampler file, and the CLIP scorer's settings
    (clip_score.check_clip), before the model is loaded."""
    for flag, path, expected in (("--vq", args.vq, "the export.pt of vq.train"),
                                 ("--text-tokenizer", args.text_tokenizer, "a SentencePiece .model file"),
                                 ("--upsampler", args.upsampler, "the export.pt an sr.train run writes")):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file; expected {expected}")
    if args.clip:
        check_clip(args.clip, args.clip_weights, args.clip_tag, f"--clip {args.clip}")


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist

    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--checkpoint", required=True, help="an export folder (config.json + model.safetensors), "
                        "made from a training run by python -m training.export --run-dir RUN")
    parser.add_argument("--vq", required=True)
    parser.add_argument("--text-tokenizer", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True, type=Path, help="output folder; a rerun with the same settings "
                        "resumes, one with other settings is refused")
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    add_dataclass_args(parser, SamplingConfig)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=0, help="images decoded together (0: 8 on a CPU; on a GPU "
                        "as many as their KV caches fit in half its free memory, at most 64)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N prompts")
    add_clip_args(parser, required=False)
    parser.add_argument("--keep", type=int, default=0, help="keep the best N samples per prompt (needs --clip)")
    parser.add_argument("--upsampler", default=None, help="an sr.train export.pt: also write the images upsampled "
                        "into OUT_upsampled/")
    parser.add_argument("--compile-decode", action="store_true", help="the decode step through inductor (on a GPU "
                        "before its CUDA graphs are captured; one compilation per attended prefix length and batch "
                        "shape); not yet measured on a GPU")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto | cuda | cpu: cuda (what the sbatch scripts pass) makes a missing GPU an error "
                        "instead of hours on the CPU; cpu hides the GPUs")
    args = parser.parse_args(argv)
    if args.keep > 0 and not args.clip:  # (a negative --keep is check_inputs' to name)
        parser.error("--keep ranks samples by CLIP score: give --clip (and --clip-weights)")
    # Inputs are checked before minutes of model loading; each problem is one line naming the flag or file.
    with command(errors=(ValueError, FileNotFoundError, DeviceError), label="evaluation.generate"):
        prompts, cfg = check_inputs(args)
        device = use_device(args.device, "--device")  # (before init_distributed touches CUDA)
        init_distributed(timeout_minutes=WAIT_FOR_PEERS_MINUTES)
        check_input_files(args)
        upsampler = load_upsampler_for_sampling(args.upsampler, device) if args.upsampler else None
        model, vq, text_tok = load_for_sampling(args.checkpoint, args.vq, args.text_tokenizer, device)
        scorer = ClipScorer.load(args.clip, args.clip_weights, device, tag=args.clip_tag) if args.clip else None
        generate(model, vq, text_tok, prompts, args.out, cfg, args.samples_per_prompt, args.seed, args.batch_size,
                 dist.get_rank(), dist.get_world_size(), scorer, args.keep, upsampler, args.compile_decode)
        dist.barrier()
        if dist.get_rank() == 0:
            print(f"wrote {gather_metadata(args.out, len(prompts))}")


if __name__ == "__main__":
    main()
