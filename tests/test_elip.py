import re

import pytest
import torch

from elip import ELIP, Schedule, evit, evit_schedule, prune_and_fuse, scaled_schedule
from test_vit import plain_attention
from vit import Tokens, ViT, ViTConfig

torch.manual_seed(0)


def small_vit(depth=6):
    return ViT(ViTConfig(image_size=32, patch_size=8, width=32, depth=depth, heads=4)).eval()


def kept_patches(tokens):
    """Per image, the sorted original patches (0-based) held by the kept, un-fused tokens."""
    src = tokens.source[:, 1:, 1:]  # (B, N-1, P)
    single = src.sum(-1) == 1
    return [sorted(src[b][single[b]].nonzero()[:, 1].tolist()) for b in range(src.shape[0])]


def test_schedule_token_counts():
    authors = scaled_schedule(12)
    assert (authors.begin_layers, authors.num_layers) == ((2, 4, 10), (2, 6, 2))
    assert authors.keep_counts(196) == [176, 127, 78]
    per_layer = [196] * 2 + [177] * 2 + [128] * 6 + [79] * 2  # kept + the fused token
    assert 0.28 < 1 - sum(per_layer) / (196 * 12) < 0.30  # METHODS.md: ~29% removed on average
    six = scaled_schedule(6)
    assert (six.begin_layers, six.num_layers) == ((1, 2, 5), (1, 3, 1))
    assert evit_schedule(12).begin_layers == (4, 7, 10)
    for depth in (4, 6, 8, 12, 24):
        scaled_schedule(depth).validate(depth, 64)


@pytest.mark.parametrize("schedule, message", [
    (Schedule((1, 2), (2, 1), (0.9, 0.5)), "stage 1 (begin 2) overlaps stage 0"),
    (Schedule((1, 5), (1, 3), (0.9, 0.5)), "blocks 5..7 run past the depth 6"),
    (Schedule((1,), (1,), (1.5,)), "keep ratio 1.5 must be in"),
    (Schedule((1, 2), (1, 1), (0.5,)), "lists differ in length"),
])
def test_bad_schedules_name_the_entry(schedule, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        schedule.validate(6, 64)


def test_prune_and_fuse_weights_sum_to_one_and_carry_no_gradient():
    x = torch.randn(2, 7, 4, requires_grad=True)
    scores = torch.rand(2, 6, requires_grad=True)
    tokens = Tokens(x, torch.ones(2, 7), torch.eye(7).expand(2, -1, -1))
    out = prune_and_fuse(tokens, scores, keep=3)
    assert out.x.shape == (2, 1 + 3 + 1, 4)
    top = scores.detach().topk(3, dim=1).indices.sort(1).values
    assert torch.equal(out.source[:, 1:4, 1:].argmax(-1), top)  # top-K, original order
    out.x[:, -1].sum().backward()  # the fused token alone
    w = x.grad[:, 1:, 0]  # d fused / d x_j = the weight of token j
    assert scores.grad is None  # the weights are detached...
    assert w.abs().sum() > 0  # ...the token values are not
    torch.testing.assert_close(w.sum(1), torch.ones(2), atol=1e-5, rtol=0)
    assert (w.gather(1, top) == 0).all()  # kept tokens do not leak into the fused one
    torch.testing.assert_close(out.size.sum(1), torch.full((2,), 7.0))  # sizes add up
    torch.testing.assert_close(out.source[:, -1, 1:].sum(1), torch.full((2,), 3.0))


def fused_by_hand_case():
    """One image, 5 patches. Tokens 1 and 5 already stand for 2 and 3 patches (an earlier fusion),
    so sizes and sources are not all ones. Scores 0.1 0.4 0.05 0.3 0.15: keep 2 -> tokens 2 and 4;
    tokens 1, 3, 5 fuse with weights 0.1, 0.05, 0.15 over 0.3 = 1/3, 1/6, 1/2."""
    x = torch.tensor([[[9., 9], [1, 0], [0, 1], [2, 2], [4, 0], [0, 8]]], requires_grad=True)
    size = torch.tensor([[1., 2, 1, 1, 1, 3]])
    holds = [{0}, {1, 6}, {2}, {3}, {4}, {5, 7, 8}]  # original tokens ([CLS] = 0) each one holds
    source = torch.tensor([[[float(j in h) for j in range(9)] for h in holds]])
    return Tokens(x, size, source), torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]], requires_grad=True)


