"""
Composition: CLIP (ViT + text encoder + projections + temperature) with the ALBEF objectives.

Papers: "Learning Transferable Visual Models From Natural Language Supervision" (CLIP, Radford et
al., 2021); the global-batch loss follows open_clip. "Align before Fuse" (ALBEF, Li et al., 2021)
for image-text matching (ITM) with hard negatives and masked language modelling (MLM) through a
fusion encoder that cross-attends to the image tokens.

And the captioner of EVLGen ("Expedited Training of Visual Conditioned Language Generation via
Redundancy Reduction", Jian et al., ACL 2024) with BLIP-2's learned-query bridge (Li et al., 2023)
as the baseline: ViT -> bridge -> Linear -> soft prompt -> FROZEN language model, one loss.

Read first: `contrastive_loss` (what ITC computes, and why it is exact under DDP), then
`CLIP.forward` (text first, then the image with the method's reducer, then the objectives), then
`Captioner.forward` (the prompt, then the frozen LM's loss on the caption).
This file composes what vit.py, text.py and merge.py define; a token-reduction method enters CLIP
only as `reducer_fn(text_guidance) -> Reducer`, built by train.py, and the captioner as its bridge.
"""
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from merge import MergingBridge, TemporalContext
from text import PAD, CausalLM, FusionBlock, FusionEncoder, LMConfig, TextConfig, TextEncoder, mask_tokens
from vit import Tokens, ViT, ViTConfig, init_weights, load_exactly


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


def sample_negatives(sim: torch.Tensor, generator=None) -> torch.Tensor:
    """For each row, one column drawn with probability softmax(sim) over the OTHER columns:
    ALBEF's hard negatives (similar but wrong). sim (B, B) -> (B,) column indices."""
    eye = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    w = (sim.float().softmax(1) + 1e-9).masked_fill(eye, 0)  # +1e-9: never an all-zero row
    return torch.multinomial(w.cpu(), 1, generator=generator).squeeze(1).to(sim.device)


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
            self.itm_head = nn.Linear(t.width, 2)
            self.mlm_head = nn.Linear(t.width, t.vocab_size)

    @classmethod
    def from_openai(cls, state: dict) -> "CLIP":
        """A CLIP with the weights of an OpenAI CLIP state dict (the layout open_clip uses too:
        visual.conv1, visual.class_embedding, visual.transformer.resblocks.N.attn.in_proj_weight,
        token_embedding, text_projection, logit_scale ...), its config read off the shapes.
        Vision, text and the logit scale are loaded; the text tower is causal and pools the
        end-of-text token, as CLIP's is. A key left over or missing stops with the list."""
        cfg = openai_config(state)
        model = cls(cfg)
        load_exactly(model, openai_to_ours(state, cfg), "the OpenAI CLIP state dict")
        return model.eval()

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
            masked, labels = mask_tokens(ids, self.cfg.text.vocab_size, generator)
            fused = self.fusion(self.text.forward_tokens(masked), masked, image_tokens)
            logits = self.mlm_head(fused)  # (B, L, V)
            if (labels != -100).any():  # a tiny batch of short captions may draw no position at all
                losses["mlm"] = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            else:
                losses["mlm"] = 0.0 * logits.sum()
        losses["loss"] = sum(losses.values())
        return losses

    def itm_loss(self, image_tokens, text_tokens, ids, image_feat, text_feat, generator=None):
        with torch.no_grad():
            sim = self.scale() * image_feat @ text_feat.T  # (B, B)
        return matching_loss(self.itm_logits, image_tokens, text_tokens, ids, sim, generator)


OPENAI_META = ("input_resolution", "context_length", "vocab_size")  # integers some releases store beside the weights


