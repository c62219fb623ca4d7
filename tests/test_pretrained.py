"""Loading real pretrained layouts: an OpenAI CLIP state dict, built here with random values by a
reference that follows OpenAI's own module structure (nn.MultiheadAttention, (L, B, D) tensors),
so the comparison checks the renaming, the transposes, the causal mask and the pooling at once."""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import CLIP
from pretrained import clip_from_openai, openai_config

torch.manual_seed(0)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, 4 * d), gelu=QuickGELU(), c_proj=nn.Linear(4 * d, d)))
        self.ln_2 = nn.LayerNorm(d)

    def forward(self, x, mask=None):  # x: (L, B, D)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, d, depth, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(d, heads) for _ in range(depth))

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class Visual(nn.Module):
    def __init__(self, size, patch, d, depth, embed):
        super().__init__()
        self.conv1 = nn.Conv2d(3, d, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(d) * 0.1)
        self.positional_embedding = nn.Parameter(torch.randn((size // patch) ** 2 + 1, d) * 0.1)
        self.ln_pre, self.ln_post = nn.LayerNorm(d), nn.LayerNorm(d)
        self.transformer = Transformer(d, depth, d // 64)
        self.proj = nn.Parameter(torch.randn(d, embed) * d ** -0.5)

    def forward(self, images):
        x = self.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], 1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class OpenAICLIP(nn.Module):
    def __init__(self, size=32, patch=8, vision_width=128, vision_depth=2, vocab=50, context=12, width=64,
                 depth=2, embed=32):
        super().__init__()
        self.visual = Visual(size, patch, vision_width, vision_depth, embed)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width) * 0.1)
        self.transformer = Transformer(width, depth, width // 64)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed) * width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.context = context

    def encode_text(self, ids):
        mask = torch.full((self.context, self.context), float("-inf")).triu(1)
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2), mask).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(len(ids)), ids.argmax(-1)] @ self.text_projection  # the end-of-text token


def random_ids(n, vocab=50, context=12):
    """[SOT] words [EOT] then zeros, as CLIP's tokenizer pads; EOT is the largest id."""
    ids = torch.zeros(n, context, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(1, context - 1, ()))
        ids[i, 0], ids[i, 1:length + 1], ids[i, length + 1] = vocab - 2, torch.randint(1, vocab - 2, (length,)), vocab - 1
    return ids


def test_from_openai_matches_the_reference_forward():
    ref = OpenAICLIP().eval()
    for p in ref.parameters():  # LayerNorms and biases away from their identity init, so a mix-up shows
        p.data += 0.05 * torch.randn_like(p)
    state = {**ref.state_dict(), "input_resolution": torch.tensor(32)}  # some releases store it beside
    cfg = openai_config(state)
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.heads, cfg.vision.image_size, cfg.vision.patch_size) == \
        (128, 2, 2, 32, 8)
    assert (cfg.text.vocab_size, cfg.text.context_length, cfg.text.width, cfg.embed_dim) == (50, 12, 64, 32)
    ours = clip_from_openai(state)
    images, ids = torch.randn(3, 3, 32, 32), random_ids(3)
    with torch.no_grad():
        assert (ours.encode_image(images) - F.normalize(ref.visual(images), dim=-1)).abs().max() < 1e-5
        assert (ours.encode_text(ids) - F.normalize(ref.encode_text(ids), dim=-1)).abs().max() < 1e-5
    assert ours.logit_scale.item() == state["logit_scale"].item()  # the log scale, as CLIP stores it


def test_from_openai_runs_every_reducer():
    import train
    ours = clip_from_openai(OpenAICLIP().state_dict())
    images = torch.randn(2, 3, 32, 32)
    v = ours.cfg.vision
    for method in ("elip", "evit", "tome"):
        make = train.reducer_fn(train.TrainConfig(method=method, tome_r="2"), v, step=10 ** 6, training=False)
        out = ours.visual.forward_tokens(images, make(None))
        assert out.x.shape[1] < 1 + v.num_patches and torch.isfinite(out.x).all()


