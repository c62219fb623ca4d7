"""
The Vision Transformer, written from scratch, and the one seam where token reducers plug in.

Paper: "An Image is Worth 16x16 Words" (Dosovitskiy et al., ICLR 2021). Parameter names follow
timm's `VisionTransformer` (patch_embed.proj, cls_token, pos_embed, blocks.N.norm1, blocks.N.attn.qkv,
blocks.N.attn.proj, blocks.N.mlp.fc1 ...) so pretrained checkpoints map on with a short rename table.

Read first: `Attention` (SDPA with an additive bias, plus the [CLS] attention row on request), then
`Block` (split into `attend` and `feed_forward` so a reducer can act between them), then
`Tokens` and `Reducer` (the seam), then `ViT.forward_tokens`.

The seam. A reducer sees the token sequence as `Tokens(x, size, source)`:
  x      (B, N, D)    token values, [CLS] at index 0
  size   (B, N)       how many original tokens each token stands for ([CLS] = 1)
  source (B, N, 1+P)  optional 0/1 map: which original tokens ([CLS], then the P patches) it holds
It may act at two hook points of every block i:
  - `before_block(i, tokens, vit)`: before block i runs (ELIP, Patch Ranking prune here);
  - `after_attn(i, tokens, stats)`: between attention and MLP of block i (ToMe, EViT act here),
    where `stats` holds what the block measured on request (`wants(i)`): "cls_attn", the
    head-averaged [CLS] attention row (B, N), "keys", the keys averaged over heads (B, N, d), and
    "attn_map", the whole head-averaged attention matrix (B, N, N).
It may also add an attention bias (`attn_bias`, e.g. ToMe's proportional attention, log size).
The ViT knows nothing of any method: a new reducer subclasses `Reducer`, never edits this file.
`Observed` wraps any reducer to measure what it does (eval.py's stages, bench.py's token counts).
"""
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ViTConfig:
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    act: str = "gelu"  # "gelu" (timm), "gelu_tanh" (GPT-2), "quick_gelu" (OpenAI CLIP)
    ln_eps: float = 1e-6  # timm's ViT uses 1e-6; OpenAI CLIP and GPT-2 use 1e-5
    pre_norm: bool = False  # OpenAI CLIP's extra LayerNorm after the embeddings ("ln_pre")
    dropout: float = 0.0

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not divisible by patch size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# The standard ViTs (timm's vit_*_patch16_224) and the small default that trains on a laptop CPU.
PRESETS = {
    "tiny64": dict(image_size=64, patch_size=8, width=128, depth=6, heads=4),
    "vit_ti16": dict(image_size=224, patch_size=16, width=192, depth=12, heads=3),
    "vit_s16": dict(image_size=224, patch_size=16, width=384, depth=12, heads=6),
    "vit_b16": dict(image_size=224, patch_size=16, width=768, depth=12, heads=12),
}


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r} (choose gelu, gelu_tanh or quick_gelu)")


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Attention(nn.Module):
    """Multi-head self-attention through SDPA. Extra logits come in as an additive bias so the
    fused kernels stay in use; what a reducer wants to know is computed beside, not instead."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def qkv_heads(self, x):
        """(B, N, D) -> q, k, v, each (B, H, N, d)."""
        B, N, _ = x.shape
        return self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x, attn_bias=None, is_causal=False, want=()):
        B, N, D = x.shape
        q, k, v = self.qkv_heads(x)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=is_causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)
        stats = {}
        if "cls_attn" in want:
            stats["cls_attn"] = self.cls_attention(q, k, attn_bias)
        if "keys" in want:
            stats["keys"] = k.mean(1)  # (B, N, d): ToMe's similarity metric
        if "attn_map" in want:
            stats["attn_map"] = self.attention_map(q, k, attn_bias)
        return out, stats

    def cls_attention(self, q, k, attn_bias=None):
        """Head-averaged attention probabilities of the [CLS] query over all N keys, (B, N).
        One row of the attention matrix, recomputed (SDPA never returns probabilities): O(N d)."""
        return self.attention_map(q[:, :, :1], k, None if attn_bias is None else attn_bias[..., :1, :])[:, 0]

    def attention_map(self, q, k, attn_bias=None):
        """Head-averaged attention probabilities of the given queries (B, H, M, d) over all N keys,
        (B, M, N), recomputed beside SDPA; all N queries (ELIP's rollout) cost O(N^2 d) again."""
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, M, N)
        if attn_bias is not None:
            logits = logits + attn_bias
        return logits.float().softmax(-1).mean(1)


