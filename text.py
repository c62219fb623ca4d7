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
import functools
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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

    def loss(self, ids: torch.Tensor, prefix: torch.Tensor = None, word_weight: torch.Tensor = None) -> torch.Tensor:
        """Next-token cross-entropy on the text only ([PAD] targets and prefix positions ignored).
        With `word_weight` (vocab,), each target counts by its word's weight: a weighted mean."""
        logits = self(ids, prefix)[:, -ids.shape[1]:-1]  # predictions for ids[:, 1:]
        targets = ids[:, 1:].masked_fill(ids[:, 1:] == self.cfg.pad_id, -100).reshape(-1)
        logits = logits.reshape(-1, logits.shape[-1]).float()
        if word_weight is None:
            return F.cross_entropy(logits, targets, ignore_index=-100)
        ce = F.cross_entropy(logits, targets, ignore_index=-100, reduction="none")  # 0 where ignored
        w = word_weight[targets.clamp(min=0)] * (targets != -100)
        return (w * ce).sum() / w.sum()

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
    """BERT's masking: p of the word positions are chosen; of those 80% become [MASK], 10% a
    random word, 10% stay. Returns (masked ids, labels with -100 where nothing is predicted)."""
    words = ids >= len(SPECIALS)
    rand = lambda: torch.rand(ids.shape, generator=generator, device="cpu").to(ids.device)
    chosen = words & (rand() < p)
    labels = ids.masked_fill(~chosen, -100)
    roll = rand()
    masked = ids.masked_fill(chosen & (roll < 0.8), MASK)
    random_words = torch.randint(len(SPECIALS), vocab_size, ids.shape, generator=generator, device="cpu").to(ids.device)
    masked = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_words, masked)
    return masked, labels


# ----------------------------------------------------------------------------------------------
# Pretrained vocabularies: GPT-2's byte-level BPE and CLIP's BPE, read from files the user gives
# (nothing is downloaded). Both split text with a regular expression over Unicode letters (\p{L}),
# numbers (\p{N}) and white space (\s), as the authors' code does with the `regex` package. Python's
# `re` has no \p{..}, and its \s also takes the four separators \x1c-\x1f, so the three classes are
# spelled out as code-point ranges from `unicodedata`: the same split, without a dependency.
# In the patterns, {L}, {N} and {S} stand for the classes' bodies: [{L}]+ is \p{L}+, [^{S}] is \S.

CLASS_MEMBER = {
    "L": lambda c: unicodedata.category(c)[0] == "L",
    "N": lambda c: unicodedata.category(c)[0] == "N",
    "S": lambda c: c.isspace() and not "\x1c" <= c <= "\x1f",  # Unicode's White_Space property
}


@functools.lru_cache(maxsize=None)
def unicode_class(name: str) -> str:
    """The body of the character class `name` (a key of CLASS_MEMBER) as ranges of escapes,
    "\\U00000041-\\U0000005a...". Built once per process (a pass over 1.1M code points, ~0.2 s)."""
    member, ranges, start = CLASS_MEMBER[name], [], None
    for cp in range(sys.maxunicode + 2):
        inside = cp <= sys.maxunicode and member(chr(cp))
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            ranges.append(f"\\U{start:08x}" + (f"-\\U{cp - 1:08x}" if cp - 1 > start else ""))
            start = None
    return "".join(ranges)


def unicode_pattern(pattern: str) -> "re.Pattern":
    """Compile `pattern` with {L}, {N} and {S} replaced by the classes' bodies."""
    for name in CLASS_MEMBER:
        pattern = pattern.replace("{" + name + "}", unicode_class(name))
    return re.compile(pattern)


