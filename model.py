"""
Composition: CLIP (ViT + text encoder + projections + temperature) with the ALBEF objectives, and
Patch Ranking's CLIP (a frozen CLIP with the predictor and the learnable tokens wired in).

Papers: "Learning Transferable Visual Models From Natural Language Supervision" (CLIP, Radford et
al., 2021); the global-batch loss follows open_clip. "Align before Fuse" (ALBEF, Li et al., 2021)
for image-text matching (ITM) with hard negatives and masked language modelling (MLM) through a
fusion encoder that cross-attends to the image tokens.

Read first: `contrastive_loss` (what ITC computes, and why it is exact under DDP), then
`CLIP.forward` (text first, then the image with the method's reducer, then the objectives).
This file composes what vit.py, text.py and the method files define; a token-reduction method
enters CLIP only as `reducer_fn(text_guidance) -> Reducer` (checkpoint.py builds it from a config).
The captioner is in captioner.py, pretrained weights are read in pretrained.py.
"""
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ranking import Predictor, RankPrune, keep_count, pruning_layer
from text import PAD, FusionEncoder, TextConfig, TextEncoder, mask_tokens
from vit import ViT, ViTConfig


@dataclass
class CLIPConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 128
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0  # CLIP clamps exp(logit_scale) at 100
    objectives: tuple = ("itc",)  # any of itc, itm, mlm
    fusion_depth: int = 2  # layers of the fusion encoder (ITM and MLM)

    def __post_init__(self):
        self.objectives = tuple(self.objectives)
        unknown = set(self.objectives) - {"itc", "itm", "mlm"}
        if unknown or not self.objectives:
            raise ValueError(f"objectives {','.join(self.objectives)} are not a non-empty subset of itc,itm,mlm")

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
    """(B_local, ...) -> (B_global, ...), ranks in order; the identity without torch.distributed."""
    return GatherWithGrad.apply(x) if distributed() else x


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def pad_to(x: torch.Tensor, length: int, value=0) -> torch.Tensor:
    """(B, L, ...) -> (B, length, ...), padded at the end of dim 1."""
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, length - x.shape[1]), value=value)


