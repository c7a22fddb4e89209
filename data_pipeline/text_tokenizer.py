r"""The SentencePiece caption tokenizer: training and the encoding conventions the model relies on.

    python -m data_pipeline.train_text_tokenizer --captions 'laion/{00000..00099}.tar' --vocab-size 16000 \
        --out tok/spm.model
    tok = TextTokenizer("tok/spm.model", max_len=128)
    ids, length = tok.encode("a red circle")        # int list of max_len, padded; true length

Conventions (fixed in the trained model: pad 0, unk 1, bos 2, eos 3): a caption is its pieces
truncated to max_len - 1, then EOS, then PAD up to max_len. The empty caption is [EOS] alone, which is
also the model's null condition for classifier-free guidance. BOS is reserved, not used.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from common.files import write_atomic
from data_pipeline.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


MAX_CAPTIONS = 5_000_000
"""Captions SentencePiece trains on at most (a uniform sample of more): it holds them all in memory, and LAION's
hundreds of millions would not fit (its docs suggest a few million as enough for the vocabulary)."""


def train_sentencepiece(captions: Iterable[str], vocab_size: int, out: str | Path, allow_smaller: bool = True,
                        case_fold: bool = False, max_captions: int = MAX_CAPTIONS) -> Path:
    """Train a unigram model on the captions; writes `out` (a .model file). NFKC-normalised, case kept (a model
    that renders text in its images needs it: T5's tokenizer, Imagen's, is cased); `case_fold` lowercases
    (SentencePiece's nmt_nfkc_cf). The rule is stored in the model file: encoding follows it wherever it is loaded.
    Of more than `max_captions` (> 100) captions, a uniform sample of that many (SentencePiece's reservoir, seeded:
    the same captions give the same model) is trained on; all are read.

    SentencePiece cannot make more pieces than the captions hold; it then makes as many as it can
    (`hard_vocab_limit=False`). With `allow_smaller=False` (the command line) that is refused with a
    DataError giving the largest size these captions support, and `out` is left as it was."""
    out = Path(out)
    count, failed = [0], []

    def counted():
        try:
            for caption in captions:
                count[0] += 1
                yield caption
        except Exception as e:  # SentencePiece would turn it into a RuntimeError with a Python traceback
            failed.append(e)
            raise

    model = io.BytesIO()
    spm.set_random_generator_seed(0)  # (the reservoir's draws; SentencePiece seeds from the clock otherwise)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted(), model_writer=model, vocab_size=vocab_size, model_type="unigram",
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, character_coverage=0.9995,
            hard_vocab_limit=False,  # a small corpus may not support the whole vocabulary: checked below
            input_sentence_size=max_captions, shuffle_input_sentence=True,
            normalization_rule_name="nmt_nfkc_cf" if case_fold else "nmt_nfkc", minloglevel=2, num_threads=2)
    except RuntimeError as e:
        if failed:
            raise failed[0] from None
        if not count[0]:
            raise DataError(f"no captions to train {out} on (the inputs hold no readable .txt)") from e
        raise DataError(f"SentencePiece could not train {out} on {count[0]} captions: "
                        + " ".join(str(e).split())) from e
    made = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    if made < vocab_size and not allow_smaller:
        raise DataError(f"a vocabulary of {vocab_size} was asked for, but the {min(count[0], max_captions)} "
                        f"captions{' sampled' if count[0] > max_captions else ''} support at most "
                        f"{made} pieces (too few distinct words and characters); ask for {made} or fewer "
                        f"(--vocab-size {made}) or give more captions; {out} was not written")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, model.getvalue())
    return out


class TextTokenizer:
    def __init__(self, path: str | Path, max_len: int = 128):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model {path} does not exist "
                                    "(train one with python -m data_pipeline.train_text_tokenizer)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except RuntimeError as e:  # (sentencepiece's parse error; an OSError names itself)
            raise DataError(f"{path}: not a SentencePiece model ({str(e).strip().splitlines()[0]}); expected the "
                            ".model file of python -m data_pipeline.train_text_tokenizer") from None
        if (self.sp.pad_id(), self.sp.eos_id()) != (PAD_ID, EOS_ID):
            raise DataError(f"{path}: pad/eos ids are {self.sp.pad_id()}/{self.sp.eos_id()}, "
                            f"expected {PAD_ID}/{EOS_ID} (train it with this project's command)")
        if max_len < 2:  # (1 would make every caption [EOS], the null caption of classifier-free guidance)
            raise DataError(f"text length {max_len} (--text-len, model.text_seq_len): expected at least 2 "
                            "(a piece and EOS)")
        self.max_len = max_len
        self.vocab_size = self.sp.get_piece_size()
        self.content_hash = hashlib.sha256(path.read_bytes()).hexdigest()

    def encode(self, caption: str) -> tuple[list[int], int]:
        ids = self.sp.encode(caption)[: self.max_len - 1] + [EOS_ID]
        return ids + [PAD_ID] * (self.max_len - len(ids)), len(ids)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (PAD_ID, EOS_ID, BOS_ID)])