class Block(nn.Module):
    """Pre-norm transformer block. `attend` and `feed_forward` are its two halves; a reducer's
    `after_attn` hook runs between them."""

    def __init__(self, dim, heads, mlp_ratio=4.0, act="gelu", ln_eps=1e-6, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act, dropout)
        self.grad_checkpointing = False  # set_grad_checkpointing

    def attend(self, x, attn_bias=None, is_causal=False, want=()):
        a, stats = self.attn(self.norm1(x), attn_bias, is_causal, want)
        return x + a, stats

    def feed_forward(self, x):
        if self.grad_checkpointing and torch.is_grad_enabled():  # keep x only; recompute the MLP in backward
            return x + checkpoint(lambda y: self.mlp(self.norm2(y)), x, use_reentrant=False)
        return x + self.mlp(self.norm2(x))

    def cls_attention(self, x, attn_bias=None) -> torch.Tensor:
        """Only the head-averaged [CLS] attention row this block would compute on x, (B, N):
        the qkv projection and one row of logits, no attention output, no MLP."""
        q, k, _ = self.attn.qkv_heads(self.norm1(x))
        return self.attn.cls_attention(q, k, None if attn_bias is None else attn_bias.to(q.dtype))

    def forward(self, x, attn_bias=None, is_causal=False, return_cls_attn=False):
        x, stats = self.attend(x, attn_bias, is_causal, ("cls_attn",) if return_cls_attn else ())
        x = self.feed_forward(x)
        return (x, stats["cls_attn"]) if return_cls_attn else x


def set_grad_checkpointing(model: nn.Module, on: bool = True):
    """Activation checkpointing, as open_clip offers it, for the MLP half of every Block: its
    activations (4x the width) are the largest and are recomputed in the backward pass. The
    attention half stays as it is: a reducer's hooks run there, and must run once."""
    for module in model.modules():
        if isinstance(module, Block):
            module.grad_checkpointing = on


@dataclass
class Tokens:
    """The token sequence and what each token stands for; see the module docstring."""
    x: torch.Tensor
    size: torch.Tensor
    source: Optional[torch.Tensor] = None

    def replace(self, **kw) -> "Tokens":
        return replace(self, **kw)

    def gather(self, idx: torch.Tensor) -> "Tokens":
        """Keep the tokens at `idx` (B, K), in that order."""
        take = lambda t: t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))
        return Tokens(take(self.x), take(self.size), None if self.source is None else take(self.source))


def size_bias(size: torch.Tensor) -> torch.Tensor:
    """Proportional attention (ToMe): (B, N) sizes -> (B, 1, 1, N) additive logits log(size), so a
    token standing for s originals gets the attention s identical copies of it would get."""
    return size.log()[:, None, None, :]


class Reducer:
    """The seam. Subclass and override what you need; the defaults change nothing."""

    def wants(self, i: int) -> tuple:
        """What block i's attention must report to `after_attn`: a subset of ("cls_attn", "keys", "attn_map")."""
        return ()

    def attn_bias(self, tokens: Tokens) -> Optional[torch.Tensor]:
        """An additive attention bias broadcastable to (B, H, N, N), or None."""
        return None

    def before_block(self, i: int, tokens: Tokens, vit: "ViT") -> Tokens:
        return tokens

    def after_attn(self, i: int, tokens: Tokens, stats: dict) -> Tokens:
        return tokens


