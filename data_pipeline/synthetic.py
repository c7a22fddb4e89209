"""Synthetic caption/code pairs in which the caption decides the image codes, for the debug config.

    ds = SyntheticCodes(model_cfg, size=512, seed=0)
    text_ids, codes = ds[17]           # int64 [text_seq_len], int64 [image_seq_len]

Each sample belongs to one of `num_classes` classes chosen from its index; its caption spells the
class with a few tokens and its codes are the class's fixed pattern with 10% of positions
resampled, so a model that reads the caption can get well below the unconditional loss. Every
sample is a pure function of (seed, index): any process can address any sample.
"""
from __future__ import annotations

import torch


class SyntheticCodes:
    FIRST_WORD = 4  # ids below are PAD/UNK/BOS/EOS

    def __init__(self, model_cfg, size: int = 1024, seed: int = 0, num_classes: int = 8, noise: float = 0.1):
        self.cfg, self.size, self.seed, self.num_classes, self.noise = model_cfg, size, seed, num_classes, noise
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.randint(0, model_cfg.image_vocab_size, (num_classes, model_cfg.image_seq_len), generator=g)
        words = model_cfg.text_vocab_size - self.FIRST_WORD
        self.captions = torch.randint(0, words, (num_classes, 3), generator=g) + self.FIRST_WORD

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} outside 0..{self.size - 1}")
        c = self.cfg
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        cls = int(torch.randint(0, self.num_classes, (1,), generator=g))
        n_words = min(3, c.text_seq_len - 1)
        text = torch.full((c.text_seq_len,), c.text_pad_id, dtype=torch.long)
        text[:n_words] = self.captions[cls, :n_words]
        text[n_words] = c.text_eos_id
        codes = self.patterns[cls].clone()
        resample = torch.rand(c.image_seq_len, generator=g) < self.noise
        codes[resample] = torch.randint(0, c.image_vocab_size, (int(resample.sum()),), generator=g)
        return text, codes
