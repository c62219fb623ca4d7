import math

import pytest
import torch

from vit import Attention, Block, Reducer, Tokens, ViT, ViTConfig, vit_config

torch.manual_seed(0)


def small_vit(**kw):
    return ViT(ViTConfig(**{**dict(image_size=32, patch_size=8, width=32, depth=4, heads=4), **kw})).eval()


def plain_attention(attn: Attention, x, bias=None, causal=False):
    """Attention written out: softmax(q k^T / sqrt(d) + bias) v, heads concatenated."""
    B, N, D = x.shape
    H, d = attn.heads, attn.head_dim
    q, k, v = attn.qkv(x).split(D, dim=-1)
    q, k, v = (t.view(B, N, H, d).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        logits = logits + bias
    if causal:
        logits = logits.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    probs = logits.softmax(-1)
    return attn.proj((probs @ v).transpose(1, 2).reshape(B, N, D)), probs


def test_sdpa_attention_equals_plain_softmax_with_bias_and_causal():
    attn = Attention(32, 4).eval()
    x = torch.randn(2, 7, 32)
    bias = torch.randn(2, 1, 1, 7)
    out, _ = attn(x, bias)
    ref, _ = plain_attention(attn, x, bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out, _ = attn(x, is_causal=True)
    ref, _ = plain_attention(attn, x, causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cls_attention_is_head_averaged_first_row():
    block = Block(32, 4).eval()
    x = torch.randn(3, 9, 32)
    bias = torch.log(torch.rand(3, 1, 1, 9) + 0.5)
    out, cls_attn = block(x, attn_bias=bias, return_cls_attn=True)
    _, probs = plain_attention(block.attn, block.norm1(x), bias)
    torch.testing.assert_close(cls_attn, probs[:, :, 0].mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cls_attn.sum(-1), torch.ones(3))
    torch.testing.assert_close(out, block(x, attn_bias=bias))
    torch.testing.assert_close(block.cls_attention(x, bias), cls_attn)
    _, stats = block.attend(x, bias, want=("attn_map",))
    torch.testing.assert_close(stats["attn_map"], probs.mean(1), atol=1e-6, rtol=1e-5)  # (B, N, N)
    torch.testing.assert_close(stats["attn_map"][:, 0], cls_attn)


class DropEveryOther(Reducer):
    """Before block `at`: keep [CLS] and every other token."""

    def __init__(self, at):
        self.at = at

    def before_block(self, i, tokens, vit):
        if i != self.at:
            return tokens
        N = tokens.x.shape[1]
        idx = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1, N, 2)])
        return tokens.gather(idx.expand(tokens.x.shape[0], -1))