def test_fused_token_by_hand_with_unequal_scores_and_sizes():
    """Catches a fused token that averages the pruned tokens uniformly (or by size) instead of by
    their scores, loses sizes or sources of already-fused tokens, lets gradient into the weights,
    or blocks it from the values."""
    tokens, scores = fused_by_hand_case()
    out = prune_and_fuse(tokens, scores, keep=2)
    assert groups(out) == [[0], [2], [4], [1, 3, 5, 6, 7, 8]]  # [CLS], the kept in order, the fused
    fused = (0.1 * torch.tensor([1., 0]) + 0.05 * torch.tensor([2., 2]) + 0.15 * torch.tensor([0., 8])) / (0.3 + 1e-6)
    torch.testing.assert_close(out.x[0, -1], fused)  # = (2/3, 13/3)
    torch.testing.assert_close(out.x[0, :3], tokens.x[0, [0, 2, 4]])
    assert out.size[0].tolist() == [1, 1, 1, 2 + 1 + 3]
    out.x[0, -1].sum().backward()
    assert scores.grad is None  # the weights carry no gradient...
    weights = torch.tensor([0, 1 / 3, 0, 1 / 6, 0, 1 / 2])  # ...the values do, each by its weight
    torch.testing.assert_close(tokens.x.grad[0], weights[:, None].expand(-1, 2), atol=1e-5, rtol=0)


def groups(tokens, b=0):
    return [row.nonzero().flatten().tolist() for row in tokens.source[b]]


def test_evit_fuses_by_the_cls_attention_of_its_block_by_hand():
    """Catches EViT fusing with anything but the head-averaged [CLS] attention of the pruning
    block on its own input (another block's, one head's, logits before the softmax), or fusing
    the tokens after the MLP instead of between attention and MLP."""
    from vit import Observed
    vit = small_vit(depth=4)
    images = torch.randn(2, 3, 32, 32)
    seen = {}

    class Record(Observed):
        def observe(self, i, hook, before, after):
            seen[i, hook] = (before, after)

    vit.forward_tokens(images, Record(evit(4, 16)), track_source=True)
    layer = 1  # EViT's layer 3 of 12, scaled to 4 blocks
    block, x_in = vit.blocks[layer], seen[layer, "before_block"][1].x
    _, probs = plain_attention(block.attn, block.norm1(x_in))  # (B, H, N, N)
    s = probs.mean(1)[:, 0, 1:]  # the [CLS] row over the patches, averaged over heads
    x_mid, out = seen[layer, "after_attn"]
    keep = int(16 * 0.7)
    for b in range(2):
        top = s[b].topk(keep).indices
        pruned = torch.ones(16, dtype=torch.bool)
        pruned[top] = False
        w = s[b] * pruned / (s[b] * pruned).sum()
        torch.testing.assert_close(out.x[b, -1], (w[:, None] * x_mid.x[b, 1:]).sum(0), atol=1e-5, rtol=1e-4)
        assert out.size[b, -1] == 16 - keep and w[pruned].std() > 0  # unequal weights were exercised


@pytest.mark.parametrize("prop_attn,rollout", [(False, False), (True, False), (True, True)])
def test_lookahead_scores_equal_a_hand_written_lookahead(prop_attn, rollout):
    vit = small_vit()
    with torch.no_grad():  # larger weights: attention far from uniform, so a missed bias shows
        for block in vit.blocks:
            block.attn.qkv.weight.mul_(10)
            block.attn.proj.weight.mul_(10)
    images, text = torch.randn(3, 3, 32, 32), torch.randn(3, 32)
    schedule = scaled_schedule(6)  # stage 0: before block 1, one block; stage 1: blocks 2..4
    elip = ELIP(schedule, 16, text=text, lam=0.8, prop_attn=prop_attn, rollout=rollout)
    out = vit.forward_tokens(images, elip, track_source=True)
    # by hand, stage 1: run to block 2 with stage 0's pruning, then look ahead through blocks 2..4
    tokens = vit.embed(images, track_source=True)
    tokens = tokens.replace(x=vit.blocks[0](tokens.x))
    tokens = prune_and_fuse(tokens, elip.scores[1], 14)
    bias = tokens.size.log()[:, None, None, :] if prop_attn else None  # the fused token: log 2
    tokens = tokens.replace(x=vit.blocks[1](tokens.x, bias))
    x = tokens.x.clone()
    x[:, 0] = 0.8 * x[:, 0] + 0.2 * text
    maps = []
    for j in (2, 3):
        maps.append(plain_attention(vit.blocks[j].attn, vit.blocks[j].norm1(x), bias)[1].mean(1))  # (B, N, N)
        x = vit.blocks[j](x, bias)
    _, probs = plain_attention(vit.blocks[4].attn, vit.blocks[4].norm1(x), bias)
    row = probs[:, :, 0].mean(1)  # (B, N): the [CLS] row at the stage's last block
    if rollout:  # back through blocks 3 and 2: row <- row (I + A) / 2
        eye = torch.eye(row.shape[1])
        row = torch.einsum("bj,bji->bi", row, (eye + maps[1]) / 2)
        row = torch.einsum("bj,bji->bi", row, (eye + maps[0]) / 2)
    torch.testing.assert_close(elip.scores[2], row[:, 1:], atol=1e-5, rtol=1e-4)
    assert out.x.shape[1] == 1 + 6 + 1  # 16 patches: keep 14, 10, then 6 (+ the fused token)
    torch.testing.assert_close(out.size.sum(1), torch.full((3,), 17.0))


