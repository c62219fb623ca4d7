import math

import pytest
import torch

from merge import ToMe, bipartite_soft_matching, merge_schedule, merge_tokens, size_bias, tome
from vit import Tokens, ViT, ViTConfig


def matching_by_hand(metric, r, class_token=True):
    """METHODS.md §4 for one sample, with Python loops: a list of output groups (input indices)."""
    N = len(metric)
    r = min(r, (N - int(class_token)) // 2)
    A, Bs = list(range(0, N, 2)), list(range(1, N, 2))
    unit = [m / m.norm() for m in metric]
    best = {}
    for a in A:
        sims = [-math.inf if (class_token and a == 0) else float(unit[a] @ unit[b]) for b in Bs]
        j = max(range(len(Bs)), key=lambda j: (sims[j], -j))  # first of equal best
        best[a] = (sims[j], Bs[j])
    ranked = sorted(A, key=lambda a: (-best[a][0], a))  # earlier first among ties
    merging = set(ranked[:r])
    groups = [[a] for a in A if a not in merging]
    for b in Bs:
        groups.append([b] + sorted(a for a in merging if best[a][1] == b))
    return groups


def groups_from_source(source):
    return [sorted(torch.nonzero(row).flatten().tolist()) for row in source]


@pytest.mark.parametrize("N,r", [(9, 2), (9, 4), (9, 10), (10, 3), (2, 1), (17, 0)])
def test_matching_equals_the_definition(N, r):
    torch.manual_seed(N * 10 + r)
    metric = torch.randn(3, N, 5)
    merge, _ = bipartite_soft_matching(metric, r)
    tokens = Tokens(torch.randn(3, N, 4), torch.ones(3, N), torch.eye(N).expand(3, -1, -1))
    out = merge_tokens(merge, tokens)
    for b in range(3):
        expected = matching_by_hand(metric[b], r)
        got = groups_from_source(out.source[b])
        assert sorted(map(sorted, got)) == sorted(map(sorted, expected))
        assert got[0] == [0]  # [CLS] first and alone
        for g, row in zip(got, range(len(got))):  # value = mean of the group (sizes all 1)
            torch.testing.assert_close(out.x[b, row], tokens.x[b, g].mean(0))
    assert out.x.shape[1] == N - min(r, (N - 1) // 2)


def test_ties_go_to_the_earlier_token():
    # every token identical: all scores tie; A tokens 2 and 4 (the earliest non-CLS) merge into B token 1
    metric = torch.ones(1, 7, 3)
    merge, _ = bipartite_soft_matching(metric, 2)
    out = merge_tokens(merge, Tokens(torch.arange(7.)[None, :, None], torch.ones(1, 7), torch.eye(7)[None]))
    assert groups_from_source(out.source[0]) == [[0], [6], [1, 2, 4], [3], [5]]
    torch.testing.assert_close(out.x[0, :, 0], torch.tensor([0, 6, 7 / 3, 3, 5]))


def test_hand_checked_case():
    # 5 tokens: A = 0 (CLS), 2, 4; B = 1, 3. Token 4 is parallel to 3, token 2 close to 1.
    metric = torch.tensor([[[1., 0, 0], [0, 1, 0], [0, 1, .5], [0, 0, 1], [0, 0, 2]]])
    merge, unmerge = bipartite_soft_matching(metric, 1)
    x = torch.tensor([[[10.], [1.], [2.], [3.], [4.]]])
    size = torch.tensor([[1., 1., 1., 3., 1.]])
    out = merge_tokens(merge, Tokens(x, size))
    # 4 merges into 3 (cosine 1 beats 2's 0.89): size-weighted (3*3 + 4*1) / 4
    assert out.x[0, :, 0].tolist() == [10, 2, 1, 13 / 4]
    assert out.size[0].tolist() == [1, 1, 1, 4]
    mean = merge_tokens(merge, Tokens(x, size), mode="mean")  # EVLGen's plain mean
    assert mean.x[0, -1, 0].item() == 3.5
    assert unmerge(out.x)[0, :, 0].tolist() == [10, 1, 2, 13 / 4, 13 / 4]


def test_sizes_add_up_and_unmerge_inverts_on_groups():
    torch.manual_seed(0)
    metric, x = torch.randn(2, 33, 8), torch.randn(2, 33, 6)
    merge, unmerge = bipartite_soft_matching(metric, 9)
    out = merge_tokens(merge, Tokens(x, torch.ones(2, 33), torch.eye(33).expand(2, -1, -1)))
    assert out.size.sum(1).tolist() == [33, 33]
    assert torch.equal(out.source.sum(-1), out.size)
    back = unmerge(out.x)  # every input gets its group's value
    for b in range(2):
        for row, g in enumerate(groups_from_source(out.source[b])):
            torch.testing.assert_close(back[b, g], out.x[b, row].expand(len(g), -1))


def test_schedule_constant_list_decreasing_and_cap():
    assert merge_schedule(13, 12, 197)[0] == [13] * 12
    dec, _ = merge_schedule(4, 5, 1000, decreasing=True)
    assert dec == [8, 6, 4, 2, 0] and sum(dec) == 4 * 5
    capped, note = merge_schedule(30, 4, 65)
    assert capped == [30, 17, 8, 4] and "layer 1: 30 -> 17" in note  # 65 -> 35 -> 18 -> 10 -> 6
    assert merge_schedule([1, 2], 2, 65) == ([1, 2], "")
    with pytest.raises(ValueError, match="2 values"):
        merge_schedule([1, 2, 3], 2, 65)


def test_proportional_attention_counts_a_merged_token_as_its_copies():
    """Attention over [a, b] with b of size 3 equals attention over [a, b, b, b]."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)
    F = torch.nn.functional
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=size_bias(torch.tensor([[1., 3.]])))
    k4, v4 = k[:, :, [0, 1, 1, 1]], v[:, :, [0, 1, 1, 1]]
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k4, v4))


def test_tome_reducer_in_the_vit():
    cfg = ViTConfig(image_size=32, patch_size=8, width=32, depth=3, heads=2)
    vit = ViT(cfg).eval()
    images = torch.randn(2, 3, 32, 32)
    out = vit.forward_tokens(images, tome(cfg.depth, cfg.num_patches, 3), track_source=True)
    assert out.x.shape == (2, 17 - 9, 32)
    assert out.size.sum(1).tolist() == [17, 17] and out.source[:, 0, 0].tolist() == [1, 1]
    zero = vit(images, ToMe([0, 0, 0]))  # r = 0 everywhere: exactly the plain ViT
    torch.testing.assert_close(zero, vit(images))


def test_train_with_tome_reports_the_cap_once_and_eval_merges_off_the_shelf(tmp_path):
    from test_train import TINY, run
    import subprocess, sys, os
    out = str(tmp_path / "tome")
    r = run([*TINY, "--method", "tome", "--tome-r", "40", "--steps", "2", "--batch-size", "8", "--out", out])
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("r capped at what the tokens allow") == 1 and "layer 0: 40 -> 32" in r.stdout
    assert "results: method tome | step 2" in r.stdout
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "eval.py", "--ckpt", f"{out}/ckpt.pt", "--tome-r", "auto", "--n-test", "10"],
                       cwd=root, capture_output=True, text=True)
    assert r.returncode == 0 and "r per block [25, 19]" in r.stderr  # auto: 156/197 of 65 tokens over 2 blocks, capped
    assert "image_to_text_R@1" in r.stdout


# ----------------------------------------------------------------------------------------------
# ToMe inside a transformer stack, against the definition written out block by block

def reduced_stack_by_definition(blocks, x, r, mode="wavg", prop_attn=True):
    """One sample (N, D) through `blocks`, merging r[i] tokens between attention and MLP of block i:
    attention with log(size) added to every key's logits, matching on that block's keys averaged
    over heads (`matching_by_hand`), values merged by size-weighted or plain mean. Returns the
    values, sizes and groups of original token indices, before any final norm."""
    size, groups = torch.ones(len(x), dtype=x.dtype), [[i] for i in range(len(x))]
    for block, r_i in zip(blocks, r):
        attn = block.attn
        H, d = attn.heads, attn.head_dim
        q, k, v = (block.norm1(x) @ attn.qkv.weight.T + attn.qkv.bias).split(H * d, -1)
        q, k, v = (t.view(-1, H, d).transpose(0, 1) for t in (q, k, v))  # (H, N, d)
        logits = q @ k.transpose(1, 2) / math.sqrt(d) + (size.log() if prop_attn else 0)
        heads = (logits.softmax(-1) @ v).transpose(0, 1).reshape(len(x), H * d)
        x = x + heads @ attn.proj.weight.T + attn.proj.bias
        if r_i:
            out_groups = matching_by_hand(k.mean(0), r_i)
            if mode == "wavg":
                x = torch.stack([(size[g, None] * x[g]).sum(0) / size[g].sum() for g in out_groups])
            else:
                x = torch.stack([x[g].mean(0) for g in out_groups])
            size = torch.stack([size[g].sum() for g in out_groups])
            groups = [sorted(sum((groups[i] for i in g), [])) for g in out_groups]
        x = x + block.mlp(block.norm2(x))
    return x, size, groups


def test_tome_in_the_vit_equals_the_definition_block_by_block():
    """Catches ToMe bugs that only show inside the ViT: the wrong block's keys as the metric, keys
    not averaged over heads, proportional attention missing or with size instead of log(size),
    sizes not carried between blocks, an unweighted mean, merged tokens out of order."""
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, width=32, depth=3, heads=2)
    vit = ViT(cfg).double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.double)
    r = [3, 4, 2]
    with torch.no_grad():
        got = vit.forward_tokens(images, ToMe(r), track_source=True)
        start = vit.embed(images).x
        for b in range(2):
            x, size, groups = reduced_stack_by_definition(vit.blocks, start[b], r)
            torch.testing.assert_close(got.x[b], vit.norm(x))
            torch.testing.assert_close(got.size[b], size)
            assert groups_from_source(got.source[b]) == groups
            assert len(set(map(len, groups))) > 1  # sizes differ, so the weighting was exercised


@pytest.mark.parametrize("mode,prop_attn", [("mean", False), ("wavg", True)])
def test_merging_bridge_equals_the_definition_block_by_block(mode, prop_attn):
    """Catches the same bugs in EVLGen's bridge, for its published plain mean without proportional
    attention and for ToMe's weighting: the Linear, every layer's merge, the final norm."""
    from merge import MergingBridge
    torch.manual_seed(1)
    bridge = MergingBridge(in_dim=12, width=16, depth=3, heads=2, r=[4, 3, 3], mode=mode,
                           prop_attn=prop_attn).double().eval()
    feats = torch.randn(2, 17, 12, dtype=torch.double)
    with torch.no_grad():
        got = bridge(feats, track_source=True)
        for b in range(2):
            x, size, groups = reduced_stack_by_definition(bridge.blocks, bridge.input_proj(feats[b]), [4, 3, 3],
                                                          mode, prop_attn)
            torch.testing.assert_close(got.x[b], bridge.norm(x))
            torch.testing.assert_close(got.size[b], size)
            assert groups_from_source(got.source[b]) == groups