def local_rows(n: int) -> slice:
    """This rank's rows of a gathered global batch whose ranks hold n rows each."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return slice(rank * n, (rank + 1) * n)


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


def sample_negatives(sim: torch.Tensor, generator=None) -> torch.Tensor:
    """For each row, one column drawn with probability softmax(sim) over the OTHER columns:
    ALBEF's hard negatives (similar but wrong). sim (B, B) -> (B,) column indices."""
    eye = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    w = (sim.float().softmax(1) + 1e-9).masked_fill(eye, 0)  # +1e-9: never an all-zero row
    return torch.multinomial(w.to(generator.device if generator else w.device), 1,
                             generator=generator).squeeze(1).to(sim.device)


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = ViT(cfg.vision)
        self.text = TextEncoder(cfg.text)
        self.visual_proj = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))
        if {"itm", "mlm"} & set(cfg.objectives):
            t = cfg.text
            self.fusion = FusionEncoder(t.width, cfg.vision.width, t.heads, cfg.fusion_depth, t.ln_eps)
            if "itm" in cfg.objectives:  # only heads that get a loss: DDP wants every parameter used
                self.itm_head = nn.Linear(t.width, 2)
            if "mlm" in cfg.objectives:
                self.mlm_head = nn.Linear(t.width, t.vocab_size)


    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped as in CLIP so the temperature cannot collapse."""
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    def encode_image(self, images, reducer=None) -> torch.Tensor:
        return F.normalize(self.visual_proj(self.visual(images, reducer)), dim=-1)

    def encode_text(self, ids) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(ids)), dim=-1)

    @torch.no_grad()
    def text_guidance(self, text_cls: torch.Tensor) -> torch.Tensor:
        """The text [CLS] in ViT width, detached, for ELIP: as is when the widths agree (ALBEF),
        else through the text projection and the TRANSPOSE of the image projection (CLIP)."""
        if self.cfg.text.width == self.cfg.vision.width:
            return text_cls.detach()
        return self.text_proj(text_cls) @ self.visual_proj.weight

    def itm_logits(self, image_tokens, text_tokens, ids) -> torch.Tensor:
        return self.itm_head(self.fusion(text_tokens, ids, image_tokens)[:, 0])  # (B, 2)

    def forward(self, images, ids, reducer_fn=None, generator=None) -> dict:
        """The training objectives; returns a dict of losses with their sum under "loss".
        The text is encoded first, so that `reducer_fn` (ELIP) can see it."""
        text_tokens = self.text.forward_tokens(ids)  # (B, L, Dt)
        text_cls = self.text.pooled(text_tokens, ids)  # (B, Dt)
        reducer = reducer_fn(self.text_guidance(text_cls)) if reducer_fn else None
        image_tokens = self.visual.forward_tokens(images, reducer).x  # (B, N', Dv): pruned or not
        image_feat = F.normalize(self.visual_proj(image_tokens[:, 0]), dim=-1)
        text_feat = F.normalize(self.text_proj(text_cls), dim=-1)
        losses = {}
        if "itc" in self.cfg.objectives:
            losses["itc"] = contrastive_loss(image_feat, text_feat, self.scale())
        if "itm" in self.cfg.objectives and len(ids) > 1:
            losses["itm"] = self.itm_loss(image_tokens, text_tokens, ids, image_feat, text_feat, generator)
        if "mlm" in self.cfg.objectives:
            losses["mlm"] = self.mlm_loss(image_tokens, ids, generator)
        losses["loss"] = sum(losses.values())
        return losses

    def itm_loss(self, image_tokens, text_tokens, ids, image_feat, text_feat, generator=None):
        """ITM with hard negatives mined over the GLOBAL batch, as BLIP does under DDP: every rank
        draws the negatives of all rows from the same generator and keeps its own rows', so N
        processes draw what one process with the whole batch draws."""
        with torch.no_grad():
            sim = self.scale() * gather_features(image_feat.detach()) @ gather_features(text_feat.detach()).T  # (Bg, Bg)
        if distributed():  # ranks pad their captions to different lengths: gather them at the context length
            text_tokens, ids = pad_to(text_tokens, self.cfg.text.context_length), pad_to(ids, self.cfg.text.context_length, PAD)
        return matching_loss(self.itm_logits, image_tokens, text_tokens, ids, sim, generator,
                             everyone=(gather_features(image_tokens), gather_features(text_tokens), gather_features(ids)))

    def mlm_loss(self, image_tokens, ids, generator=None):
        """Masked words predicted from the text and the image; the masks drawn over the global
        batch (this rank keeps its rows'), the vocabulary scored at the masked positions only."""
        everyone = gather_features(pad_to(ids, self.cfg.text.context_length, PAD))  # drawn at a fixed length
        all_masked, _, all_slots, all_slot_labels = mask_tokens(everyone, self.cfg.text.vocab_size, generator)
        mine = local_rows(len(ids))
        masked, slot_labels = all_masked[mine, :ids.shape[1]], all_slot_labels[mine]
        slots = all_slots[mine].masked_fill(slot_labels == -100, 0)  # unused slots point anywhere inside
        fused = self.fusion(self.text.forward_tokens(masked), masked, image_tokens)  # (B, L, Dt)
        at_slots = fused.gather(1, slots[..., None].expand(-1, -1, fused.shape[-1]))  # (B, K, Dt)
        nll = F.cross_entropy(self.mlm_head(at_slots).flatten(0, 1).float(), slot_labels.flatten(), ignore_index=-100,
                              reduction="sum")
        # the global batch's mean over its masked words once DDP averages the ranks' losses
        # (a rank's own mean would weigh its words by how few it drew)
        ranks = len(everyone) // len(ids)
        return nll * ranks / (all_slot_labels != -100).sum().clamp(min=1)




def matching_loss(itm_logits, image_tokens, text_tokens, ids, sim, generator=None, everyone=None):
    """Binary matching on B positive pairs, B (image, hard negative text) pairs and B (hard
    negative image, text) pairs, negatives drawn from `sim` (Bg, Bg) over the batch `everyone`
    = (image tokens, text tokens, ids) of all ranks (gathered; default: this process's batch).
    itm_logits(image_tokens, text_tokens, ids) -> (3B, 2)."""
    all_images, all_texts, all_ids = everyone or (image_tokens, text_tokens, ids)
    mine = local_rows(len(ids)) if everyone else slice(None)
    neg_text = sample_negatives(sim, generator)[mine]  # global indices of this rank's rows' negatives
    neg_image = sample_negatives(sim.T, generator)[mine]
    # index_select, not x[idx]: on the CPU the backward of x[idx] adds repeated rows' gradients in
    # a thread-dependent order, so runs would differ in the last bits; index_select's does not
    images = torch.cat([image_tokens, image_tokens, all_images.index_select(0, neg_image)])  # (3B, N', Dv)
    texts = torch.cat([text_tokens, all_texts.index_select(0, neg_text), text_tokens])
    all_ids = torch.cat([ids, all_ids[neg_text], ids])
    labels = torch.cat([torch.ones(len(ids)), torch.zeros(2 * len(ids))]).long().to(ids.device)
    return F.cross_entropy(itm_logits(images, texts, all_ids).float(), labels)




# ----------------------------------------------------------------------------------------------
# Patch Ranking's CLIP: ranking.py's predictor and pruning on a frozen CLIP, with learnable tokens

@dataclass
class RankingConfig:
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    layer: int = 2  # the block whose input is pruned
    keep: float = 0.6  # share of the patch tokens kept
    dim: int = 64  # the predictor's channels after pooling
    num_tokens: int = 4  # learnable tokens appended after pruning (0: none)
    fuse: bool = False  # ours: fuse the pruned patches into one token (proportional attention) instead of dropping

    def __post_init__(self):
        pruning_layer(self.clip.vision.depth, self.layer)
        keep_count(self.keep, self.clip.vision.num_patches)

    @classmethod
    def from_dict(cls, d) -> "RankingConfig":
        return cls(clip=CLIPConfig.from_dict(d["clip"]), **{k: v for k, v in d.items() if k != "clip"})


class RankingCLIP(CLIP):
    """A CLIP (frozen) with the predictor and the learnable tokens. `encode_image(images)` is
    the unpruned CLIP; `encode_image(images, model.reducer())` prunes the Patch Ranking way."""

    def __init__(self, cfg: RankingConfig):
        super().__init__(cfg.clip)
        self.rcfg = cfg
        v = cfg.clip.vision
        self.predictor = Predictor(v.width, v.num_patches, cfg.dim)
        self.learned_tokens = nn.Parameter(torch.randn(cfg.num_tokens, v.width) * 0.02)

    def freeze_all_but_tokens(self):
        """What train.py's loop trains: the learnable tokens; the CLIP and the predictor stay as they are."""
        for name, p in self.named_parameters():
            p.requires_grad_(name == "learned_tokens")

    def reducer(self, scorer=None, tokens: bool = True) -> RankPrune:
        """Pruning at the configured layer by `scorer` (default: the predictor), with the learnable tokens."""
        scorer = scorer or (lambda x, vit: self.predictor(x[:, 1:]))
        extra = self.learned_tokens if tokens and self.rcfg.num_tokens else None
        return RankPrune(self.rcfg.layer, keep_count(self.rcfg.keep, self.cfg.vision.num_patches), scorer, extra,
                         self.rcfg.fuse)

    def forward(self, images, ids, reducer_fn=None, generator=None) -> dict:
        """The learnable tokens' objective: the contrastive loss of the pruned image tower."""
        image = self.encode_image(images, self.reducer())
        loss = contrastive_loss(image, self.encode_text(ids), self.scale())
        return dict(itc=loss, loss=loss)
