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


class CodeDeterminism:
    """How much a code is a function of its own patch: H(code | the patch's exact pixels), in nats.

    0 when equal patches always get equal codes (a patch-local encoder); large when an encoder that sees
    the surroundings writes one content with many near-duplicate codes (synonyms the decoder must guess).
    Also counts the distinct codes given to flat patches (one colour throughout), per colour, and the other
    direction: the share of patches written with a code whose most common patch is a different one (two
    contents on one code, which no decoder can tell apart from the code alone; 10.5 % for the demo's
    1,000-code FSQ on the shapes world, whose training scenes hold ~3,600 distinct 4 x 4 patches).
    """

    def __init__(self):
        self.pairs: dict[bytes, dict[int, int]] = {}
        self.flat: dict[tuple[int, int, int], dict[int, int]] = {}

    def update(self, images: torch.Tensor, codes: torch.Tensor) -> None:
        """images uint8 [b, 3, H, W]; codes [b, h, w] with H = f * h."""
        b, _, H, _ = images.shape
        f = H // codes.shape[-1]
        patches = images.to(torch.uint8).unfold(2, f, f).unfold(3, f, f)  # [b, 3, h, w, f, f]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * f * f).cpu().numpy()
        rgb = patches.reshape(len(patches), 3, f * f)
        is_flat = (rgb == rgb[:, :, :1]).all(axis=(1, 2))
        for row, code, fl in zip(patches, codes.reshape(-1).tolist(), is_flat):
            d = self.pairs.setdefault(row.tobytes(), {})
            d[code] = d.get(code, 0) + 1
            if fl:
                colour = (int(row[0]), int(row[f * f]), int(row[2 * f * f]))
                c = self.flat.setdefault(colour, {})
                c[code] = c.get(code, 0) + 1

    def result(self, top_flat: int = 3) -> dict:
        total = sum(n for d in self.pairs.values() for n in d.values())
        h = 0.0
        for d in self.pairs.values():
            counts = torch.tensor(list(d.values()), dtype=torch.float64)
            p = counts / counts.sum()
            h += float(counts.sum() / max(total, 1) * -(p * p.log()).sum())
        top_per_code: dict[int, int] = {}  # per code, the occurrences of its most common patch
        for d in self.pairs.values():
            for code, n in d.items():
                top_per_code[code] = max(top_per_code.get(code, 0), n)
        flats = sorted(self.flat.items(), key=lambda kv: -sum(kv[1].values()))[:top_flat]
        return {"code_given_patch_nats": round(h, 4), "distinct_patches": len(self.pairs), "patches": total,
                "codes_used": len(top_per_code),
                "patches_on_a_shared_code": round(1 - sum(top_per_code.values()) / max(total, 1), 4),
                "codes_per_flat_patch": {"rgb(%d,%d,%d)" % k: len(v) for k, v in flats}}
