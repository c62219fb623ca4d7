"""Loading real pretrained layouts: an OpenAI CLIP state dict, built here with random values by a
reference that follows OpenAI's own module structure (nn.MultiheadAttention, (L, B, D) tensors),
so the comparison checks the renaming, the transposes, the causal mask and the pooling at once."""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import CLIP, openai_config

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
    ours = CLIP.from_openai(state)
    images, ids = torch.randn(3, 3, 32, 32), random_ids(3)
    with torch.no_grad():
        assert (ours.encode_image(images) - F.normalize(ref.visual(images), dim=-1)).abs().max() < 1e-5
        assert (ours.encode_text(ids) - F.normalize(ref.encode_text(ids), dim=-1)).abs().max() < 1e-5
    assert ours.logit_scale.item() == state["logit_scale"].item()  # the log scale, as CLIP stores it


def test_from_openai_runs_every_reducer():
    import train
    ours = CLIP.from_openai(OpenAICLIP().state_dict())
    images = torch.randn(2, 3, 32, 32)
    v = ours.cfg.vision
    for method in ("elip", "evit", "tome"):
        make = train.reducer_fn(train.TrainConfig(method=method, tome_r="2"), v, step=10 ** 6, training=False)
        out = ours.visual.forward_tokens(images, make(None))
        assert out.x.shape[1] < 1 + v.num_patches and torch.isfinite(out.x).all()


def test_from_openai_refuses_a_partial_or_foreign_state_dict():
    state = OpenAICLIP().state_dict()
    with pytest.raises(ValueError, match=r"missing \['text.blocks.1.norm2.bias'\]"):
        CLIP.from_openai({k: v for k, v in state.items() if k != "transformer.resblocks.1.ln_2.bias"})
    with pytest.raises(ValueError, match=r"unexpected \['visual.attnpool.k_proj.weight'\]"):
        CLIP.from_openai({**state, "visual.attnpool.k_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="ResNet CLIPs are not supported"):
        CLIP.from_openai({k: v for k, v in state.items() if k != "visual.conv1.weight"})


def test_from_openai_matches_open_clip():
    open_clip = pytest.importorskip("open_clip")
    ref = open_clip.model.CLIP(32, open_clip.model.CLIPVisionCfg(layers=2, width=128, patch_size=8, image_size=32),
                               open_clip.model.CLIPTextCfg(context_length=12, vocab_size=50, width=64, heads=1,
                                                           layers=2), quick_gelu=True).eval()
    ours = CLIP.from_openai(ref.state_dict())
    images, ids = torch.randn(2, 3, 32, 32), random_ids(2)
    with torch.no_grad():
        assert (ours.encode_image(images) - ref.encode_image(images, normalize=True)).abs().max() < 1e-4
        assert (ours.encode_text(ids) - ref.encode_text(ids, normalize=True)).abs().max() < 1e-4
