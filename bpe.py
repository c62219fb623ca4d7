"""
Pretrained vocabularies: GPT-2's byte-level BPE and CLIP's BPE, read from files the user gives
(nothing is downloaded), with the same interface as text.py's word `Tokenizer` (a checkpoint
saves either, and `Tokenizer.from_state_dict` reads either back).

Read first: `bpe` (the merge loop both share), then `GPT2Tokenizer.encode`.
"""
import functools
import re
import sys
import unicodedata

import torch

# Both split text with a regular expression over Unicode letters (\p{L}),
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
