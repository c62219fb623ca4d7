"""
The captioner of EVLGen ("Expedited Training of Visual Conditioned Language Generation via
Redundancy Reduction", Jian et al., ACL 2024) with BLIP-2's learned-query bridge (Li et al., 2023)
as the baseline: ViT -> bridge -> Linear -> soft prompt -> FROZEN language model, one loss.

Read first: `CaptionerConfig`, then `Captioner.forward` (the prompt, then the frozen LM's loss on
the caption). The merging bridge itself is merge.py's `MergingBridge`.
"""
import json
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import DataError
from merge import MergingBridge, TemporalContext
from model import contrastive_loss, matching_loss
from text import PAD, CausalLM, FusionBlock, FusionEncoder, LMConfig, TextConfig, TextEncoder
from vit import Tokens, ViT, ViTConfig, init_weights

BRIDGES = ("merge", "query")
REMOVED = {"temporal_causal": False, "weighted_words": (), "word_weight": 1.0}  # studies since removed, and their "off"


@dataclass
class CaptionerConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    text: TextConfig = field(default_factory=TextConfig)  # the bridge's blocks; the stage-1 text encoder
    bridge: str = "merge"  # merge: EVLGen's merging encoder; query: BLIP-2's learned queries
    bridge_depth: int = 2
    r: tuple = (16, 16)  # tokens merged in each bridge layer (merge); all zero: every token to the LM
    merge_mode: str = "mean"  # the plain mean of merged tokens, as EVLGen publishes; wavg (ours): size-weighted
    prop_attn: bool = False  # ours: proportional attention in the bridge (with wavg)
    bridge_pos: bool = False  # ours (merge): a learned position embedding on the bridge's visual tokens
    num_queries: int = 32  # learned queries (query)
    freeze_vit: bool = True
    stage1: bool = False  # also build BLIP-2's stage-1 heads (ITC and ITM between queries and text)
    embed_dim: int = 128
    frames: int = 1  # > 1: video clips of this many frames, averaged after the ViT
    temporal: bool = False  # video: EVLGen's temporal contextualizer in every ViT block (the only ViT part trained)
    temporal_dim: int = 0  # its query/key width; 0: half the ViT width
    frame_embed: bool = False  # ours: a learned frame-index embedding (the module as published is blind to frame order)

    def __post_init__(self):
        self.r = tuple(self.r)
        if self.bridge not in BRIDGES:
            raise ValueError(f"bridge {self.bridge!r} is unknown (choose {' or '.join(BRIDGES)})")
        if self.bridge == "merge" and len(self.r) != self.bridge_depth:
            raise ValueError(f"r needs one value per bridge layer ({self.bridge_depth}), got {self.r}")
        if self.temporal and self.frames < 2:
            raise ValueError(f"the temporal contextualizer needs clips of at least 2 frames, got {self.frames}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "CaptionerConfig":
        for key in (k for k, off in REMOVED.items() if json.dumps(d.get(k, off)) != json.dumps(off)):
            raise DataError(f"this captioner was trained with {key}={d[key]!r}, a study since removed from the code: "
                            f"read it with the commit that made it (git log -S{key})")
        return cls(vision=ViTConfig(**d["vision"]), lm=LMConfig(**d["lm"]), text=TextConfig(**d["text"]),
                   **{k: v for k, v in d.items() if k not in ("vision", "lm", "text", *REMOVED)})


class QueryBridge(nn.Module):
    """BLIP-2's bridge, small: learned query tokens that self-attend and cross-attend to the
    visual tokens (fusion blocks), so the LM always sees `num_queries` tokens."""

    def __init__(self, in_dim, width, depth, heads, num_queries, ln_eps=1e-6):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)
        self.blocks = nn.ModuleList(FusionBlock(width, in_dim, heads, ln_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=ln_eps)
        self.apply(init_weights)

    def load_blocks(self, blocks: nn.ModuleList):
        """Self-attention and MLP from pre-trained blocks (BLIP-2 starts from BERT); cross-attention stays new."""
        for mine, theirs in zip(self.blocks, blocks):
            mine.block.load_state_dict(theirs.state_dict())

    def forward(self, x, track_source=False) -> Tokens:
        q = self.query_tokens.expand(x.shape[0], -1, -1)  # (B, M, D)
        for block in self.blocks:
            q = block(q, x, None)
        return Tokens(self.norm(q), q.new_ones(q.shape[:2]))


def pack(ids: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L) padded texts -> (R, length): their tokens end to end ([CLS] ... [SEP] [CLS] ...),
    cut into rows of `length`; the tail that does not fill a row is dropped."""
    stream = ids[ids != PAD]  # row-major: the texts in batch order
    rows = max(1, stream.numel() // length)
    return stream[:rows * length].view(rows, -1)


class LanguageModel(nn.Module):
    """The causal LM trained on caption text alone (`train.py --method lm`); the captioner loads
    its `lm.*` weights and freezes them. Texts are packed into full-context rows, as GPT-style
    pre-training does: every position gets trained, and the captioner will put its caption after
    a soft prompt, at positions a short caption alone would never reach."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.lm = CausalLM(cfg)

    def forward(self, images, ids, reducer_fn=None, generator=None) -> dict:
        loss = self.lm.loss(pack(ids, self.cfg.context_length))
        return dict(lm=loss, loss=loss)


class Captioner(nn.Module):
    """ViT -> bridge -> Linear -> soft prompt prepended to the caption's embeddings in the frozen
    LM; one loss, the LM's next-token cross-entropy on the caption. With `stage1`, the query
    bridge can first be trained BLIP-2's way (ITC + ITM against text, `stage = 1`)."""

    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        self.cfg = cfg
        v, t = cfg.vision, cfg.text
        self.visual = ViT(v)
        if cfg.bridge == "merge":
            self.bridge = MergingBridge(v.width, t.width, cfg.bridge_depth, t.heads, cfg.r, cfg.merge_mode,
                                        cfg.prop_attn, t.ln_eps, 1 + v.num_patches if cfg.bridge_pos else 0)
        else:
            self.bridge = QueryBridge(v.width, t.width, cfg.bridge_depth, t.heads, cfg.num_queries, t.ln_eps)
        self.temporal = TemporalContext(v.depth, v.width, v.heads, cfg.frames, cfg.temporal_dim,
                                        cfg.frame_embed) if cfg.temporal else None
        self.lm_proj = nn.Linear(t.width, cfg.lm.width)
        self.lm = CausalLM(cfg.lm)
        self.lm.requires_grad_(False)
        if cfg.freeze_vit:
            self.visual.requires_grad_(False)
        if cfg.stage1:
            self.text = TextEncoder(t)
            self.query_proj = nn.Linear(t.width, cfg.embed_dim, bias=False)
            self.text_proj = nn.Linear(t.width, cfg.embed_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            self.fusion = FusionEncoder(t.width, t.width, t.heads, 2, t.ln_eps)
            self.itm_head = nn.Linear(t.width, 2)
        self.stage = 2

    def train(self, mode: bool = True):
        """The frozen parts stay in eval mode (no dropout, as frozen weights are used at inference)."""
        super().train(mode)
        self.lm.eval()
        if self.cfg.freeze_vit:
            self.visual.eval()
        return self

    def visual_tokens(self, images) -> torch.Tensor:
        """(B, 3, S, S) images or (B, T, 3, S, S) clips -> (B, 1 + P, Dv); a clip's frames go
        through the ViT together (with the temporal contextualizer, if any) and are averaged."""
        video = images.dim() == 5
        if video and images.shape[1] != self.cfg.frames:
            raise ValueError(f"this captioner takes clips of {self.cfg.frames} frames, got {images.shape[1]}")
        if not video and self.cfg.frames > 1:
            raise ValueError(f"this captioner takes clips of {self.cfg.frames} frames, got single images")
        frozen = self.cfg.freeze_vit and self.temporal is None  # the contextualizer needs gradients through the ViT
        with torch.no_grad() if frozen else nullcontext():
            x = self.visual.forward_tokens(images.flatten(0, 1) if video else images, self.temporal).x
        if video:
            x = x.unflatten(0, images.shape[:2]).mean(1)  # (B*T, N, D) -> (B, T, N, D) -> (B, N, D)
        return x

    def prompt(self, images, track_source=False) -> Tokens:
        """The soft prompt in LM width, (B, M, D_lm), with the bridge's token sizes and sources."""
        tokens = self.bridge(self.visual_tokens(images), track_source)
        return tokens.replace(x=self.lm_proj(tokens.x))

    def forward(self, images, ids, reducer_fn=None, generator=None) -> dict:
        if self.stage == 1:
            return self.representation_losses(images, ids, generator)
        prefix = self.prompt(images).x
        ids = ids[:, :self.cfg.lm.context_length - prefix.shape[1]]  # prompt + caption fit the LM's positions
        loss = self.lm.loss(ids, prefix=prefix)
        return dict(lm=loss, loss=loss)

    def representation_losses(self, images, ids, generator=None) -> dict:
        """BLIP-2's first stage, small: contrastive (mean of the query outputs against the text
        [CLS]) and matching (text cross-attending to the query outputs) losses, LM untouched."""
        queries = self.bridge(self.visual_tokens(images)).x  # (B, M, D)
        text_tokens = self.text.forward_tokens(ids)
        image_feat = F.normalize(self.query_proj(queries.mean(1)), dim=-1)
        text_feat = F.normalize(self.text_proj(text_tokens[:, 0]), dim=-1)
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        itc = contrastive_loss(image_feat, text_feat, scale)
        with torch.no_grad():
            sim = scale * image_feat @ text_feat.T
        itm_logits = lambda q, t, i: self.itm_head(self.fusion(t, i, q)[:, 0])
        itm = matching_loss(itm_logits, queries, text_tokens, ids, sim, generator) if len(ids) > 1 else 0.0 * itc
        return dict(itc=itc, itm=itm, loss=itc + itm)

    @torch.no_grad()
    def generate(self, images, prompt_ids, max_new_tokens=20, num_beams=1) -> list:
        """Captions (lists of new ids) for a batch of images, the text prompt (B, L0) after the soft one."""
        prefix = self.prompt(images).x
        if num_beams == 1:
            return self.lm.greedy(prompt_ids, prefix, max_new_tokens)
        return self.lm.generate(prompt_ids, prefix, max_new_tokens, num_beams)


# ----------------------------------------------------------------------------------------------
# Starting from a frozen LM (and a CLIP), and checking it stayed frozen

def start_captioner(model: Captioner, sources: dict):
    """A new captioner starts from the frozen LM and, when given, the CLIP's ViT (frozen) and text
    blocks (the bridge's starting point, as EVLGen's is BERT; and BLIP-2's stage-1 text encoder)."""
    model.lm.load_state_dict(strip_prefix(sources["lm"]["model"], "lm."))
    if "clip" in sources:
        clip = sources["clip"]["model"]
        model.visual.load_state_dict(strip_prefix(clip, "visual."))
        text = TextEncoder(TextConfig(**sources["clip"]["model_config"]["text"]))
        text.load_state_dict(strip_prefix(clip, "text."))
        model.bridge.load_blocks(text.blocks)
        if model.cfg.stage1:  # its own vocabulary is the LM's, so the blocks alone carry over
            for mine, theirs in zip(model.text.blocks, text.blocks):
                mine.load_state_dict(theirs.state_dict())


def strip_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def lm_unchanged(model: Captioner, sources: dict) -> bool:
    """The frozen LM is bit-identical to the checkpoint it was loaded from."""
    ref = strip_prefix(sources["lm"]["model"], "lm.")
    return all(torch.equal(v.cpu(), ref[k].cpu()) for k, v in model.lm.state_dict().items())


def check_vocabularies(tokenizer, sources: dict, source: str):
    """The captioner's words must be the frozen LM's: same ids, same embedding rows."""
    mine, lm_tok = tokenizer.state_dict(), sources["lm"]["tokenizer"]
    words = "itos" if "itos" in lm_tok else "encoder"  # the word list, or a BPE's (a converted GPT-2)
    if mine.get(words) != lm_tok.get(words):
        raise DataError(f"the vocabulary of {source} does not match the language model's ({len(tokenizer)} vs "
                        f"{len(lm_tok[words])} words): use the --lm checkpoint it was trained with")
    if sources["lm"]["model_config"]["vocab_size"] != len(tokenizer):
        raise DataError("the language model checkpoint's vocabulary size does not match its tokenizer")
