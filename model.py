"""
Composition: CLIP (ViT + text encoder + projections + temperature) and its contrastive loss.

Paper: "Learning Transferable Visual Models From Natural Language Supervision" (Radford et al.,
2021); the global-batch loss follows open_clip (Cherti et al., 2023; Ilharco et al., 2021).

Read first: `contrastive_loss` (what ITC computes, and why it is exact under DDP), then `CLIP`.
This file composes what vit.py and text.py define; it holds no model internals of its own.
"""
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from text import TextConfig, TextEncoder
from vit import ViT, ViTConfig


@dataclass
class CLIPConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 128
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0  # CLIP clamps exp(logit_scale) at 100

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "CLIPConfig":
        return cls(vision=ViTConfig(**d["vision"]), text=TextConfig(**d["text"]),
                   **{k: v for k, v in d.items() if k not in ("vision", "text")})


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the gradient of the SUM of all ranks'
    losses w.r.t. its own slice. With every rank's loss over its local rows and DDP averaging,
    the update equals the single-process gradient of the global-batch loss."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss touches every slice: sum the contributions
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """(B_local, E) -> (B_global, E), ranks in order; the identity without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return GatherWithGrad.apply(x)


def contrastive_loss(image_features, text_features, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE over the GLOBAL batch. Features are L2-normalised, (B_local, E).
    This rank's rows are scored against every rank's columns; the mean over ranks of this local
    loss equals the loss a single process computes on the whole global batch."""
    all_image, all_text = gather_features(image_features), gather_features(text_features)
    B = image_features.shape[0]
    offset = dist.get_rank() * B if all_image.shape[0] != B else 0
    labels = torch.arange(offset, offset + B, device=image_features.device)
    logits_per_image = logit_scale * image_features @ all_text.T  # (B_local, B_global)
    logits_per_text = logit_scale * text_features @ all_image.T  # (B_local, B_global)
    return (F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels)) / 2


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = ViT(cfg.vision)
        self.text = TextEncoder(cfg.text)
        self.visual_proj = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped as in CLIP so the temperature cannot collapse."""
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    def encode_image(self, images, reducer=None) -> torch.Tensor:
        return F.normalize(self.visual_proj(self.visual(images, reducer)), dim=-1)

    def encode_text(self, ids) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(ids)), dim=-1)

    def forward(self, images, ids) -> dict:
        """The training objective; returns a dict of losses with the total under "loss"."""
        itc = contrastive_loss(self.encode_image(images), self.encode_text(ids), self.scale())
        return dict(loss=itc, itc=itc)
