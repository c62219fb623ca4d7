"""
Token merging: ToMe's bipartite soft matching, ToMe as a ViT reducer, and the EVLGen bridge that
merges visual tokens on their way into a frozen language model.

Papers: "Token Merging: Your ViT but Faster" (ToMe, Bolya et al., ICLR 2023); "Expedited Training
of Visual Conditioned Language Generation via Redundancy Reduction" (EVLGen, Jian et al., ACL 2024).

Read first: `bipartite_soft_matching` (which tokens merge), then `merge_tokens` (how values, sizes
and sources combine), then `ToMe` (the reducer: merge r tokens between attention and MLP of every
block) and `MergingBridge` (the same inside EVLGen's bridge). For video, `TemporalAttention` and
`TemporalContext` (EVLGen's soft attentive temporal token contextualizing) at the end.

Matching in one paragraph. Split the tokens alternately into A (even positions: [CLS], 2, 4 ...)
and B (odd). Score every A-B pair by the cosine of their metric (the attention keys averaged
over heads: tokens that the block already treats alike). Each A token picks its most similar B
token; the r A tokens with the best picks merge into them. The [CLS] (in A) never merges. The
output is [the A tokens that did not merge, in their original order ([CLS] first), then B].
Merged values are size-weighted means (sizes add up), and proportional attention adds log(size)
to every key's logits so a token that stands for s patches weighs as much as s copies of itself.

Ties are broken towards the earlier token: among equal best matches an A token picks the first
B token, and among equally good A tokens the earlier one merges first.
"""
import math
from typing import Callable, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit import Block, Reducer, Tokens, run_block, size_bias

MERGE_MODES = ("wavg", "mean")  # ToMe's size-weighted average; EVLGen's plain average


