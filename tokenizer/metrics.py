"""Reconstruction and codebook metrics: PSNR and SSIM per image, code usage and perplexity."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure


def psnr_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1], [b, 3, H, W] -> PSNR in dB per image (capped at 100 for exact copies)."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp_max(100.0)


def ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # a 7x7 window: the default 11x11 is wider than a third of a 32-48 px image
    return structural_similarity_index_measure(x.float(), y.float(), data_range=1.0, kernel_size=7,
                                               reduction="none")


class CodeHistogram:
    """Counts of each code over an evaluation set."""

    def __init__(self, num_codes: int):
        self.counts = torch.zeros(num_codes, dtype=torch.long)

    def update(self, codes: torch.Tensor) -> None:
        self.counts += torch.bincount(codes.flatten().cpu(), minlength=len(self.counts))

    @property
    def usage(self) -> float:
        """Fraction of the codebook used at least once."""
        return float((self.counts > 0).float().mean())

    @property
    def perplexity(self) -> float:
        """exp(entropy) of the code distribution: the number of codes effectively in use."""
        p = self.counts.float() / self.counts.sum().clamp_min(1)
        return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