def bytes_to_unicode() -> dict:
    """GPT-2's reversible map from the 256 byte values to printable characters (so BPE never
    sees whitespace or control characters): printable Latin-1 bytes map to themselves, the rest
    to code points 256 and up, in byte order. The dict's order is the printable bytes first, then
    the rest — CLIP's vocabulary begins with the characters in exactly this order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return chars


def bpe(word: tuple, ranks: dict) -> tuple:
    """Merge the adjacent pair with the lowest rank, again and again, until no pair has a rank."""
    while len(word) > 1:
        pairs = {(a, b) for a, b in zip(word, word[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = tuple(merged)
    return word


def read_merges(lines) -> dict:
    """Merge rules ("a b" per line, '#' header lines skipped) -> {(a, b): rank}."""
    pairs = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#")]
    bad = next((p for p in pairs if len(p) != 2), None)
    if bad is not None:
        raise ValueError(f"merge rule {' '.join(bad)!r} is not two symbols")
    return {p: i for i, p in enumerate(pairs)}


class GPT2Tokenizer:
    """GPT-2's byte-level BPE from its `vocab.json` and `merges.txt` (`from_files`). <|endoftext|>
    begins and ends a text; batches are padded with -1 (GPT-2 has no pad token; the LM ignores it)."""

    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"""
    pad_id = -1

    def __init__(self, encoder: dict, merges: list, context_length: int = 1024):
        self.encoder, self.merges = dict(encoder), [tuple(m) for m in merges]
        self.ranks = read_merges(" ".join(m) for m in self.merges)
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self.split = unicode_pattern(self.PATTERN)
        if "<|endoftext|>" not in self.encoder:
            raise ValueError("the GPT-2 vocabulary has no <|endoftext|>")
        self.bos_id = self.eos_id = self.encoder["<|endoftext|>"]
        self.context_length = context_length

    @classmethod
    def from_files(cls, vocab_path: str, merges_path: str, context_length: int = 1024) -> "GPT2Tokenizer":
        import json
        with open(vocab_path, encoding="utf-8") as f:
            encoder = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            ranks = read_merges(f.read().splitlines())
        return cls(encoder, sorted(ranks, key=ranks.get), context_length)

    def state_dict(self) -> dict:
        return dict(kind="gpt2_bpe", encoder=self.encoder, merges=[" ".join(m) for m in self.merges],
                    context_length=self.context_length)

    def __len__(self):
        return len(self.encoder)

    def encode(self, text: str) -> list:
        ids = []
        for piece in self.split.findall(text):
            symbols = bpe(tuple(self.byte_char[b] for b in piece.encode("utf-8")), self.ranks)
            missing = [s for s in symbols if s not in self.encoder]
            if missing:
                raise ValueError(f"BPE symbols {missing} are not in the vocabulary: vocab.json and merges.txt do not match")
            ids += [self.encoder[s] for s in symbols]
        return ids

    def __call__(self, texts, context_length: int = None) -> torch.Tensor:
        """(B, L) ids: <|endoftext|> text <|endoftext|>, cut to fit (the end kept), padded with -1."""
        encoded = [[self.bos_id] + self.encode(t) + [self.eos_id] for t in texts]
        L = context_length or min(self.context_length, max(len(e) for e in encoded))
        out = torch.full((len(texts), L), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(encoded):
            ids = ids[:L - 1] + [self.eos_id] if len(ids) > L else ids
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids) -> str:
        """The text up to the first <|endoftext|> after it begins (a leading one is skipped)."""
        ids = [int(i) for i in ids if int(i) != self.pad_id]
        ids = ids[1:] if ids[:1] == [self.bos_id] else ids
        ids = ids[:ids.index(self.eos_id)] if self.eos_id in ids else ids
        chars = "".join(self.decoder[i] for i in ids)
        return bytes(self.char_byte[c] for c in chars).decode("utf-8", errors="replace")


def clip_clean(text: str) -> str:
    """CLIP's text cleaning without ftfy (not a dependency): HTML entities unescaped twice,
    whitespace collapsed, lower case."""
    import html
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class CLIPTokenizer:
    """CLIP's BPE from its merges file (`bpe_simple_vocab_16e6.txt.gz`, gzip or plain): the
    vocabulary is the 256 byte characters, the same with the end-of-word mark "</w>", the first
    `n_merges` merges, then <|startoftext|> and <|endoftext|>; 77 positions, zero padding."""

    # OpenAI compiles it case-insensitively; the text is lower-cased first, so that changes
    # nothing with `regex` — but with `re` it would let U+0345 (a combining mark) match {L}.
    PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[{L}]+|[{N}]|[^{S}{L}{N}]+"""

    def __init__(self, merges: list, context_length: int = 77):
        self.merges = [tuple(m) for m in merges]
        self.ranks = read_merges(" ".join(m) for m in self.merges)
        chars = list(bytes_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in self.merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        self.pad_id, self.bos_id, self.eos_id = 0, self.sot, self.eot
        self.split = unicode_pattern(self.PATTERN)
        self.context_length = context_length

    @classmethod
    def from_file(cls, path: str, n_merges: int = 49152 - 256 - 2, context_length: int = 77) -> "CLIPTokenizer":
        import gzip
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:n_merges + 1]  # the first line is a version header
        return cls([tuple(line.split()) for line in lines if line.strip()], context_length)

    def state_dict(self) -> dict:  # saved in checkpoints like the word tokenizer's
        return dict(kind="clip_bpe", merges=[" ".join(m) for m in self.merges], context_length=self.context_length)

    def __len__(self):
        return len(self.encoder)

    def encode(self, text: str) -> list:
        ids = []
        for piece in self.split.findall(clip_clean(text)):
            chars = tuple(self.byte_char[b] for b in piece.encode("utf-8"))
            symbols = bpe(chars[:-1] + (chars[-1] + "</w>",), self.ranks)
            ids += [self.encoder[s] for s in symbols]
        return ids

    def __call__(self, texts, context_length: int = None) -> torch.Tensor:
        """(B, context) ids: <|startoftext|> text <|endoftext|>, cut to fit (end-of-text kept), zeros after."""
        L = context_length or self.context_length
        out = torch.zeros(len(texts), L, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot] + self.encode(text)[:L - 2] + [self.eot]
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids) -> str:
        """Up to <|endoftext|>; "</w>" (end of a word) becomes a space."""
        chars = []
        for i in (int(i) for i in ids):
            if i == self.eot:
                break
            if i != self.sot:
                chars.append(self.decoder[i])
        text = bytes(self.char_byte[c] for c in "".join(chars)).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()
