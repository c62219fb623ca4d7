"""
Text: the tokenizer, the bidirectional text encoder (CLIP's/BERT's role) and the small GPT-style
causal language model (the frozen "LLM" of EVLGen).

Read first: `Tokenizer` (how a caption becomes ids), then `TextEncoder`, then `CausalLM` and its
`generate` (greedy and beam search).

Why a word vocabulary and not bytes: captions here are short and drawn from a small vocabulary;
one id per word keeps sequences ~5x shorter than bytes, so the text side costs little next to the
vision tokens this project is about, and a model learns in CPU-minutes. The vocabulary is built
from the training captions and saved inside every checkpoint, so a checkpoint always decodes with
the vocabulary it was trained with. Words never seen in training map to [UNK].

Both text models reuse `vit.Block` (one transformer block implementation in the project); the
language model's parameter names follow nanoGPT's GPT-2 layout (transformer.wte, transformer.wpe,
transformer.h.N, transformer.ln_f, lm_head), block internals named as in vit.py.
"""
import re
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bpe import CLIPTokenizer, GPT2Tokenizer
from vit import Block, init_weights, load_exactly

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(len(SPECIALS))  # [CLS] doubles as BOS, [SEP] as EOS


def normalize(text: str) -> list:
    """Lower-case words; punctuation is dropped (captions are compared word by word)."""
    return re.findall(r"[a-z0-9]+", text.lower())


class Tokenizer:
    pad_id, bos_id, eos_id = PAD, CLS, SEP  # every tokenizer here names these three

    def __init__(self, words: list, context_length: int = 32):
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.context_length = context_length

    @classmethod
    def build(cls, captions, context_length: int = 32, min_count: int = 1) -> "Tokenizer":
        """A vocabulary of every word seen at least `min_count` times, most frequent first."""
        counts = Counter(w for c in captions for w in normalize(c))
        return cls([w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count],
                   context_length)

    def __len__(self):
        return len(self.itos)

    def state_dict(self) -> dict:
        return dict(itos=self.itos, context_length=self.context_length)

    @classmethod
    def from_state_dict(cls, d):
        """The tokenizer a checkpoint saved: this word tokenizer, or CLIP's BPE (a converted CLIP)."""
        if d.get("kind") == "clip_bpe":
            return CLIPTokenizer([m.split() for m in d["merges"]], d["context_length"])
        if d.get("kind") == "gpt2_bpe":
            return GPT2Tokenizer(d["encoder"], [m.split() for m in d["merges"]], d["context_length"])
        return cls(d["itos"], d["context_length"])

    def encode(self, text: str) -> list:
        """[CLS] w1 ... wn [SEP], truncated to the context length with [SEP] kept last."""
        ids = [self.stoi.get(w, UNK) for w in normalize(text)][: self.context_length - 2]
        return [CLS] + ids + [SEP]

    def __call__(self, texts, context_length: int = None) -> torch.Tensor:
        """A batch of texts -> (B, L) ids, right-padded with [PAD] to the longest text (at most
        the context length), or to exactly `context_length` when it is given."""
        encoded = [self.encode(t) for t in texts]
        L = context_length or min(self.context_length, max(len(e) for e in encoded))
        out = torch.full((len(texts), L), PAD, dtype=torch.long)
        for i, ids in enumerate(encoded):
            ids = ids[:L - 1] + [SEP] if len(ids) > L else ids
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids) -> str:
        """Words up to the first [SEP], special tokens skipped."""
        words = []
        for i in (ids.tolist() if torch.is_tensor(ids) else ids):
            if i == SEP:
                break
            if i >= len(SPECIALS) and i < len(self.itos):
                words.append(self.itos[i])
        return " ".join(words)