class Observed(Reducer):
    """Wraps a reducer (or none) and reports every hook's input and output to `observe`: a way to
    measure what any method does (token counts, stages) without touching it."""

    def __init__(self, inner: Optional[Reducer] = None):
        self.inner = inner if inner is not None else Reducer()

    def wants(self, i):
        return self.inner.wants(i)

    def attn_bias(self, tokens):
        return self.inner.attn_bias(tokens)

    def before_block(self, i, tokens, vit):
        out = self.inner.before_block(i, tokens, vit)
        self.observe(i, "before_block", tokens, out)
        return out

    def after_attn(self, i, tokens, stats):
        out = self.inner.after_attn(i, tokens, stats)
        self.observe(i, "after_attn", tokens, out)
        return out

    def observe(self, i: int, hook: str, before: Tokens, after: Tokens):
        pass


def run_block(block: Block, i: int, tokens: Tokens, reducer: Reducer) -> Tokens:
    """A block (number i of its stack) with the reducer's attention bias and its `after_attn` hook
    between attention and MLP; any transformer stack of Blocks can be reduced this way."""
    x, stats = block.attend(tokens.x, reducer.attn_bias(tokens), want=reducer.wants(i))
    tokens = reducer.after_attn(i, tokens.replace(x=x), stats)
    return tokens.replace(x=block.feed_forward(tokens.x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, width):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images):
        x = self.proj(images)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2), x.shape[-2:]  # (B, P, D), grid


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.patch_embed = PatchEmbed(cfg.patch_size, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + cfg.num_patches, D) * 0.02)
        self.norm_pre = nn.LayerNorm(D, eps=cfg.ln_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps, cfg.dropout)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.apply(init_weights)
        nn.init.normal_(self.cls_token, std=1e-6)

    def position_embedding(self, grid) -> torch.Tensor:
        """The learned position embeddings, bicubically resized when the patch grid differs."""
        return resize_pos_embed(self.pos_embed, grid)

    def embed(self, images: torch.Tensor, track_source: bool = False) -> Tokens:
        x, grid = self.patch_embed(images)  # (B, P, D)
        B, P, _ = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], 1) + self.position_embedding(grid)
        x = self.norm_pre(x)
        size = torch.ones(B, 1 + P, device=x.device, dtype=x.dtype)
        source = torch.eye(1 + P, device=x.device, dtype=x.dtype).expand(B, -1, -1) if track_source else None
        return Tokens(x, size, source)

    def run_block(self, i: int, tokens: Tokens, reducer: Optional[Reducer] = None) -> Tokens:
        """Block i with both hook points of the seam."""
        if reducer is None:
            return tokens.replace(x=self.blocks[i](tokens.x))
        return run_block(self.blocks[i], i, reducer.before_block(i, tokens, self), reducer)

    def forward_tokens(self, images, reducer: Optional[Reducer] = None, track_source=False) -> Tokens:
        """All output tokens after the final norm, with their sizes and sources."""
        tokens = self.embed(images, track_source)
        for i in range(len(self.blocks)):
            tokens = self.run_block(i, tokens, reducer)
        return tokens.replace(x=self.norm(tokens.x))

    def forward(self, images, reducer: Optional[Reducer] = None) -> torch.Tensor:
        """The pooled image feature: the [CLS] output, (B, D)."""
        return self.forward_tokens(images, reducer).x[:, 0]


