"""LAION-style shards -> filtered, VQ-encoded, memory-mapped code shards; SentencePiece; the training order
(README.md)."""
from common.quiet import quiet_third_party

quiet_third_party()  # first: this package's modules import megatron-core and DeepSpeed, which warn at import