def openai_config(state: dict) -> CLIPConfig:
    """CLIPConfig of an OpenAI-layout state dict: widths, depths, patch and image size, context,
    vocabulary and embedding size from the shapes; heads = width / 64, QuickGELU, LayerNorm eps
    1e-5, a pre-norm on the patches (ln_pre), a causal text tower pooled at end-of-text."""
    if "visual.conv1.weight" not in state:
        raise ValueError("not an OpenAI ViT CLIP state dict: no visual.conv1.weight (ResNet CLIPs are not supported)")
    count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
    D, _, p, _ = state["visual.conv1.weight"].shape
    side = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    vision = ViTConfig(image_size=side * p, patch_size=p, width=D, depth=count("visual.transformer.resblocks."),
                       heads=D // 64, act="quick_gelu", ln_eps=1e-5, pre_norm=True)
    V, W = state["token_embedding.weight"].shape
    text = TextConfig(vocab_size=V, context_length=state["positional_embedding"].shape[0], width=W,
                      depth=count("transformer.resblocks."), heads=W // 64, act="quick_gelu", ln_eps=1e-5,
                      causal=True, pool="eot")
    return CLIPConfig(vision=vision, text=text, embed_dim=state["text_projection"].shape[1])


def openai_to_ours(state: dict, cfg: CLIPConfig) -> dict:
    """Rename an OpenAI-layout state dict to this project's names (timm's for the ViT)."""
    block = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.qkv.weight",
             "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2"}
    fixed = {"visual.conv1.weight": "visual.patch_embed.proj.weight", "visual.ln_pre": "visual.norm_pre",
             "visual.ln_post": "visual.norm", "ln_final": "text.norm", "token_embedding": "text.token_embedding"}
    out = {}
    for key, value in state.items():
        if key in OPENAI_META:
            continue
        name = key
        for prefix, ours in (("visual.transformer.resblocks.", "visual.blocks."), ("transformer.resblocks.", "text.blocks.")):
            if key.startswith(prefix):
                n, rest = key[len(prefix):].split(".", 1)
                rest = next((rest.replace(a, b, 1) for a, b in block.items() if rest.startswith(a)), rest)
                name = f"{ours}{n}.{rest}"
        name = next((name.replace(a, b, 1) for a, b in fixed.items() if name.startswith(a + ".") or name == a), name)
        out[name] = value
    special = {"visual.class_embedding": ("visual.cls_token", lambda t: t.reshape(1, 1, -1)),
               "visual.positional_embedding": ("visual.pos_embed", lambda t: t.unsqueeze(0)),
               "positional_embedding": ("text.pos_embed", lambda t: t.unsqueeze(0)),
               "visual.proj": ("visual_proj.weight", lambda t: t.T), "text_projection": ("text_proj.weight", lambda t: t.T)}
    for key, (name, f) in special.items():
        if key in out:
            out[name] = f(out.pop(key)).contiguous()
    if "visual.patch_embed.proj.weight" in out:  # OpenAI's patch embedding has no bias
        out["visual.patch_embed.proj.bias"] = torch.zeros(cfg.vision.width)
    return out


def matching_loss(itm_logits, image_tokens, text_tokens, ids, sim, generator=None):
    """Binary matching on B positive pairs, B (image, hard negative text) pairs and B (hard
    negative image, text) pairs, negatives drawn from `sim` (B, B) within this process's batch.
    itm_logits(image_tokens, text_tokens, ids) -> (3B, 2)."""
    neg_text = sample_negatives(sim, generator)
    neg_image = sample_negatives(sim.T, generator)
    # index_select, not x[idx]: on the CPU the backward of x[idx] adds repeated rows' gradients in
    # a thread-dependent order, so runs would differ in the last bits; index_select's does not
    images = torch.cat([image_tokens, image_tokens, image_tokens.index_select(0, neg_image)])  # (3B, N', Dv)
    texts = torch.cat([text_tokens, text_tokens.index_select(0, neg_text), text_tokens])
    all_ids = torch.cat([ids, ids[neg_text], ids])
    labels = torch.cat([torch.ones(len(ids)), torch.zeros(2 * len(ids))]).long().to(ids.device)
    return F.cross_entropy(itm_logits(images, texts, all_ids).float(), labels)


# ----------------------------------------------------------------------------------------------
# The captioner: ViT -> bridge -> soft prompt -> frozen language model (EVLGen, BLIP-2)

BRIDGES = ("merge", "query")


@dataclass
class CaptionerConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    text: TextConfig = field(default_factory=TextConfig)  # the bridge's blocks; the stage-1 text encoder
    bridge: str = "merge"  # merge: EVLGen's merging encoder; query: BLIP-2's learned queries
    bridge_depth: int = 2
    r: tuple = (16, 16)  # tokens merged in each bridge layer (merge); all zero: every token to the LM
    merge_mode: str = "wavg"
    prop_attn: bool = True
    bridge_pos: bool = False  # ours (merge): a learned position embedding on the bridge's visual tokens
    num_queries: int = 32  # learned queries (query)
    freeze_vit: bool = True
    stage1: bool = False  # also build BLIP-2's stage-1 heads (ITC and ITM between queries and text)
    embed_dim: int = 128
    frames: int = 1  # > 1: video clips of this many frames, averaged after the ViT
    temporal: bool = False  # video: EVLGen's temporal contextualizer in every ViT block (the only ViT part trained)
    temporal_dim: int = 0  # its query/key width; 0: half the ViT width
    frame_embed: bool = True  # its learned frame-index embedding (without it, the order of frames is lost)
    temporal_causal: bool = False  # ours: each frame attends to itself and earlier frames only
    weighted_words: tuple = ()  # ours: LM ids whose targets count `word_weight` times in the caption loss
    word_weight: float = 1.0

    def __post_init__(self):
        self.r, self.weighted_words = tuple(self.r), tuple(self.weighted_words)
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
        return cls(vision=ViTConfig(**d["vision"]), lm=LMConfig(**d["lm"]), text=TextConfig(**d["text"]),
                   **{k: v for k, v in d.items() if k not in ("vision", "lm", "text")})


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
                                        cfg.frame_embed, cfg.temporal_causal) if cfg.temporal else None
        self.lm_proj = nn.Linear(t.width, cfg.lm.width)
        self.lm = CausalLM(cfg.lm)
        self.lm.requires_grad_(False)
        weight = torch.ones(cfg.lm.vocab_size)
        weight[list(cfg.weighted_words)] = cfg.word_weight
        # not saved: rebuilt from the config, so checkpoints without it load unchanged
        self.register_buffer("word_weight", weight if cfg.word_weight != 1.0 else None, persistent=False)
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
        loss = self.lm.loss(ids, prefix=prefix, word_weight=self.word_weight)
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
# A pretrained CLIP as a train.py checkpoint: `python model.py --openai WEIGHTS --bpe VOCAB --out DIR`