def init_weights(m: nn.Module):
    """timm's ViT init: truncated normal (std 0.02) for Linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# timm checkpoints: the parameter names are already timm's, so loading is shape inference + checks

def resize_pos_embed(pos_embed: torch.Tensor, grid) -> torch.Tensor:
    """(1, 1 + n*n, D) position embeddings ([CLS] first) -> (1, 1 + h*w, D) for a (h, w) patch
    grid: the patches' part resized bicubically as an image, [CLS]'s kept."""
    n = math.isqrt(pos_embed.shape[1] - 1)
    if tuple(grid) == (n, n):
        return pos_embed
    patch_pos = pos_embed[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)  # (1, D, n, n)
    patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], patch_pos.flatten(2).transpose(1, 2)], 1)


def timm_config(state: dict, ln_eps: float = 1e-6, act: str = "gelu", head_dim: int = 64) -> ViTConfig:
    """The ViTConfig of a timm `VisionTransformer` state dict, from its tensor shapes: width and
    patch size from the patch embedding, depth from the block numbers, image size from the position
    embeddings, heads = width / head_dim, the MLP ratio, and a pre-norm if `norm_pre` is there.
    LayerNorm eps and the activation are not in the tensors: timm's defaults unless given."""
    if "cls_token" not in state or "pos_embed" not in state:
        raise ValueError("the state dict has no cls_token / pos_embed: this ViT pools the class token")
    D, _, p, _ = state["patch_embed.proj.weight"].shape
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    side = math.isqrt(state["pos_embed"].shape[1] - 1)
    if side * side != state["pos_embed"].shape[1] - 1:
        raise ValueError(f"pos_embed holds {state['pos_embed'].shape[1]} positions: not 1 + a square grid")
    return ViTConfig(image_size=side * p, patch_size=p, width=D, depth=len(blocks), heads=max(1, D // head_dim),
                     mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / D, act=act, ln_eps=ln_eps,
                     pre_norm="norm_pre.weight" in state)


TIMM_IGNORED = ("head.weight", "head.bias")  # the classifier: the image feature is the [CLS] before it


def load_timm(state: dict, **config) -> ViT:
    """A ViT with the weights of a timm `VisionTransformer` state dict (class-token pooling), the
    plain ViTs and timm's CLIP image towers (vit_*_clip_*: no patch-embedding bias, which reads as
    zero; `norm_pre`; the projection in `head`, see `timm_projection`). Give CLIP towers the
    activation they use (act="quick_gelu" for OpenAI's weights) and ln_eps=1e-5. Keys it does not
    know (layer scale, a global-pool norm, registers ...) or keys it lacks stop with a message
    listing them: never a partial load."""
    vit = ViT(timm_config(state, **config))
    load_exactly(vit, from_timm(state), "the timm state dict")
    return vit.eval()


def from_timm(state: dict) -> dict:
    """A timm ViT state dict as this ViT loads it: the head (a classifier, or a CLIP tower's
    projection) left out, and a missing patch-embedding bias (timm's CLIP towers) read as zero."""
    state = {k: v for k, v in state.items() if k not in TIMM_IGNORED}
    if "patch_embed.proj.weight" in state and "patch_embed.proj.bias" not in state:
        state["patch_embed.proj.bias"] = torch.zeros(state["patch_embed.proj.weight"].shape[0])
    return state


def timm_projection(state: dict) -> Optional[torch.Tensor]:
    """The (E, D) projection of a timm CLIP image tower (its `head`), or None; for a plain ViT the
    head is a classifier and this is its weight."""
    return state.get("head.weight")


def load_exactly(module: nn.Module, state: dict, what: str, show: int = 20):
    """load_state_dict that first stops with one sentence listing every key that is missing,
    unexpected or of the wrong shape (the first `show` of each): never a partial load."""
    ours = module.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    wrong = sorted(k for k in set(ours) & set(state) if ours[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{what} does not fit: missing {missing[:show]}, unexpected {unexpected[:show]}, "
                         f"wrong shape {wrong[:show]}")
    module.load_state_dict(state)


def vit_config(preset: str = "tiny64", **overrides) -> ViTConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown ViT preset {preset!r} (choose from {', '.join(PRESETS)})")
    return ViTConfig(**{**PRESETS[preset], **overrides})