@dataclass
class TextConfig:
    vocab_size: int = 64
    context_length: int = 32
    width: int = 128
    depth: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    act: str = "gelu"
    ln_eps: float = 1e-6
    dropout: float = 0.0
    causal: bool = False  # OpenAI CLIP's text transformer is causal; ours (BERT/ALBEF) is bidirectional
    pool: str = "cls"  # cls: the first token's output; eot: the end-of-text token's (OpenAI: the largest id)

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")
        if self.pool not in ("cls", "eot"):
            raise ValueError(f"text pool {self.pool!r} is not cls or eot")


def padding_bias(ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B, L) ids -> (B, 1, 1, L) additive bias: -inf on [PAD] keys, 0 elsewhere."""
    bias = torch.zeros(ids.shape, dtype=dtype, device=ids.device).masked_fill(ids == PAD, float("-inf"))
    return bias[:, None, None, :]


class TextEncoder(nn.Module):
    """Bidirectional transformer; the pooled output is the final [CLS] token (BERT/ALBEF style).
    With `causal` and `pool="eot"` it is OpenAI CLIP's text tower (pretrained.clip_from_openai)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.context_length, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps, cfg.dropout)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.apply(init_weights)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) contextual token features."""
        x = self.token_embedding(ids) + self.pos_embed[:, : ids.shape[1]]
        # causal: what follows the end-of-text token (padding) is never seen by it, so no padding mask
        bias = None if self.cfg.causal else padding_bias(ids, x.dtype)
        for block in self.blocks:
            x = block(x, attn_bias=bias, is_causal=self.cfg.causal)
        return self.norm(x)

    def pooled(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, L, D) token features -> (B, D): the [CLS] output, or the end-of-text token's."""
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        return tokens[torch.arange(len(ids), device=ids.device), ids.argmax(-1)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pooled(self.forward_tokens(ids), ids)  # (B, D)


@dataclass
class LMConfig:
    vocab_size: int = 64
    context_length: int = 64
    width: int = 128
    depth: int = 2
    heads: int = 2
    act: str = "gelu_tanh"
    ln_eps: float = 1e-5
    dropout: float = 0.0
    pad_id: int = PAD  # targets with this id are ignored; -1 (a converted GPT-2, which has no pad token) pads
    eos_id: int = SEP  # generation stops here


class CausalLM(nn.Module):
    """A small GPT: token + position embeddings, causal blocks, final norm, tied output head.
    `prefix` embeddings (B, P, D), e.g. a visual soft prompt, may be prepended to the tokens."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.width),
            wpe=nn.Embedding(cfg.context_length, cfg.width),
            h=nn.ModuleList(Block(cfg.width, cfg.heads, 4.0, cfg.act, cfg.ln_eps, cfg.dropout)
                            for _ in range(cfg.depth)),
            ln_f=nn.LayerNorm(cfg.width, eps=cfg.ln_eps),
        ))
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.apply(init_weights)
        nn.init.normal_(self.transformer.wte.weight, std=0.02)
        nn.init.normal_(self.transformer.wpe.weight, std=0.01)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2

    @classmethod
    def from_gpt2(cls, state: dict) -> "CausalLM":
        """A CausalLM with the weights of a GPT-2 state dict (Hugging Face `GPT2Model` or
        `GPT2LMHeadModel` layout: wte, wpe, h.N.attn.c_attn ... ln_f, with or without the
        "transformer." prefix), the config read off the shapes (heads = width / 64, tanh GELU,
        eps 1e-5). GPT-2's Conv1D weights are stored (in, out) and are transposed here."""
        state = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in state.items()}
        if "wte.weight" not in state:
            raise ValueError("not a GPT-2 state dict: no wte.weight")
        V, D = state["wte.weight"].shape
        depth = len({k.split(".")[1] for k in state if k.startswith("h.")})
        model = cls(LMConfig(vocab_size=V, context_length=state["wpe.weight"].shape[0], width=D, depth=depth,
                             heads=max(1, D // 64), pad_id=-1, eos_id=V - 1))  # <|endoftext|> is GPT-2's last id
        theirs = {}
        conv1d = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for key, value in state.items():
            parts = key.split(".")
            if key == "lm_head.weight":
                if not torch.equal(value, state["wte.weight"]):
                    raise ValueError("lm_head.weight differs from wte.weight: this LM ties them, as GPT-2 does")
                continue
            if parts[0] == "h" and key.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # the causal-mask buffers of older releases
            if parts[0] == "h":
                rest = ".".join(parts[2:])
                module = rest.rsplit(".", 1)[0]
                if module in conv1d:
                    rest = rest.replace(module, conv1d[module], 1)
                    value = value.T if parts[-1] == "weight" else value
                rest = rest.replace("ln_1", "norm1").replace("ln_2", "norm2")
                key = f"h.{parts[1]}.{rest}"
            theirs["transformer." + key] = value.contiguous()
        theirs["lm_head.weight"] = theirs["transformer.wte.weight"]
        load_exactly(model, theirs, "the GPT-2 state dict")
        return model.eval()

    def forward(self, ids: torch.Tensor, prefix: torch.Tensor = None) -> torch.Tensor:
        """(B, L) ids [and (B, P, D) prefix] -> (B, P+L, vocab) next-token logits."""
        x = self.transformer.wte(ids.clamp(min=0))  # a -1 pad comes after the text: causal, never seen by it
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], 1)
        if x.shape[1] > self.cfg.context_length:
            raise ValueError(f"sequence of {x.shape[1]} exceeds the LM context of {self.cfg.context_length}")
        x = x + self.transformer.wpe(torch.arange(x.shape[1], device=x.device))
        for block in self.transformer.h:
            x = block(x, is_causal=True)
        return self.lm_head(self.transformer.ln_f(x))

    def loss(self, ids: torch.Tensor, prefix: torch.Tensor = None) -> torch.Tensor:
        """Next-token cross-entropy on the text only ([PAD] targets and prefix positions ignored)."""
        logits = self(ids, prefix)[:, -ids.shape[1]:-1]  # predictions for ids[:, 1:]
        targets = ids[:, 1:].masked_fill(ids[:, 1:] == self.cfg.pad_id, -100).reshape(-1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, prefix: torch.Tensor = None, max_new_tokens: int = 20,
                 num_beams: int = 1) -> list:
        """Continue each prompt (B, L0) until the end id or `max_new_tokens`; returns B lists of new ids.
        num_beams=1 is greedy decoding; beams keep the `num_beams` best sums of log-probabilities,
        finished hypotheses compared by their mean log-probability (length-normalised)."""
        return [self.beam_search(ids[b:b + 1], None if prefix is None else prefix[b:b + 1],
                                 max_new_tokens, num_beams) for b in range(ids.shape[0])]

    @torch.no_grad()
    def greedy(self, ids: torch.Tensor, prefix: torch.Tensor = None, max_new_tokens: int = 20) -> list:
        """Greedy decoding of the whole batch at once (what `generate` with one beam returns)."""
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        new = []
        for _ in range(max_new_tokens):
            nxt = self(ids, prefix)[:, -1].argmax(-1)  # (B,)
            nxt = nxt.masked_fill(done, self.cfg.pad_id)
            new.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == self.cfg.eos_id
            if done.all():
                break
        out, eos = torch.stack(new, 1).tolist(), self.cfg.eos_id
        return [row[:row.index(eos) + 1] if eos in row else row for row in out]

    def beam_search(self, ids, prefix, max_new_tokens, k):
        beams = ids  # (1, L0) to start, then (k', L0 + t)
        scores = torch.zeros(1, device=ids.device)
        finished = []  # (normalised score, new ids)
        L0 = ids.shape[1]
        for t in range(max_new_tokens):
            p = None if prefix is None else prefix.expand(beams.shape[0], -1, -1)
            logp = self(beams, p)[:, -1].float().log_softmax(-1)  # (k', V)
            total = (scores[:, None] + logp).flatten()
            top = total.topk(min(k, total.numel()))
            V = logp.shape[1]
            rows, toks = top.indices // V, top.indices % V
            beams = torch.cat([beams[rows], toks[:, None]], 1)
            scores = top.values
            done = toks == self.cfg.eos_id
            for b in done.nonzero().flatten().tolist():
                finished.append((scores[b].item() / (t + 1), beams[b, L0:].tolist()))
            beams, scores = beams[~done], scores[~done]
            if len(finished) >= k or beams.shape[0] == 0:
                break
        if not finished:  # nothing ended within the budget: the best open beam
            finished = [(scores[0].item() / max_new_tokens, beams[0, L0:].tolist())]
        return max(finished, key=lambda f: f[0])[1]


class CrossAttention(nn.Module):
    """Text queries attend to image tokens (ALBEF's fusion layers); through SDPA."""

    def __init__(self, dim: int, kv_dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context):
        B, L, D = x.shape
        q = self.q(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, d)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, d)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class FusionBlock(nn.Module):
    """Self-attention over the text, cross-attention to the image tokens, MLP; pre-norm."""

    def __init__(self, dim, image_dim, heads, ln_eps=1e-6):
        super().__init__()
        self.block = Block(dim, heads, ln_eps=ln_eps)  # self-attention and MLP halves
        self.norm_cross = nn.LayerNorm(dim, eps=ln_eps)
        self.cross_attn = CrossAttention(dim, image_dim, heads)

    def forward(self, x, image_tokens, bias):
        x, _ = self.block.attend(x, bias)
        x = x + self.cross_attn(self.norm_cross(x), image_tokens)
        return self.block.feed_forward(x)


