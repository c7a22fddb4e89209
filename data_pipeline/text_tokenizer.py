"""The SentencePiece caption tokenizer: training and the encoding conventions the model relies on.

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

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train_sentencepiece(captions: Iterable[str], vocab_size: int, out: str | Path) -> Path:
    """Train a unigram model on the captions; writes `out` (a .model file)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, character_coverage=0.9995,
        hard_vocab_limit=False,  # a small corpus may not support the whole vocabulary
        normalization_rule_name="nmt_nfkc_cf", minloglevel=2, num_threads=2)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out)
    return out


class TextTokenizer:
    def __init__(self, path: str | Path, max_len: int = 128):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model {path} does not exist "
                                    "(train one with python -m data_pipeline.train_text_tokenizer)")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        if (self.sp.pad_id(), self.sp.eos_id()) != (PAD_ID, EOS_ID):
            raise ValueError(f"{path}: pad/eos ids are {self.sp.pad_id()}/{self.sp.eos_id()}, "
                             f"expected {PAD_ID}/{EOS_ID} (train it with this project's command)")
        self.max_len = max_len
        self.vocab_size = self.sp.get_piece_size()
        self.content_hash = hashlib.sha256(path.read_bytes()).hexdigest()

    def encode(self, caption: str) -> tuple[list[int], int]:
        ids = self.sp.encode(caption)[: self.max_len - 1] + [EOS_ID]
        return ids + [PAD_ID] * (self.max_len - len(ids)), len(ids)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (PAD_ID, EOS_ID, BOS_ID)])
