"""Where the text encoder's pre-training (training/text_encoder.py) reads captions: the lines of text files
(tokenized when read) or the captions of the run's training data, and the held-out captions whose masked-token
loss it measures every train.eval_interval steps.

    captions = caption_source(cfg, ["captions.txt"], "tok/spm.model", ["valid.txt"])  # .at(i, position) -> ids [T]
    held_out = held_out_captions(cfg, captions, ["valid.txt"])  # held_out.watched: its lines also trained on
"""
from __future__ import annotations

import mmap
import re
from array import array
from pathlib import Path

import numpy as np
import torch

from common.config import ConfigError, require
from data_pipeline.loader import read_sample
from data_pipeline.text_tokenizer import TextTokenizer
from data_pipeline.code_shards import data_tokenizers
from data_pipeline.training_data import held_out_sets, training_dataset
from training.config import Config

WORD = re.compile(r"\w")  # (a letter, digit or underscore: never emptied by the tokenizer's normalisation)


def caption_source(cfg: Config, text_files: list[str] | None, text_tokenizer: str | None,
                   valid_text_files: list[str] | None = None):
    """Indexable captions as id tensors [T]: the lines of --text-files, else the run's training data. With
    `valid_text_files`, the held-out lines met among the training ones are kept (`found`, for held_out_captions)."""
    if text_files:
        if not text_tokenizer:
            raise ConfigError("--text-files needs --text-tokenizer (the SentencePiece model to tokenize them with)")
        tok = TextTokenizer(text_tokenizer, cfg.model.text_seq_len)
        if tok.vocab_size > cfg.model.text_vocab_size:
            raise ConfigError(f"--text-tokenizer {text_tokenizer}: {tok.vocab_size} ids do not fit "
                              f"model.text_vocab_size={cfg.model.text_vocab_size}")
        return CaptionLines(text_files, tok, watch=_line_texts(valid_text_files or []))
    data = training_dataset(cfg.data, cfg.model, cfg.train.seed)
    return _Captions(data)


def caption_tokenizer(captions) -> dict | None:
    """The text tokenizer the captions' ids come from ({"hash", "vocab_size"}: --text-tokenizer's, else the
    code shards' manifest entry); None for synthetic data, whose ids come from no tokenizer."""
    if isinstance(captions, CaptionLines):
        return {"hash": captions.tok.content_hash, "vocab_size": captions.tok.vocab_size}
    tokenizers = data_tokenizers(captions.data)
    return {k: tokenizers["text_tokenizer"].get(k) for k in ("hash", "vocab_size")} if tokenizers else None


def _line_texts(paths: list[str]) -> frozenset[str]:
    """The stripped lines of text files as CaptionLines compares them (missing files and undecodable bytes are
    left to CaptionLines' own read of them to report)."""
    texts = set()
    for path in map(Path, paths):
        if path.is_file():
            with open(path, "rb") as f:  # (lines as CaptionLines splits them: at b"\n" only)
                texts.update(line.decode("utf-8", errors="replace").strip() for line in f)
    return frozenset(texts - {""})