def read_weights(path: str) -> dict:
    """A state dict from a file: a plain (open_clip) state dict, one nested under "state_dict",
    or OpenAI's TorchScript archive. Half-precision weights are read as float32."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:
            state = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as e:
            raise ValueError(f"{path} is neither a state dict nor a TorchScript archive ({e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in state.items()}


def convert_openai(weights: str, bpe: str, out: str) -> str:
    """Write OUT/ckpt.pt: the CLIP of an OpenAI-layout file with CLIP's BPE tokenizer, readable
    by eval.py, viz.py, bench.py and `train.py --method ranking --init`."""
    import os
    import train
    from text import CLIPTokenizer
    model = CLIP.from_openai(read_weights(weights))
    tokenizer = CLIPTokenizer.from_file(bpe, context_length=model.cfg.text.context_length)
    if len(tokenizer) != model.cfg.text.vocab_size:
        raise ValueError(f"{bpe} makes {len(tokenizer)} tokens but {weights} embeds {model.cfg.text.vocab_size}")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "ckpt.pt")
    v = model.cfg.vision
    config = asdict(train.TrainConfig(method="none", image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                                      depth=v.depth, heads=v.heads, steps=0))
    train.save_checkpoint(path, dict(kind="clip", config=config, model_config=asdict(model.cfg), model=model.state_dict(),
                                     step=0, tokenizer=tokenizer.state_dict(), train_seconds=0.0,
                                     converted_from=os.path.abspath(weights)))
    return path


def convert_gpt2(weights: str, vocab: str, merges: str, out: str) -> str:
    """Write OUT/ckpt.pt: a GPT-2 (Hugging Face layout) with its tokenizer as a `--method lm`
    checkpoint, so that `train.py --method evlgen --lm OUT/ckpt.pt` captions with it frozen."""
    import os
    import train
    from text import GPT2Tokenizer
    lm = CausalLM.from_gpt2(read_weights(weights))
    tokenizer = GPT2Tokenizer.from_files(vocab, merges, context_length=lm.cfg.context_length)
    if len(tokenizer) != lm.cfg.vocab_size:
        raise ValueError(f"{vocab} holds {len(tokenizer)} tokens but {weights} embeds {lm.cfg.vocab_size}")
    lm.cfg.eos_id = tokenizer.eos_id
    model = LanguageModel(lm.cfg)
    model.lm.load_state_dict(lm.state_dict())
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "ckpt.pt")
    config = asdict(train.TrainConfig(method="lm", steps=0, lm_width=lm.cfg.width, lm_depth=lm.cfg.depth,
                                      lm_heads=lm.cfg.heads, lm_context=lm.cfg.context_length))
    train.save_checkpoint(path, dict(kind="lm", config=config, model_config=asdict(lm.cfg), model=model.state_dict(),
                                     step=0, tokenizer=tokenizer.state_dict(), train_seconds=0.0,
                                     converted_from=os.path.abspath(weights)))
    return path


if __name__ == "__main__":
    import argparse
    import sys
    p = argparse.ArgumentParser(description="Convert pretrained weights into a train.py checkpoint: a CLIP "
                                            "(OpenAI / open_clip layout) or a GPT-2 (Hugging Face layout).")
    p.add_argument("--openai", help="CLIP weights: an open_clip state dict or OpenAI's TorchScript file")
    p.add_argument("--bpe", help="with --openai: CLIP's merges file, bpe_simple_vocab_16e6.txt.gz")
    p.add_argument("--gpt2", help="GPT-2 weights (GPT2Model or GPT2LMHeadModel state dict)")
    p.add_argument("--vocab", help="with --gpt2: vocab.json")
    p.add_argument("--merges", help="with --gpt2: merges.txt")
    p.add_argument("--out", required=True, help="folder for ckpt.pt")
    a = p.parse_args()
    if bool(a.openai) == bool(a.gpt2) or (a.openai and not a.bpe) or (a.gpt2 and not (a.vocab and a.merges)):
        p.error("give --openai WEIGHTS --bpe FILE, or --gpt2 WEIGHTS --vocab FILE --merges FILE")
    try:
        print(convert_openai(a.openai, a.bpe, a.out) if a.openai else convert_gpt2(a.gpt2, a.vocab, a.merges, a.out))
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
