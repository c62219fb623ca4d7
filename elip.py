"""
ELIP: language-guided progressive pruning and merging of vision tokens, and EViT as its text-free
special case.

Papers: "ELIP: Efficient Language-Image Pre-training with Fewer Vision Tokens" (Guo et al., 2023,
arXiv 2309.16738); "Not All Patches are What You Need" (EViT, Liang et al., ICLR 2022).

Read first: `Schedule` (stages as data), then `prune_and_fuse` (keep the top-K tokens in their
original order, fuse the rest into one), then `ELIP.score_lookahead` and `ELIP.before_block`.

At the start of each stage, ELIP asks "which tokens will the [CLS] attend to, once it knows what
the text is about?": it mixes the text's [CLS] into a detached copy of the vision [CLS]
(lambda x_cls + (1 - lambda) t), runs the copy through the stage's blocks under no_grad (the
look-ahead), and scores each token by the head-averaged [CLS] attention at the stage's last
block. It has no trainable parameters. With `lookahead=False` it scores with the [CLS] attention
the real forward computed at the block just before the stage, and prunes between that block's
attention and MLP: no extra compute, but the text can no longer steer the choice. That variant
with lambda = 1 and EViT's schedule is EViT (`evit`).

Everything is batched: one topk, one gather and one weighted sum per stage, no per-sample loops
and no copies of blocks (the look-ahead calls the real blocks under no_grad).

Ours, off by default (`--fused-prop-attn` in train.py): the fused token stands for
every pruned patch but, as one key among many, draws the attention of one. With `prop_attn` it
attends with log(size) added to its logits (ToMe's proportional attention), as if its patches
were all still there. On the small shapes model that decides whether pruning works at all: see
docs/RESULTS.md, "ELIP and EViT".

Ours too, off by default (`--rollout`): the look-ahead reads the [CLS] row at the
stage's LAST block, but the tokens there are mixtures of the tokens entering the stage, the ones
being pruned. Deep in a trained model the [CLS] attends to a few tokens that have already gathered
each object, and the object's other tokens then score below the background. With `rollout` the
row is carried back through the stage's earlier blocks by attention rollout (Abnar & Zuidema
2020): each block maps a token to 0.5 itself (the residual) + 0.5 its head-averaged attention
row, so token j's score is the share of what the [CLS] reads at the last block that came from
token j. See docs/RESULTS.md, "Token relevance".
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from vit import Reducer, Tokens, size_bias

AUTHORS_DEPTH = 12
AUTHORS_SCHEDULE = dict(begin_layers=(2, 4, 10), num_layers=(2, 6, 2), keep_ratios=(0.90, 0.65, 0.40))
EVIT_LAYERS, EVIT_KEEP = (3, 6, 9), 0.7
EVIT_KEEP_WARMUP = 0.1  # EViT lowers the keep rate from 1 to its target early in training: here over a tenth of the steps


@dataclass(frozen=True)
class Schedule:
    """Stages of pruning. Stage s prunes before block begin_layers[s], keeping keep_ratios[s] of
    the ORIGINAL patch count, and covers num_layers[s] blocks (its look-ahead)."""
    begin_layers: tuple
    num_layers: tuple
    keep_ratios: tuple

    def keep_counts(self, num_patches: int) -> list:
        return [int(r * num_patches + 1e-9) for r in self.keep_ratios]

    def validate(self, depth: int, num_patches: int):
        """Stops with a message naming the offending entry."""
        b, n, r = self.begin_layers, self.num_layers, self.keep_ratios
        if not len(b) == len(n) == len(r):
            raise ValueError(f"schedule lists differ in length: begin_layers {b}, num_layers {n}, keep_ratios {r}")
        available = num_patches
        for s in range(len(b)):
            if n[s] < 1:
                raise ValueError(f"schedule stage {s}: num_layers {n[s]} must be at least 1")
            if b[s] < 0 or b[s] + n[s] > depth:
                raise ValueError(f"schedule stage {s}: blocks {b[s]}..{b[s] + n[s] - 1} run past the depth {depth}")
            if s and b[s] < b[s - 1] + n[s - 1]:
                raise ValueError(f"schedule stage {s} (begin {b[s]}) overlaps stage {s - 1} "
                                 f"(blocks {b[s - 1]}..{b[s - 1] + n[s - 1] - 1})")
            keep = self.keep_counts(num_patches)[s]
            if not 0 < r[s] <= 1 or keep < 1:
                raise ValueError(f"schedule stage {s}: keep ratio {r[s]} must be in (0, 1] and keep a token")
            if keep > available:
                raise ValueError(f"schedule stage {s}: keeps {keep} tokens but only {available} exist there")
            available = keep + 1  # the kept tokens and the fused one


def scaled_schedule(depth: int) -> Schedule:
    """The authors' 12-layer schedule mapped onto `depth` blocks: stage starts scale with depth,
    each stage runs to the next stage's start (the last to the end), keep ratios unchanged.
    depth 12 gives the authors' exactly; depth 6 gives begins (1, 2, 5), layers (1, 3, 1)."""
    begins = []
    for b in AUTHORS_SCHEDULE["begin_layers"]:
        begins.append(max(round(b * depth / AUTHORS_DEPTH), begins[-1] + 1 if begins else 1))
    ends = begins[1:] + [depth]
    return Schedule(tuple(begins), tuple(e - b for b, e in zip(begins, ends)), AUTHORS_SCHEDULE["keep_ratios"])