def test_from_openai_refuses_a_partial_or_foreign_state_dict():
    state = OpenAICLIP().state_dict()
    with pytest.raises(ValueError, match=r"missing \['text.blocks.1.norm2.bias'\]"):
        clip_from_openai({k: v for k, v in state.items() if k != "transformer.resblocks.1.ln_2.bias"})
    with pytest.raises(ValueError, match=r"unexpected \['visual.attnpool.k_proj.weight'\]"):
        clip_from_openai({**state, "visual.attnpool.k_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="ResNet CLIPs are not supported"):
        clip_from_openai({k: v for k, v in state.items() if k != "visual.conv1.weight"})


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])  # OpenAI's releases; open_clip's LAION ones
def test_from_openai_matches_open_clip(act):
    open_clip = pytest.importorskip("open_clip")
    ref = open_clip.model.CLIP(32, open_clip.model.CLIPVisionCfg(layers=2, width=128, patch_size=8, image_size=32),
                               open_clip.model.CLIPTextCfg(context_length=12, vocab_size=50, width=64, heads=1,
                                                           layers=2), quick_gelu=act == "quick_gelu").eval()
    ours = clip_from_openai(ref.state_dict(), act=act)
    images, ids = torch.randn(2, 3, 32, 32), random_ids(2)
    with torch.no_grad():
        assert (ours.encode_image(images) - ref.encode_image(images, normalize=True)).abs().max() < 1e-4
        assert (ours.encode_text(ids) - ref.encode_text(ids, normalize=True)).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------
# GPT-2: a reference forward written from the GPT-2 definition, straight on the state dict

def gpt2_reference(state, ids, heads):
    """GPT-2's forward: Conv1D layers are x @ W + b with W stored (in, out)."""
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], state[p + ".weight"], state[p + ".bias"], 1e-5)
    conv = lambda x, p: x @ state[p + ".weight"] + state[p + ".bias"]
    B, L = ids.shape
    x = state["wte.weight"][ids] + state["wpe.weight"][:L]
    D = x.shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("h.")})
    causal = torch.full((L, L), float("-inf")).triu(1)
    for n in range(depth):
        q, k, v = conv(ln(x, f"h.{n}.ln_1"), f"h.{n}.attn.c_attn").split(D, -1)
        q, k, v = (t.view(B, L, heads, D // heads).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (D // heads) ** 0.5 + causal, -1) @ v
        x = x + conv(att.transpose(1, 2).reshape(B, L, D), f"h.{n}.attn.c_proj")
        x = x + conv(F.gelu(conv(ln(x, f"h.{n}.ln_2"), f"h.{n}.mlp.c_fc"), approximate="tanh"), f"h.{n}.mlp.c_proj")
    return ln(x, "ln_f") @ state["wte.weight"].T


def gpt2_state(vocab=40, context=16, D=128, depth=2):
    state = {"wte.weight": torch.randn(vocab, D) * 0.1, "wpe.weight": torch.randn(context, D) * 0.1,
             "ln_f.weight": 1 + 0.1 * torch.randn(D), "ln_f.bias": 0.1 * torch.randn(D)}
    for n in range(depth):
        for name, shape in (("ln_1", None), ("ln_2", None), ("attn.c_attn", (D, 3 * D)), ("attn.c_proj", (D, D)),
                            ("mlp.c_fc", (D, 4 * D)), ("mlp.c_proj", (4 * D, D))):
            w = 1 + 0.1 * torch.randn(D) if shape is None else torch.randn(*shape) * shape[0] ** -0.5
            state[f"h.{n}.{name}.weight"] = w
            state[f"h.{n}.{name}.bias"] = 0.1 * torch.randn(D if shape is None else shape[1])
        state[f"h.{n}.attn.bias"] = torch.ones(1, 1, context, context).tril()  # an old release's mask buffer
    return state


def test_from_gpt2_matches_the_reference_forward():
    from text import CausalLM
    state = gpt2_state()
    ids = torch.randint(0, 40, (2, 10))
    hf = {**{"transformer." + k: v for k, v in state.items()}, "lm_head.weight": state["wte.weight"]}
    for layout in (state, hf):  # GPT2Model and GPT2LMHeadModel
        lm = CausalLM.from_gpt2(layout)
        assert (lm.cfg.vocab_size, lm.cfg.context_length, lm.cfg.width, lm.cfg.depth, lm.cfg.heads) == (40, 16, 128, 2, 2)
        with torch.no_grad():
            assert (lm(ids) - gpt2_reference(state, ids, heads=2)).abs().max() < 1e-4
    with pytest.raises(ValueError, match=r"missing \['transformer.h.1.norm2.bias'\]"):
        CausalLM.from_gpt2({k: v for k, v in state.items() if k != "h.1.ln_2.bias"})
    with pytest.raises(ValueError, match="ties them"):
        CausalLM.from_gpt2({**hf, "lm_head.weight": torch.zeros(40, 128)})


def test_from_gpt2_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from text import CausalLM
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=128, n_layer=2,
                                                               n_head=2)).eval()
    ids = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        assert (CausalLM.from_gpt2(ref.state_dict())(ids) - ref(ids).logits).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------
