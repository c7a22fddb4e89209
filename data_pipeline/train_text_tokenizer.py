r"""Train the SentencePiece caption tokenizer on the captions of LAION-style shards.

    python -m data_pipeline.train_text_tokenizer --captions 'laion/{00000..00099}.tar' --vocab-size 16000 \
        --out tok/spm.model [--case-fold] [--overwrite]

Case is kept unless --case-fold (tokenizers trained before 2026-12-05 lowercased; the rule is in each model file).
Every caption is read; of more than --max-captions (5 million) a uniform, seeded sample is trained on.

The vocabulary is exactly --vocab-size pieces or the command fails: SentencePiece would silently make
fewer when the captions hold too few distinct pieces, and the error says the largest size they support.
There is deliberately no flag to accept a smaller one: rerunning with that size is the same opt-in,
explicit in the command and its logs, and the model's text_vocab_size is then set from a number the user
chose (a much smaller vocabulary than asked usually means the pattern matched too few shards). Inputs
that are not tars at all are refused before training, and so is an --out that exists (unless --overwrite), is a
folder or is one of the inputs; truncated tars give their readable samples and
are counted. Errors are printed as one line (`error: ...`), exit status 1.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from common.cli import command, description
from data_pipeline.errors import DataError
from data_pipeline.laion import check_is_tar, expand_shards, read_shard
from data_pipeline.text_tokenizer import MAX_CAPTIONS, train_sentencepiece


def shard_captions(pattern: str, errors: Counter):
    for path in tqdm(expand_shards(pattern), desc="captions", unit="shard"):
        for sample in read_shard(path, errors):
            try:
                text = sample.get("txt", b"").decode("utf-8").strip()
            except UnicodeDecodeError:
                continue
            if text:
                yield text


def check_out(out: Path, shards: list[Path], overwrite: bool) -> None:
    """Refuse, before any caption is read, an --out that is a folder, one of the input shards, or an existing
    file without --overwrite: written over, a tokenizer is gone for good (and the code shards made with it name
    its hash), an input shard becomes a model file."""
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; expected the .model file to write, e.g. {out / 'spm.model'}")
    if out.exists() and any(out.samefile(shard) for shard in shards):  # (expand_shards: each exists)
        raise DataError(f"--out {out} is one of the --captions shards; expected the .model file to write")
    if out.exists() and not overwrite:
        raise DataError(f"--out {out} exists (a tokenizer, and the code shards made with it name its hash): give "
                        "another --out, or --overwrite to replace it")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--captions", required=True, help="shard pattern, e.g. 'laion/{00000..00099}.tar'")
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--out", required=True, help="the .model file to write (not an existing file unless "
                        "--overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (code shards made with "
                        "it record its hash: they no longer match the new one)")
    parser.add_argument("--max-captions", type=int, default=MAX_CAPTIONS,
                        help="train on a uniform sample of this many when there are more (SentencePiece holds them "
                             f"in memory; default {MAX_CAPTIONS:,})")
    parser.add_argument("--case-fold", action="store_true", help="lowercase the captions (SentencePiece's "
                        "nmt_nfkc_cf); by default case is kept, which text rendered in images needs")
    args = parser.parse_args(argv)
    if not 5 <= args.vocab_size <= 65536:  # 4 special pieces + at least one; ids are stored as uint16
        parser.error(f"--vocab-size {args.vocab_size} must be in 5..65536")
    if args.max_captions <= 100:  # (SentencePiece's own lower limit)
        parser.error(f"--max-captions {args.max_captions} must be more than 100")
    errors: Counter = Counter()
    with command(errors=(DataError, FileNotFoundError)):
        shards = expand_shards(args.captions)
        for path in shards:  # before training: SentencePiece reads the captions lazily
            check_is_tar(path)
        check_out(Path(args.out), shards, args.overwrite)
        out = train_sentencepiece(shard_captions(args.captions, errors), args.vocab_size, args.out,
                                  allow_smaller=False, case_fold=args.case_fold, max_captions=args.max_captions)
    notes = [f"unreadable tails in {errors['truncated_tar']} shard(s)"] if errors["truncated_tar"] else []
    notes += [f"{errors['duplicate_member']} repeated tar member(s) left out"] if errors["duplicate_member"] else []
    print(f"wrote {out}" + "".join(f"; {note}" for note in notes))


if __name__ == "__main__":
    main()