def evit_schedule(depth: int, keep_rate: float = EVIT_KEEP) -> Schedule:
    """EViT's: prune inside layers (3, 6, 9) of 12, scaled to depth, each keeping `keep_rate` of
    the tokens there; in ELIP's terms stage s begins one block after the pruning layer."""
    layers = [max(1, round(l * depth / AUTHORS_DEPTH)) for l in EVIT_LAYERS]
    begins = tuple(l + 1 for l in layers)
    ends = begins[1:] + (depth,)
    return Schedule(begins, tuple(e - b for b, e in zip(begins, ends)),
                    tuple(keep_rate ** (s + 1) for s in range(len(begins))))


def fused_token(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ONE token from tokens x (B, M, D): their mean weighted by weights (B, M), which are zero on
    the tokens it does not hold -> (B, 1, D). The fused token of ELIP, EViT and Patch Ranking."""
    w = weights / (weights.sum(1, keepdim=True) + 1e-6)
    return (w.to(x.dtype)[..., None] * x).sum(1, keepdim=True)


def prune_and_fuse(tokens: Tokens, scores: torch.Tensor, keep: int) -> Tokens:
    """Keep [CLS] and the `keep` highest-scoring other tokens in their original order; fuse the
    rest into ONE token appended at the end, weighted by their normalised scores. The weights
    carry no gradient; the fused token values do.  scores: (B, N-1) over the non-[CLS] tokens."""
    B, M = scores.shape
    scores = scores.detach().float()
    top = scores.topk(keep, dim=1).indices.sort(dim=1).values  # (B, K), original order
    cls = torch.zeros(B, 1, dtype=top.dtype, device=top.device)
    kept = tokens.gather(torch.cat([cls, top + 1], 1))  # (B, 1+K, ...)
    if keep == M:
        return kept
    pruned = torch.ones(B, M, dtype=torch.bool, device=scores.device).scatter(1, top, False)
    x = fused_token(tokens.x[:, 1:], scores * pruned)  # (B, 1, D); the weights are zero on kept tokens
    size = (pruned * tokens.size[:, 1:]).sum(1, keepdim=True)
    source = None
    if tokens.source is not None:
        source = (pruned[..., None] * tokens.source[:, 1:]).sum(1, keepdim=True)  # (B, 1, 1+P)
        source = torch.cat([kept.source, source], 1)
    return Tokens(torch.cat([kept.x, x], 1), torch.cat([kept.size, size], 1), source)


class ELIP(Reducer):
    """The reducer. `text` (B, D_vit) is the detached text [CLS] in ViT width, or None (no
    guidance: lambda is then 1). `keep_scale` multiplies every keep ratio's pruned share, for
    EViT's keep-rate warm-up (0: no pruning, 1: the schedule). `prop_attn` (ours, off in the
    papers): the fused token attends with ToMe's proportional attention, log of the number of
    patches it stands for, so the attention the pruned tokens drew is not lost with them."""

    def __init__(self, schedule: Schedule, num_patches: int, text: Optional[torch.Tensor] = None,
                 lam: float = 0.8, lookahead: bool = True, keep_scale: float = 1.0, prop_attn: bool = False,
                 rollout: bool = False):
        if not lookahead and schedule.begin_layers[0] < 1:
            raise ValueError("ELIP without look-ahead scores with the previous block's attention: "
                             "the first stage must begin at block 1 or later")
        self.schedule, self.text, self.lookahead, self.prop_attn = schedule, text, lookahead, prop_attn
        self.rollout = rollout
        self.num_tokens = 1 + num_patches
        self.lam = 1.0 if text is None else lam
        self.stages = {b: (n, self.scaled_keep(k, num_patches, keep_scale)) for b, n, k in
                       zip(schedule.begin_layers, schedule.num_layers, schedule.keep_counts(num_patches))}
        self.scores = {}  # stage begin -> (B, M) scores, kept for inspection

    @staticmethod
    def scaled_keep(keep, num_patches, keep_scale):
        return num_patches - math.floor((num_patches - keep) * keep_scale + 1e-9)

    def attn_bias(self, tokens):
        # only once a fused token exists: before that log(size) is all zeros and SDPA's fast path is kept
        if not self.prop_attn or tokens.size.shape[1] == self.num_tokens:
            return None
        return size_bias(tokens.size)

    # with look-ahead: prune before the stage's first block
    def before_block(self, i, tokens, vit):
        if not self.lookahead or i not in self.stages:
            return tokens
        n, keep = self.stages[i]
        self.scores[i] = self.score_lookahead(vit, i, n, tokens.x, self.attn_bias(tokens))
        return self.prune(tokens, self.scores[i], keep)

    @torch.no_grad()
    def score_lookahead(self, vit, begin, n, x, bias=None) -> torch.Tensor:
        """Head-averaged attention of the text-aware [CLS] over the tokens, at the stage's last
        block, after running a detached copy through the stage (with the real forward's attention
        bias): (B, N-1). With `rollout`, that row is carried back through the attention maps of the
        stage's earlier blocks to the tokens entering the stage, the ones being pruned."""
        x = x.detach().clone()
        if self.text is not None:
            x[:, 0] = self.lam * x[:, 0] + (1 - self.lam) * self.text.to(x.dtype)
        maps = []
        for j in range(begin, begin + n - 1):
            x, stats = vit.blocks[j].attend(x, bias, want=("attn_map",) if self.rollout else ())
            if self.rollout:
                maps.append(stats["attn_map"])  # (B, N, N)
            x = vit.blocks[j].feed_forward(x)
        score = vit.blocks[begin + n - 1].cls_attention(x, bias)  # the last block: its [CLS] row only, (B, N)
        for a in reversed(maps):  # a token leaving block j is half itself (the residual), half what it attended to
            score = 0.5 * score + 0.5 * (score[:, None] @ a)[:, 0]
        return score[:, 1:]

    # without look-ahead: prune between attention and MLP of the block before the stage
    def wants(self, i):
        return ("cls_attn",) if not self.lookahead and i + 1 in self.stages else ()

    def after_attn(self, i, tokens, stats):
        if self.lookahead or i + 1 not in self.stages:
            return tokens
        self.scores[i + 1] = stats["cls_attn"][:, 1:]
        return self.prune(tokens, self.scores[i + 1], self.stages[i + 1][1])

    def prune(self, tokens, scores, keep):
        return prune_and_fuse(tokens, scores, min(keep, scores.shape[1]))


def evit(depth: int, num_patches: int, keep_rate: float = EVIT_KEEP, keep_scale: float = 1.0,
         prop_attn: bool = False) -> ELIP:
    """EViT = ELIP with no text (lambda = 1), no look-ahead, and EViT's schedule."""
    return ELIP(evit_schedule(depth, keep_rate), num_patches, text=None, lookahead=False, keep_scale=keep_scale,
                prop_attn=prop_attn)


class RandomPrune(ELIP):
    """The control for token relevance: ELIP's schedule and fusion, random scores."""

    def __init__(self, schedule: Schedule, num_patches: int, generator: Optional[torch.Generator] = None,
                 prop_attn: bool = False):
        super().__init__(schedule, num_patches, text=None, prop_attn=prop_attn)
        self.generator = generator

    def score_lookahead(self, vit, begin, n, x, bias=None):
        return torch.rand(x.shape[0], x.shape[1] - 1, generator=self.generator).to(x.device)