def test_text_changes_the_choice_and_no_text_means_lambda_one():
    """Catches text that does not reach the look-ahead, and a missing text treated as a zero
    vector mixed in with weight 1 - lambda (which shrinks the [CLS] and changes the choice):
    without text ELIP must score exactly as with lambda = 1, whatever the text."""
    vit = small_vit()
    images = torch.randn(4, 3, 32, 32)
    schedule = scaled_schedule(6)
    plain = vit.forward_tokens(images, ELIP(schedule, 16, text=None, lam=0.2), track_source=True)
    guided = vit.forward_tokens(images, ELIP(schedule, 16, text=30 * torch.randn(4, 32), lam=0.0), track_source=True)
    assert kept_patches(plain) != kept_patches(guided)
    ignored = ELIP(schedule, 16, text=30 * torch.randn(4, 32), lam=1.0)
    same = vit.forward_tokens(images, ignored, track_source=True)
    assert kept_patches(plain) == kept_patches(same)
    torch.testing.assert_close(plain.x, same.x)


def test_lambda_one_without_lookahead_equals_evit_selection():
    vit = small_vit(depth=12)
    images = torch.randn(2, 3, 32, 32)
    out = vit.forward_tokens(images, evit(12, 16), track_source=True)
    # EViT by hand: inside layers 3, 6, 9, keep the top 70% of the patches there by [CLS] attention
    tokens = vit.embed(images, track_source=True)
    for i, block in enumerate(vit.blocks):
        x, stats = block.attend(tokens.x, want=("cls_attn",))
        tokens = tokens.replace(x=x)
        if i in (3, 6, 9):
            keep = {3: 11, 6: 7, 9: 5}[i]  # int(16 * 0.7 ** k)
            tokens = prune_and_fuse(tokens, stats["cls_attn"][:, 1:], keep)
        tokens = tokens.replace(x=block.feed_forward(tokens.x))
    assert kept_patches(out) == kept_patches(tokens)
    torch.testing.assert_close(out.x[:, 0], vit.norm(tokens.x)[:, 0])
    same = ELIP(evit_schedule(12), 16, text=torch.randn(2, 32), lam=1.0, lookahead=False)
    assert kept_patches(vit.forward_tokens(images, same, track_source=True)) == kept_patches(out)


def test_keep_scale_warms_up_from_no_pruning():
    vit = small_vit()
    images = torch.randn(2, 3, 32, 32)
    none = vit.forward_tokens(images)
    warm = vit.forward_tokens(images, evit(6, 16, keep_scale=0.0))
    torch.testing.assert_close(warm.x, none.x)


def test_fused_prop_attn_equals_the_pruned_tokens_as_copies_of_the_fused_one():
    """With proportional attention the fused token of size s acts in attention exactly as s
    identical copies of it would: checked against a plain block run on such a sequence."""
    vit = small_vit(depth=2)
    images = torch.randn(3, 3, 32, 32)
    schedule = Schedule((1,), (1,), (0.5,))  # before block 1: keep 8 of 16 patches, fuse 8
    elip = ELIP(schedule, 16, prop_attn=True)
    out = vit.forward_tokens(images, elip)
    tokens = vit.embed(images)
    assert elip.attn_bias(tokens) is None  # nothing fused yet: SDPA without a mask
    tokens = prune_and_fuse(tokens.replace(x=vit.blocks[0](tokens.x)), elip.scores[1], 8)
    assert tokens.size[:, -1].tolist() == [8.0] * 3
    copies = torch.cat([tokens.x[:, :-1], tokens.x[:, -1:].expand(-1, 8, -1)], 1)  # (B, 1+8+8, D)
    by_hand = vit.norm(vit.blocks[1](copies))
    torch.testing.assert_close(out.x[:, :-1], by_hand[:, :9], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.x[:, -1:], by_hand[:, 9:10], atol=1e-5, rtol=1e-4)
    authors = vit.forward_tokens(images, ELIP(schedule, 16))  # the papers': no bias, a different result
    assert not torch.allclose(authors.x[:, 0], out.x[:, 0], atol=1e-4)
