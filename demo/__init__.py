"""The end-to-end demo: the whole system on a task small enough for a laptop (`make demo`, `python -m demo`).

run.py drives it (data -> image tokenizer -> SentencePiece -> code shards -> parti-tiny at TP=2, stopped and
resumed -> guided samples -> report); shapes.py makes its captioned shapes and measures colour and shape on
the samples. Not part of the library: nothing outside demo/ (and the tests and benchmarks) imports it.
"""
from common.quiet import quiet_third_party

quiet_third_party()  # first: this package's modules import megatron-core and DeepSpeed, which warn at import