# Tokenizers, on small vocabulary files written here, against hand-worked merges

def test_gpt2_tokenizer_merges_by_rank_and_round_trips(tmp_path):
    import json
    from bpe import GPT2Tokenizer, bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    space = bytes_to_unicode()[ord(" ")]  # "Ġ"
    merges = ["l l", "h e", "he ll", "hell o", f"{space} w", f"{space}w o"]
    vocab = {c: i for i, c in enumerate(chars)}
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = GPT2Tokenizer.from_files(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    # "hello" -> h e l l o -> (l l) -> (h e) -> (he ll) -> (hell o); " wow" -> Ġ w o w -> (Ġ w) -> (Ġw o), w
    hello_wow = [vocab["hello"], vocab[space + "wo"], vocab["w"]]
    assert tok.encode("hello wow") == hello_wow
    for text in ("hello wow", "Héllo, 12 wörld!\n  x", "日本"):
        assert tok.decode(tok.encode(text)) == text  # byte-level: every string round-trips
    eot = vocab["<|endoftext|>"]
    ids = tok(["hello wow", "hello"])  # begun and ended by <|endoftext|>, padded with -1
    assert ids.tolist() == [[eot, *hello_wow, eot], [eot, vocab["hello"], eot, -1, -1]]
    assert tok.decode(ids[1]) == "hello"
    from text import Tokenizer
    assert torch.equal(Tokenizer.from_state_dict(tok.state_dict())(["hello wow"]), ids[:1])


def test_bpe_text_split_by_unicode_letters_and_numbers_by_hand():
    """Catches a `re` stand-in for \\p{L} / \\p{N} / \\s that drops punctuation ("Héllo, 12 wörld!"
    losing ",", "!"), files "²" and "½" (numbers) or a combining mark (neither) under letters, or
    takes the separator \\x1c (not white space in Unicode) for a space."""
    from bpe import CLIPTokenizer, GPT2Tokenizer, unicode_pattern
    gpt2, clip = unicode_pattern(GPT2Tokenizer.PATTERN), unicode_pattern(CLIPTokenizer.PATTERN)
    assert gpt2.findall("Héllo, 12 wörld!\n  x") == ["Héllo", ",", " 12", " wörld", "!", "\n ", " x"]
    assert gpt2.findall("x²! y½ e\u0301 日本's") == ["x", "²", "!", " y", "½", " e", "\u0301", " 日本", "'s"]
    assert clip.findall("a&b 12 x² <|endoftext|>") == ["a", "&", "b", "1", "2", "x", "²", "<|endoftext|>"]
    # a combining mark that case-folds to a letter is not a letter (OpenAI's case-insensitive
    # `regex` drops it from the text altogether: the one code point where the two differ)
    assert clip.findall("\u0345a") == ["\u0345", "a"]
    assert gpt2.findall("a \x1cb\u3000c") == ["a", " \x1c", "b", "\u3000", "c"]


def test_bpe_text_split_equals_the_regex_package_on_every_code_point():
    """The authors split with the `regex` package's \\p{L} and \\p{N}; ours must agree on every
    assigned code point (where `regex` is installed; Unicode versions may differ, so only code
    points this Python knows are compared, and not U+0345: see the test above)."""
    regex = pytest.importorskip("regex")
    import sys
    import unicodedata
    from bpe import CLIPTokenizer, GPT2Tokenizer, unicode_pattern
    chars = [chr(c) for c in range(sys.maxunicode + 1)
             if unicodedata.category(chr(c)) not in ("Cn", "Cs") and c != 0x345]
    text = " ".join("".join(chars[i:i + 7]) for i in range(0, len(chars), 7))  # runs of mixed kinds
    for pattern, flags in ((GPT2Tokenizer.PATTERN, 0), (CLIPTokenizer.PATTERN, regex.IGNORECASE)):
        theirs = regex.compile(pattern.replace("{L}", r"\p{L}").replace("{N}", r"\p{N}").replace("{S}", r"\s"), flags)
        ours = unicode_pattern(pattern)
        sample = text if pattern is GPT2Tokenizer.PATTERN else text.lower()  # CLIP lower-cases first
        assert ours.findall(sample) == theirs.findall(sample)


def test_clip_tokenizer_vocabulary_layout_and_padding(tmp_path):
    import gzip
    from bpe import CLIPTokenizer
    merges = ["h e", "l l", "he ll", "hell o</w>"]
    with gzip.open(tmp_path / "bpe.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\"bpe_simple_vocab_16e6.txt#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer.from_file(str(tmp_path / "bpe.txt.gz"), n_merges=len(merges), context_length=8)
    # the vocabulary: 256 byte characters (printable ASCII first: "!" = 0, "h" = 104 - 33 = 71), the
    # same with "</w>" (+256), one entry per merge (from 512), then <|startoftext|>, <|endoftext|>
    assert len(tok) == 512 + 4 + 2 and (tok.sot, tok.eot) == (516, 517)
    # "Hello" -> cleaned "hello" -> h e l l o</w> -> (h e) (l l) (he ll) (hell o</w>) = merge 3
    assert tok.encode("  Hello  ") == [512 + 3]
    assert tok.encode("hi") == [71, 256 + 72]  # no merge: bytes, the last with its end-of-word mark
    ids = tok(["hello &amp;amp; hi", "hello " * 20])  # HTML entities unescaped twice, as CLIP cleans
    assert ids.shape == (2, 8) and ids[0, 0] == tok.sot and ids[1, -1] == tok.eot  # cut to fit, end kept
    assert ids[0].tolist() == [516, 515, 256 + ord("&") - 33, 71, 256 + 72, 517, 0, 0]
    assert tok.decode(ids[0]) == "hello & hi"
    from text import Tokenizer  # a checkpoint saves it and reads it back
    assert torch.equal(Tokenizer.from_state_dict(tok.state_dict())(["hello hi"]), tok(["hello hi"]))


def test_a_converted_openai_clip_is_evaluated_and_pruned_by_patch_ranking(tmp_path):
    import gzip
    import json
    import subprocess
    import sys
    from test_train import ROOT
    merges = [f"{a} {b}" for a, b in (("h", "e"), ("l", "l"))]
    with gzip.open(tmp_path / "bpe.txt.gz", "wt", encoding="utf-8") as f:
        f.write("#version\n" + "\n".join(merges) + "\n")
    torch.save(OpenAICLIP(vocab=512 + len(merges) + 2, context=12).state_dict(), tmp_path / "weights.pt")
    sh = lambda *args: subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    made = sh("pretrained.py", "--openai", str(tmp_path / "weights.pt"), "--bpe", str(tmp_path / "bpe.txt.gz"),
              "--out", str(tmp_path / "clip"))
    assert made.returncode == 0, made.stderr
    got = sh("eval.py", "--ckpt", str(tmp_path / "clip/ckpt.pt"), "--n-test", "10", "--json")
    assert got.returncode == 0, got.stderr
    assert 0 <= json.loads(got.stdout.strip().splitlines()[-1])["image_to_text_R@1"] <= 1
    ranked = sh("train.py", "--method", "ranking", "--init", str(tmp_path / "clip/ckpt.pt"), "--rank-layer", "1",
                "--train-size", "32", "--test-size", "10", "--rank-images", "8", "--predictor-steps", "2", "--steps", "1",
                "--batch-size", "4", "--out", str(tmp_path / "rank"))
    assert ranked.returncode == 0, ranked.stderr
    assert "frozen CLIP unchanged by training: yes" in ranked.stdout
    bad = sh("pretrained.py", "--openai", str(tmp_path / "bpe.txt.gz"), "--bpe", str(tmp_path / "bpe.txt.gz"), "--out", str(tmp_path / "x"))
    assert bad.returncode != 0 and "neither a state dict" in bad.stderr and "Traceback" not in bad.stderr


def test_a_converted_gpt2_is_the_frozen_lm_of_the_captioner(tmp_path):
    import json
    import subprocess
    import sys
    from test_train import ROOT, TINY
    from bpe import bytes_to_unicode
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = ["e </w>", "t h", "i n", "th e"]  # any rules will do: captions fall back to bytes
    merges = [m for m in merges if all(p in vocab for p in m.split())]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    torch.save(gpt2_state(vocab=len(vocab), context=320, D=64, depth=1), tmp_path / "gpt2.pt")
    sh = lambda *args: subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    made = sh("pretrained.py", "--gpt2", str(tmp_path / "gpt2.pt"), "--vocab", str(tmp_path / "vocab.json"),
              "--merges", str(tmp_path / "merges.txt"), "--out", str(tmp_path / "lm"))
    assert made.returncode == 0, made.stderr
    clip = sh("train.py", *TINY, "--steps", "1", "--batch-size", "4", "--no-eval", "--out", str(tmp_path / "clip"))
    assert clip.returncode == 0, clip.stderr
    cap = sh("train.py", "--method", "evlgen", "--lm", str(tmp_path / "lm/ckpt.pt"), "--clip", str(tmp_path / "clip/ckpt.pt"),
             "--steps", "2", "--batch-size", "4", "--train-size", "16", "--test-size", "4", "--warmup", "1",
             "--out", str(tmp_path / "cap"))
    assert cap.returncode == 0, cap.stderr
    assert "frozen language model unchanged by training: yes" in cap.stdout and "cider_d" in cap.stdout


def test_laion_layout_with_gelu_matches_its_reference_and_quickgelu_would_not():
    """open_clip's LAION releases are OpenAI's layout with GELU: loaded with act="gelu" they match
    the reference; read as QuickGELU (all the file can say) they would be off."""
    ref = OpenAICLIP().eval()
    for block in [*ref.visual.transformer.resblocks, *ref.transformer.resblocks]:
        block.mlp.gelu = nn.GELU()
    images, ids = torch.randn(3, 3, 32, 32), random_ids(3)
    with torch.no_grad():
        want = F.normalize(ref.visual(images), dim=-1), F.normalize(ref.encode_text(ids), dim=-1)
        for act, close in (("gelu", True), ("quick_gelu", False)):
            ours = clip_from_openai(ref.state_dict(), act=act)
            gap = max((ours.encode_image(images) - want[0]).abs().max(), (ours.encode_text(ids) - want[1]).abs().max())
            assert (gap < 1e-5) == close, (act, gap)
    with pytest.raises(ValueError, match="activation 'relu' is not quick_gelu or gelu"):
        clip_from_openai(ref.state_dict(), act="relu")


def write_safetensors_by_hand(path, tensors: dict, cut: int = 0):
    """The format from its definition: 8 bytes of little-endian header length, the JSON header
    (dtype, shape, data_offsets per tensor), the tensors' bytes back to back."""
    import json
    import struct
    names = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}
    header, blobs, at = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = dict(dtype=names[t.dtype], shape=list(t.shape), data_offsets=[at, at + len(raw)])
        blobs.append(raw)
        at += len(raw)
    text = json.dumps(header).encode()
    data = struct.pack("<Q", len(text)) + text + b"".join(blobs)
    path.write_bytes(data[:len(data) - cut])


def test_safetensors_are_read_from_their_definition_and_bad_ones_stop_with_one_sentence(tmp_path):
    from pretrained import read_safetensors, read_weights
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5), "half": torch.randn(2, 2).half()}
    write_safetensors_by_hand(tmp_path / "w.safetensors", tensors)
    got = read_safetensors(str(tmp_path / "w.safetensors"))
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert read_weights(str(tmp_path / "w.safetensors"))["half"].dtype == torch.float32  # as every loader reads
    write_safetensors_by_hand(tmp_path / "cut.safetensors", tensors, cut=3)
    with pytest.raises(ValueError, match="tensor half is truncated or its offsets do not fit its shape"):
        read_safetensors(str(tmp_path / "cut.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(ValueError, match="is not a safetensors file or is truncated"):
        read_safetensors(str(tmp_path / "junk.safetensors"))


def test_elip_fine_tunes_a_converted_clip_from_safetensors_and_eval_reads_the_result(tmp_path):
    """The path of most users: a pretrained CLIP (here OpenAI's layout with random weights, as
    .safetensors) converted, then `--method elip --init` on it, then eval.py on the result."""
    import gzip
    import json
    import subprocess
    import sys
    from test_train import ROOT
    merges = ["h e", "l l"]
    with gzip.open(tmp_path / "bpe.txt.gz", "wt", encoding="utf-8") as f:
        f.write("#version\n" + "\n".join(merges) + "\n")
    ref = OpenAICLIP(vision_depth=6, vocab=512 + len(merges) + 2, context=12)
    write_safetensors_by_hand(tmp_path / "clip.safetensors", ref.state_dict())
    sh = lambda *args: subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    made = sh("pretrained.py", "--openai", str(tmp_path / "clip.safetensors"), "--bpe", str(tmp_path / "bpe.txt.gz"),
              "--out", str(tmp_path / "clip"))
    assert made.returncode == 0, made.stderr
    converted = torch.load(tmp_path / "clip" / "ckpt.pt", weights_only=True)["model"]
    assert torch.equal(converted["text.token_embedding.weight"], ref.token_embedding.weight)
    tuned = sh("train.py", "--method", "elip", "--init", str(tmp_path / "clip/ckpt.pt"), "--train-size", "32",
               "--test-size", "10", "--steps", "2", "--batch-size", "4", "--warmup", "1", "--device", "cpu",
               "--out", str(tmp_path / "elip"))
    assert tuned.returncode == 0, tuned.stderr
    assert "results: method elip | step 2" in tuned.stdout and "image_to_text_R@1" in tuned.stdout
    ckpt = torch.load(tmp_path / "elip" / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["text"]["causal"] and list(ckpt["model_config"]["objectives"]) == ["itc"]
    assert ckpt["tokenizer"]["kind"] == "clip_bpe"
    got = sh("eval.py", "--ckpt", str(tmp_path / "elip/ckpt.pt"), "--n-test", "10", "--prune", "--json")
    assert got.returncode == 0, got.stderr
    assert 0 <= json.loads(got.stdout.strip().splitlines()[-1])["text_to_image_R@1"] <= 1
    mlm = sh("train.py", "--method", "elip", "--objectives", "itc,mlm", "--init", str(tmp_path / "clip/ckpt.pt"),
             "--out", str(tmp_path / "x"))
    assert mlm.returncode != 0 and "tokenizes with CLIP's BPE: train ITC alone" in mlm.stderr


def openai_visual_as_timm(visual: nn.Module) -> dict:
    """A CLIP image tower in timm's layout (vit_base_patch16_clip_224 and kin), written from it:
    no patch-embedding bias, norm_pre, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2},
    norm, and the projection as head (E, D) with a zero bias."""
    s = visual.state_dict()
    out = {"cls_token": s["class_embedding"].reshape(1, 1, -1), "pos_embed": s["positional_embedding"][None],
           "patch_embed.proj.weight": s["conv1.weight"], "norm_pre.weight": s["ln_pre.weight"],
           "norm_pre.bias": s["ln_pre.bias"], "norm.weight": s["ln_post.weight"], "norm.bias": s["ln_post.bias"],
           "head.weight": s["proj"].T.contiguous(), "head.bias": torch.zeros(s["proj"].shape[1])}
    names = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias":
             "attn.qkv.bias", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for key, value in s.items():
        if key.startswith("transformer.resblocks."):
            n, rest = key[len("transformer.resblocks."):].split(".", 1)
            rest = next(rest.replace(a, b, 1) for a, b in names.items() if rest.startswith(a))
            out[f"blocks.{n}.{rest}"] = value
    return out


def test_timm_clip_image_towers_load_with_their_projection():
    from vit import load_timm, timm_projection
    ref = OpenAICLIP().eval()
    for p in ref.parameters():
        p.data += 0.05 * torch.randn_like(p)
    state = openai_visual_as_timm(ref.visual)
    vit = load_timm(state, act="quick_gelu", ln_eps=1e-5)
    assert vit.cfg.pre_norm and vit.patch_embed.proj.bias.abs().sum() == 0  # no bias: read as zero
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(images) @ timm_projection(state).T, ref.visual(images), atol=1e-5, rtol=1e-5)


def test_the_image_tower_starts_from_a_timm_vit_with_its_positions_resized(tmp_path):
    """--init a ViT's weights (as ALBEF and ELIP start from an ImageNet ViT): the image tower takes
    them, its position embeddings resized from the 4x4 grid they were made for to this run's 8x8;
    the text tower and the rest start fresh; a tower of another width stops with one sentence."""
    import subprocess
    import sys
    from start import start_image_tower
    from test_train import ROOT
    from vit import ViT, ViTConfig, resize_pos_embed
    state = openai_visual_as_timm(OpenAICLIP().visual)  # 32 px, patches of 8, width 128, 2 blocks
    vit = ViT(ViTConfig(image_size=64, patch_size=8, width=128, depth=2, heads=2, pre_norm=True))
    start_image_tower(vit, dict(state), "tower")
    assert torch.equal(vit.pos_embed, resize_pos_embed(state["pos_embed"], (8, 8))) and vit.pos_embed.shape[1] == 65
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])
    write_safetensors_by_hand(tmp_path / "tower.safetensors", {k: v for k, v in state.items() if "norm_pre" not in k})
    common = ["--init", str(tmp_path / "tower.safetensors"), "--train-size", "32", "--test-size", "10", "--steps", "1",
              "--batch-size", "4", "--device", "cpu", "--method", "elip"]
    sizes = "width=128,depth=6,heads=2,text_width=32,text_depth=1,embed_dim=16"
    r = subprocess.run([sys.executable, "train.py", *common, "--model-kwargs", sizes, "--out", str(tmp_path / "a")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "does not fit: missing ['blocks.2." in r.stderr and "Traceback" not in r.stderr
    sizes = "width=128,depth=2,heads=2,text_width=32,text_depth=1,embed_dim=16"
    r = subprocess.run([sys.executable, "train.py", *common, "--method", "tome", "--model-kwargs", sizes,
                        "--out", str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "results: method tome" in r.stdout, r.stderr