class CaptionLines:
    """The lines of text files that tokenize to at least one piece, as caption id tensors [T], tokenized when
    read. Each rank keeps where each line starts (8 bytes per caption) and tokenizes only its batches' rows: a
    tensor per caption was ~1.7 KB on every rank, 15 GiB per rank at 10M captions. Blank lines are left out, and
    so are lines the tokenizer's normalisation empties (zero-width spaces, control characters: an EOS-only row,
    as pre-tokenization's `empty_caption`), counted in `left_out`; only lines without a word character are
    tokenized for that here (any letter or digit gives a piece, if only the unknown one). Errors name the file
    and `flag`, the option it was given with. `watch`: texts looked for in the same pass, the captions among
    them in `found`, their number of lines in `watched`."""

    def __init__(self, paths: list[str], tok: TextTokenizer, flag: str = "--text-files",
                 watch: frozenset[str] = frozenset()):
        self.tok, self.files, starts, self.left_out = tok, [], [], 0
        self.found, self.watched = set(), 0
        self.paths = {Path(p).resolve() for p in paths}  # (held_out_captions refuses these as held-out files)
        for path in map(Path, paths):
            if not path.is_file():
                raise ConfigError(f"{flag} {path}: {'a folder' if path.is_dir() else 'no such file'}; "
                                  "expected a text file of one caption per line")
            offsets, at = array("q"), 0
            with open(path, "rb") as f:
                for number, line in enumerate(f, 1):
                    try:
                        text = line.decode("utf-8").strip()
                    except UnicodeDecodeError as e:
                        raise ConfigError(f"{flag} {path}: line {number} is not UTF-8 ({e.reason})") from None
                    if text and (WORD.search(text) or tok.encode(text)[1] > 1):
                        offsets.append(at)
                        if text in watch:
                            self.found.add(text)
                            self.watched += 1
                    else:
                        self.left_out += bool(text)
                    at += len(line)
            if offsets:
                with open(path, "rb") as f:
                    self.files.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
                starts.append(np.frombuffer(offsets, dtype=np.int64))
        if not starts:
            raise ConfigError(f"{flag} {', '.join(paths)}: no captions (every line is blank or tokenizes to "
                              "no piece)")
        self.bases = np.cumsum([0] + [len(s) for s in starts])
        self.starts = np.concatenate(starts)

    def __len__(self) -> int:
        return len(self.starts)

    def at(self, i: int, position: int) -> torch.Tensor:
        """Caption i, read for stream position `position` (the same at every epoch)."""
        return self[i]

    def __getitem__(self, i: int) -> torch.Tensor:
        text = self.files[int(np.searchsorted(self.bases, i, side="right")) - 1]
        start = int(self.starts[i])
        end = text.find(b"\n", start)
        line = text[start:end if end >= 0 else len(text)].decode("utf-8").strip()
        return torch.tensor(self.tok.encode(line)[0])


class _Captions:
    """The captions of the run's code shards; read as the Parti trainer reads them (data_pipeline.loader's
    read_sample: a blend of datasets goes on through each of them epoch after epoch)."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def at(self, i: int, position: int) -> torch.Tensor:
        return read_sample(self.data, i, position)[0]


def held_out_captions(cfg: Config, captions, valid_text_files: list[str] | None) -> dict:
    """{set name: held-out captions} for train.eval_interval: --valid-text-files when training on --text-files
    (one set, ''; tokenized alike; its `watched` lines are training captions too, when caption_source was given
    the same files), else the run's data.valid_shards (data_pipeline.training_data.held_out_sets: its named sets;
    synthetic data generates its own). ConfigError naming what is missing or too small."""
    t = cfg.train
    needed = t.eval_batches * t.global_batch_size
    if isinstance(captions, CaptionLines):
        require(bool(valid_text_files), "train.eval_interval with --text-files needs --valid-text-files (held-out "
                                        "captions, one per line, not among the training ones)")
        shared = sorted({Path(p).resolve() for p in valid_text_files} & captions.paths)
        require(not shared, f"--valid-text-files: {', '.join(map(str, shared))} is also in --text-files: its "
                            "captions are trained on, so their loss is not a held-out one")
        held_out = CaptionLines(valid_text_files, captions.tok, "--valid-text-files", watch=frozenset(captions.found))
        require(len(held_out) >= needed, f"--valid-text-files: {len(held_out):,} captions; train.eval_batches global "
                                         f"batches of train.global_batch_size need {needed:,}")
        return {"": held_out}
    require(not valid_text_files, "--valid-text-files goes with --text-files (this run reads its data's captions: "
                                  "their held-out ones are data.valid_shards)")
    return {name: _Captions(dataset)
            for name, dataset in held_out_sets(cfg.data, cfg.model, t.seed, needed,
                                                        data_tokenizers(captions.data)).items()}