class MergeNeighbours(Reducer):
    """Between attention and MLP of block `at`: merge token pairs (1,2), (3,4) ... by size-weighted
    mean, and ask for both statistics to check they arrive with the right shapes."""

    def __init__(self, at):
        self.at, self.seen = at, {}

    def wants(self, i):
        return ("cls_attn", "keys") if i == self.at else ()

    def after_attn(self, i, tokens, stats):
        if i != self.at:
            return tokens
        self.seen = {k: v.shape for k, v in stats.items()}
        cls, rest = tokens.x[:, :1], tokens.x[:, 1:]
        B, N, D = rest.shape
        s = tokens.size[:, 1:].view(B, N // 2, 2)
        x = (rest.view(B, N // 2, 2, D) * s[..., None]).sum(2) / s.sum(2)[..., None]
        src = tokens.source[:, 1:].view(B, N // 2, 2, -1).sum(2)
        return Tokens(torch.cat([cls, x], 1), torch.cat([tokens.size[:, :1], s.sum(2)], 1),
                      torch.cat([tokens.source[:, :1], src], 1))


def test_seam_tracks_sizes_and_sources():
    vit = small_vit()
    images = torch.randn(2, 3, 32, 32)
    P = vit.cfg.num_patches  # 16

    class Both(Reducer):
        def __init__(self):
            self.drop, self.merge = DropEveryOther(1), MergeNeighbours(2)

        def wants(self, i):
            return self.merge.wants(i)

        def before_block(self, i, t, v):
            return self.drop.before_block(i, t, v)

        def after_attn(self, i, t, s):
            return self.merge.after_attn(i, t, s)

    both = Both()
    out = vit.forward_tokens(images, both, track_source=True)
    assert out.x.shape == (2, 1 + 4, 32)  # 16 patches -> 8 kept -> 4 merged pairs
    assert both.merge.seen == {"cls_attn": (2, 9), "keys": (2, 9, 8)}
    torch.testing.assert_close(out.size, out.source.sum(-1))  # size = originals held
    assert (out.source.sum(1) <= 1).all()  # no original patch in two tokens
    assert out.source[:, 0, 0].eq(1).all() and out.source[:, 1:, 0].eq(0).all()  # [CLS] stays first
    kept = out.source[0, 1:, 1:].nonzero()[:, 1].tolist()
    assert kept == [0, 2, 4, 6, 8, 10, 12, 14]  # the patches DropEveryOther kept, 0-based
    assert out.size[:, 1:].eq(2).all()


def test_noop_reducer_changes_nothing():
    vit = small_vit()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit(images), vit(images, Reducer()))


def test_position_embedding_interpolates_for_other_image_sizes():
    vit = small_vit()
    assert vit.position_embedding((4, 4)) is vit.pos_embed
    assert vit.position_embedding((6, 6)).shape == (1, 37, 32)
    assert vit.forward_tokens(torch.randn(1, 3, 48, 48)).x.shape == (1, 37, 32)


def test_config_rejects_bad_sizes_and_presets_exist():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        ViTConfig(image_size=60, patch_size=8)
    assert vit_config("vit_b16").num_patches == 196
    with pytest.raises(ValueError, match="unknown ViT preset"):
        vit_config("vit_z99")


def test_parameter_names_follow_timm():
    names = set(small_vit().state_dict())
    for n in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.norm1.weight",
              "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias", "blocks.3.mlp.fc1.weight",
              "blocks.3.mlp.fc2.weight", "norm.weight"):
        assert n in names


def test_load_timm_infers_the_config_and_refuses_partial_loads():
    from vit import load_timm, timm_config
    src = ViT(ViTConfig(image_size=32, patch_size=8, width=128, depth=3, heads=2, mlp_ratio=2.0)).eval()
    state = {**src.state_dict(), "head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10)}
    cfg = timm_config(state)
    assert (cfg.image_size, cfg.patch_size, cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.pre_norm) == \
        (32, 8, 128, 3, 2, 2.0, False)
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_timm(state)(images), src(images))
    with pytest.raises(ValueError, match=r"missing \['blocks.2.norm2.bias'\]"):
        load_timm({k: v for k, v in state.items() if k != "blocks.2.norm2.bias"})
    with pytest.raises(ValueError, match=r"unexpected \['blocks.0.ls1.gamma'\]"):
        load_timm({**state, "blocks.0.ls1.gamma": torch.ones(128)})


def test_load_timm_matches_timm_itself():
    timm = pytest.importorskip("timm")
    from vit import load_timm
    ref = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=2,
                                                            num_heads=2, num_classes=0, global_pool="token").eval()
    ours = load_timm(ref.state_dict())
    images = torch.randn(2, 3, 32, 32)
    assert (ours(images) - ref(images)).abs().max() < 1e-4


def test_load_timm_matches_timms_clip_image_tower():
    """timm's CLIP towers (vit_*_clip_*): pre_norm, no patch-embedding bias, a projection head."""
    timm = pytest.importorskip("timm")
    from functools import partial
    from vit import load_timm, timm_projection
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=16, global_pool="token",
        pre_norm=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-5)).eval()
    state = ref.state_dict()
    ours = load_timm(state, ln_eps=1e-5)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        head = state.get("head.bias", torch.zeros(16))
        assert (ours(images) @ timm_projection(state).T + head - ref(images)).abs().max() < 1e-4
