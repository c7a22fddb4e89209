"""Code usage and dead-code restarts, shared by the tokenizers (ViT-VQGAN, VQ-VAE, VQGAN; the dVAE: usage only).

    class MyVQ(CodeUsage, nn.Module):
        def __init__(...): ...; self.codebook = nn.Embedding(K, D); self.init_usage(K, dead_code_steps)
        def forward(...): ...; if self.training: self.track_usage(codes, latents)   # latents [N, D]
        stats = self.usage_stats(codes)     # {'perplexity', 'usage'} for the logs

Usage is an EMA of per-batch code counts over the whole data-parallel batch; a code unused for
`dead_code_steps` training steps is restarted from a random latent of the batch (rank 0's choice,
broadcast), so that the codebook keeps being used. `restarted(dead)` lets a subclass reset its own
statistics of the restarted codes (the VQ-VAE's EMA). `dead_code_steps` <= 0 tracks usage without restarts
(the dVAE: its codes are an argmax of encoder logits, not a nearest-code search, so overwriting a code's
embedding would not make the encoder choose it; there the KL term to the uniform prior keeps codes in use).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class CodeUsage:
    codebook: torch.nn.Embedding

    def init_usage(self, codebook_size: int, dead_code_steps: int) -> None:
        self.codebook_size, self.dead_code_steps = codebook_size, dead_code_steps
        self.register_buffer("usage", torch.zeros(codebook_size))        # EMA of code counts per batch
        self.register_buffer("last_used", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def track_usage(self, codes: torch.Tensor, latents: torch.Tensor | None, restart: bool = True) -> None:
        """EMA of code counts; restart codes unused for dead_code_steps steps from random batch latents [N, D]
        (none when dead_code_steps <= 0 or not `restart`, a frozen codebook's: `latents` may then be None)."""
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.step += 1
        counts = torch.bincount(codes.flatten(), minlength=self.codebook_size).float()
        if distributed:  # usage over the whole global batch, the same on every rank
            dist.all_reduce(counts)
        self.usage.mul_(0.99).add_(counts, alpha=0.01)
        self.last_used[counts > 0] = self.step
        if self.dead_code_steps <= 0 or not restart:
            return
        dead = (self.step - self.last_used) > self.dead_code_steps
        if dead.any():
            pick = torch.randint(0, latents.shape[0], (int(dead.sum()),), device=latents.device)
            # (through .data: the forward's graph may hold the weight itself, as VQGAN(l2_norm=True)'s normalisation
            # does, and an in-place write to it failed that backward; the dead rows were chosen by no code of
            # this batch, so no gradient depends on their values)
            self.codebook.weight.data[dead] = latents[pick].to(self.codebook.weight.dtype)
            self.last_used[dead] = self.step
            if distributed:  # rank 0's choice of restarted codes for everyone
                dist.broadcast(self.codebook.weight.data, src=0)
            self.restarted(dead)

    def restarted(self, dead: torch.Tensor) -> None:
        """Called after the codes `dead` (bool [K]) were restarted (codebook.weight holds their new values)."""

    def usage_stats(self, codes: torch.Tensor) -> dict:
        counts = torch.bincount(codes.flatten(), minlength=self.codebook_size).float()
        probs = counts / counts.sum()
        return {"perplexity": torch.exp(-(probs * (probs + 1e-10).log()).sum()),
                "usage": (self.usage > 1e-3).float().mean()}
