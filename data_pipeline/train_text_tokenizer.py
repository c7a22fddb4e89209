"""Train the SentencePiece caption tokenizer on the captions of LAION-style shards.

    python -m data_pipeline.train_text_tokenizer --captions 'laion/{00000..00099}.tar' --vocab-size 16000 \
        --out tok/spm.model
"""
from __future__ import annotations

import argparse
from collections import Counter

from tqdm import tqdm

from data_pipeline.laion import expand_shards, read_shard
from data_pipeline.text_tokenizer import train_sentencepiece


def shard_captions(pattern: str, errors: Counter):
    for path in tqdm(expand_shards(pattern), desc="captions", unit="shard"):
        for sample in read_shard(path, errors):
            try:
                text = sample.get("txt", b"").decode("utf-8").strip()
            except UnicodeDecodeError:
                continue
            if text:
                yield text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", required=True, help="shard pattern, e.g. 'laion/{00000..00099}.tar'")
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--out", required=True, help="the .model file to write")
    args = parser.parse_args(argv)
    errors: Counter = Counter()
    out = train_sentencepiece(shard_captions(args.captions, errors), args.vocab_size, args.out)
    print(f"wrote {out}" + (f"; unreadable tails in {errors['truncated_tar']} shard(s)" if errors else ""))


if __name__ == "__main__":
    main()