class FusionEncoder(nn.Module):
    """ALBEF's multimodal encoder: a few text layers that also cross-attend to the image tokens.
    Every image token it reads costs cross-attention compute: this is where pruning pays most."""

    def __init__(self, dim, image_dim, heads, depth, ln_eps=1e-6):
        super().__init__()
        self.blocks = nn.ModuleList(FusionBlock(dim, image_dim, heads, ln_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.apply(init_weights)

    def forward(self, text_tokens, ids, image_tokens):
        """(B, L, D) text features of `ids`, (B, N, D_img) image tokens -> (B, L, D)."""
        bias = padding_bias(ids, text_tokens.dtype)
        x = text_tokens
        for block in self.blocks:
            x = block(x, image_tokens, bias)
        return self.norm(x)


def mask_tokens(ids: torch.Tensor, vocab_size: int, generator=None, p: float = 0.15):
    """BERT's masking: in each text max(1, round(p x its words)) word positions are chosen at random,
    as BERT counts them per text; of those 80% become [MASK], 10% a random word, 10% stay. The
    choice fills K = max(1, round(p x L)) slots per row, so the loss can be gathered at the chosen
    positions with static shapes (no asking the GPU how many there are). Returns (masked ids,
    labels with -100 where nothing is predicted, the slots' positions (B, K), their labels)."""
    words = ids >= len(SPECIALS)
    device = generator.device if generator is not None else ids.device  # drawn where the generator lives
    draw = lambda *shape: torch.rand(shape, generator=generator, device=device).to(ids.device)
    K = max(1, round(p * ids.shape[1]))
    slots = draw(*ids.shape).masked_fill(~words, -1.0).topk(K, dim=1).indices  # (B, K): words first, at random
    count = (words.sum(1, keepdim=True) * p).round().clamp(min=1)  # this text's share of its words
    chosen = (torch.arange(K, device=ids.device) < count) & words.gather(1, slots)  # (B, K)
    old = ids.gather(1, slots)
    roll = draw(*slots.shape)
    random_words = torch.randint(len(SPECIALS), vocab_size, slots.shape, generator=generator, device=device).to(ids.device)
    new = torch.where(roll < 0.8, MASK, torch.where(roll < 0.9, random_words, old))
    masked = ids.scatter(1, slots, torch.where(chosen, new, old))
    slot_labels = old.masked_fill(~chosen, -100)
    labels = torch.full_like(ids, -100).scatter(1, slots, slot_labels)
    return masked, labels, slots, slot_labels