def identity(x, mode="sum"):
    return x


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = True):
    """metric (B, N, C) -> (merge, unmerge) for removing r tokens, r capped at what A can give.
    merge(x (B, N, ...), mode) -> (B, N - r, ...) combines the sources into their destination by
    `mode` ("sum", "mean" or "amax", as scatter_reduce with the destination included);
    unmerge(y (B, N - r, ...)) -> (B, N, ...) copies each output back onto every input it holds."""
    N = metric.shape[1]
    r = min(r, (N - int(class_token)) // 2)
    if r <= 0:
        return identity, identity
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]  # (B, Na, C), (B, Nb, C)
        scores = a @ b.transpose(-1, -2)  # (B, Na, Nb): cosine similarities
        if class_token:
            scores[:, 0] = -math.inf
        best, best_b = scores.max(dim=-1)  # (B, Na): each A token's best B partner
        order = best.argsort(dim=-1, descending=True, stable=True)  # (B, Na)
        src = order[:, :r]  # A tokens that merge
        kept_a = order[:, r:].sort(dim=-1).values  # A tokens that stay, original order ([CLS] first)
        dst = best_b.gather(1, src)  # (B, r): their B destinations

    def expand(idx, x):
        return idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        xa, xb = x[:, ::2], x[:, 1::2]
        stay = xa.gather(1, expand(kept_a, xa))
        moving = xa.gather(1, expand(src, xa))
        xb = xb.scatter_reduce(1, expand(dst, moving), moving, reduce=mode, include_self=True)
        return torch.cat([stay, xb], 1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        n_stay = kept_a.shape[1]
        stay, yb = y[:, :n_stay], y[:, n_stay:]
        out = y.new_zeros(y.shape[0], N, *y.shape[2:])
        ya = y.new_zeros(y.shape[0], (N + 1) // 2, *y.shape[2:])
        ya = ya.scatter(1, expand(kept_a, stay), stay)
        ya = ya.scatter(1, expand(src, stay), yb.gather(1, expand(dst, yb)))
        out[:, ::2], out[:, 1::2] = ya, yb
        return out

    return merge, unmerge


def merge_tokens(merge: Callable, tokens: Tokens, mode: str = "wavg") -> Tokens:
    """Apply a matching to values, sizes and sources. "wavg": size-weighted mean (ToMe);
    "mean": the plain mean of the merged tokens (EVLGen). Sizes and sources always add up."""
    size = merge(tokens.size, "sum")
    if mode == "wavg":
        x = merge(tokens.x * tokens.size[..., None], "sum") / size[..., None]
    elif mode == "mean":
        x = merge(tokens.x, "mean")
    else:
        raise ValueError(f"merge mode {mode!r} is unknown (choose {' or '.join(MERGE_MODES)})")
    source = None if tokens.source is None else merge(tokens.source, "sum")
    return Tokens(x, size, source)


def merge_schedule(r: Union[int, Sequence[int]], depth: int, num_tokens: int, decreasing: bool = False,
                   class_token: bool = True):
    """Tokens merged in each of `depth` layers, each capped at what its layer can merge.
    r: a constant, or one value per layer; `decreasing`: ToMe's linear schedule from 2r down to 0
    (the same total). Returns (the capped list, a note on the caps or "")."""
    if isinstance(r, int):
        asked = [round(2 * r * (1 - i / (depth - 1))) if decreasing and depth > 1 else r for i in range(depth)]
    else:
        asked = list(r)
        if len(asked) != depth:
            raise ValueError(f"a per-layer r needs {depth} values (one per layer), got {len(asked)}")
    if any(v < 0 for v in asked):
        raise ValueError(f"r must not be negative, got {asked}")
    n, out, capped = num_tokens, [], []
    for i, v in enumerate(asked):
        allowed = (n - int(class_token)) // 2
        out.append(min(v, allowed))
        if v > allowed:
            capped.append(f"layer {i}: {v} -> {allowed}")
        n -= out[-1]
    note = f"r capped at what the tokens allow ({'; '.join(capped)})" if capped else ""
    return out, note


class ToMe(Reducer):
    """Merge r[i] tokens between attention and MLP of block i (ToMe). Parameter-free, so it runs
    off the shelf on any trained ViT as well as during training."""

    def __init__(self, r: Sequence[int], prop_attn: bool = True, mode: str = "wavg"):
        self.r, self.prop_attn, self.mode = list(r), prop_attn, mode

    def wants(self, i):
        return ("keys",) if self.r[i] > 0 else ()

    def attn_bias(self, tokens):
        return size_bias(tokens.size) if self.prop_attn else None

    def after_attn(self, i, tokens, stats):
        if self.r[i] <= 0:
            return tokens
        merge, _ = bipartite_soft_matching(stats["keys"], self.r[i], class_token=True)
        return merge_tokens(merge, tokens, self.mode)


def tome(depth: int, num_patches: int, r: Union[int, Sequence[int]] = 13, decreasing=False, **kw) -> ToMe:
    return ToMe(merge_schedule(r, depth, 1 + num_patches, decreasing)[0], **kw)


class MergingBridge(nn.Module):
    """EVLGen's bridge: a transformer encoder fed the ViT's tokens through a Linear, merging r[i]
    tokens between attention and MLP of layer i, keys averaged over heads as the metric and the
    [CLS] protected. Its blocks are text-encoder blocks, so a pre-trained text encoder's can be
    loaded (`load_blocks`), as EVLGen starts from BERT. With r = 0 it passes every token on.

    `num_positions` (ours, 0 in the paper): a learned position embedding added to the visual
    tokens after the Linear. Without it the bridge sees the tokens as a set (permuting them permutes
    its output), and where a token sat is only what the frozen ViT left of its own position
    embedding in it: too little, on the small ViT, to read a motion from the layout of the tokens."""

    def __init__(self, in_dim: int, width: int, depth: int, heads: int, r: Sequence[int],
                 mode: str = "mean", prop_attn: bool = False, ln_eps: float = 1e-6, num_positions: int = 0):
        super().__init__()
        self.input_proj = nn.Linear(in_dim, width)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, num_positions, width)) if num_positions else None
        self.blocks = nn.ModuleList(Block(width, heads, ln_eps=ln_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=ln_eps)
        self.merger = ToMe(r, prop_attn, mode)

    def load_blocks(self, blocks: nn.ModuleList):
        """Start from pre-trained transformer blocks of the same width (the first `depth` of them)."""
        for mine, theirs in zip(self.blocks, blocks):
            mine.load_state_dict(theirs.state_dict())

    def forward(self, x: torch.Tensor, track_source: bool = False) -> Tokens:
        """(B, N, in_dim) visual tokens, [CLS] first -> Tokens of (B, N - sum(r), width)."""
        B, N, _ = x.shape
        x = self.input_proj(x)
        if self.pos_embed is not None:
            if N != self.pos_embed.shape[1]:
                raise ValueError(f"the bridge's position embedding has {self.pos_embed.shape[1]} positions, got {N} tokens")
            x = x + self.pos_embed
        tokens = Tokens(x, x.new_ones(B, N),
                        torch.eye(N, device=x.device, dtype=x.dtype).expand(B, -1, -1) if track_source else None)
        for i, block in enumerate(self.blocks):
            tokens = run_block(block, i, tokens, self.merger)
        return tokens.replace(x=self.norm(tokens.x))


# ----------------------------------------------------------------------------------------------
# Video: soft attentive temporal token contextualizing (EVLGen)
#
# A frozen image ViT sees each of a clip's T frames alone. Between attention and MLP of every
# block, each spatial position looks at itself in the other frames: small multi-head query/key
# projections, the tokens themselves as values, the result added through a scalar gate that
# starts at 0, so at initialisation the ViT is exactly the image model. After the ViT the frames
# are averaged, and the bridge and the frozen LM see one image's worth of tokens.
#
# One addition of ours (`frame_embed=True`, train.py --frame-embed): a learned embedding of the frame index on the queries and
# keys (zero at the start). Without it, attention over frames treats them as a set: reversing the
# clip permutes the outputs the same way, and after averaging over frames a shape moving left
# gives exactly what the same shape moving right gives. `frame_embed=False` is the module as
# published, and the default.

class TemporalAttention(nn.Module):
    """x (B*T, N, C), frames of a clip consecutive -> x + alpha * (attention over the T frames at
    each position). q, k: Linear(C, dim) split into `heads`; v: x split into the same heads."""

    def __init__(self, width: int, heads: int, frames: int, dim: int, frame_embed: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"the temporal query/key width {dim} is not divisible by {heads} heads")
        self.heads, self.frames = heads, frames
        self.q = nn.Linear(width, dim)
        self.k = nn.Linear(width, dim)
        self.frame_embed = nn.Parameter(torch.zeros(frames, width)) if frame_embed else None
        self.alpha = nn.Parameter(torch.zeros(()))  # the gate: 0 = the image model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        BT, N, C = x.shape
        T, H = self.frames, self.heads
        if BT % T:
            raise ValueError(f"{BT} frames do not make clips of {T} frames")
        v = x.view(BT // T, T, N, C).transpose(1, 2)  # (B, N, T, C): each position's frames together
        h = v if self.frame_embed is None else v + self.frame_embed
        split = lambda t: t.unflatten(-1, (H, -1)).transpose(2, 3)  # (B, N, T, H*d) -> (B, N, H, T, d)
        out = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(v))  # (B, N, H, T, C/H)
        out = out.transpose(2, 3).flatten(-2).transpose(1, 2).reshape(BT, N, C)  # back to (B*T, N, C)
        return x + self.alpha.to(x.dtype) * out


class TemporalContext(nn.Module, Reducer):
    """One TemporalAttention per ViT block, hooked in between attention and MLP through the seam.
    Only these modules train in the ViT; the ViT needs no change."""

    def __init__(self, depth: int, width: int, heads: int, frames: int, dim: int = 0, frame_embed: bool = False):
        nn.Module.__init__(self)
        self.layers = nn.ModuleList(TemporalAttention(width, heads, frames, dim or width // 2, frame_embed)
                                    for _ in range(depth))

    def after_attn(self, i, tokens, stats):
        return tokens.replace(x=self.layers[i](tokens.x))

    def gates(self) -> list:
        """Each block's alpha: how far the model has moved from frame-by-frame."""
        return [layer.alpha.item() for layer in self.layers]
