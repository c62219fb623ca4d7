import pytest
import torch
import torch.nn.functional as F

import ranking
from model import CLIPConfig, RankingCLIP, RankingConfig
from text import TextConfig
from vit import Tokens, ViTConfig
from checkpoint import load_checkpoint

torch.manual_seed(0)


def tiny_clip(image_size=32, depth=4, dtype=torch.float64):
    cfg = CLIPConfig(vision=ViTConfig(image_size=image_size, patch_size=8, width=32, depth=depth, heads=4),
                     text=TextConfig(vocab_size=20, context_length=8, width=32, depth=1, heads=2), embed_dim=16)
    return RankingCLIP(RankingConfig(clip=cfg, layer=1, num_tokens=2)).to(dtype).eval()


def without(x, patches, fuse):
    """The sequence x (1, 1+P, D) with only `patches` kept; with `fuse`, the mean of the others
    appended once per patch it stands for (what proportional attention computes, without a bias)."""
    seq = x[:, [0] + [1 + p for p in patches]]
    gone = [p for p in range(x.shape[1] - 1) if p not in patches]
    if fuse and gone:
        seq = torch.cat([seq, x[:, [1 + p for p in gone]].mean(1, keepdim=True).expand(-1, len(gone), -1)], 1)
    return seq


def brute_force_greedy(clip, x, layer, groups, chunk, score):
    """The same greedy rule, one image and one candidate at a time, no batching or padding."""
    ref = ranking.embed_from(clip, layer, x)
    alive, removed = list(range(len(groups))), []
    while alive:
        scores = []
        for g in alive:
            patches = sorted(p for h in alive if h != g for p in groups[h])
            scores.append(score(ranking.embed_from(clip, layer, without(x, patches, fuse=False)), ref))
        best = sorted(range(len(alive)), key=lambda j: -scores[j])[:chunk]
        removed += [alive[j] for j in best]
        alive = [g for j, g in enumerate(alive) if j not in best]
    return [p for g in reversed(removed) for p in sorted(groups[g])]


@pytest.mark.parametrize("k,chunk", [(1, 1), (1, 3), (2, 1), (3, 2)])
def test_greedy_search_equals_brute_force(k, chunk):
    clip = tiny_clip(image_size=40)  # a 5x5 grid: 3x3 blocks leave ragged edges, counts are not squares
    x = ranking.layer_input(clip, torch.randn(2, 3, 40, 40, dtype=torch.float64), 1)
    member = ranking.candidate_groups((5, 5), k)
    groups = [row.nonzero()[:, 0].tolist() for row in member]
    assert sorted(p for g in groups for p in g) == list(range(25))  # the blocks tile the grid
    got = ranking.golden_ranking(clip, x, 1, grid=(5, 5), k=k, chunk=chunk)
    cos = lambda e, r: (e * r).sum().item()
    for b in range(2):
        assert got[b].tolist() == brute_force_greedy(clip, x[b:b + 1], 1, groups, chunk, cos)


def test_the_default_search_is_the_exact_greedy_rule():
    """One removal per iteration, in the API and in train.py: the README's tables are searched so."""
    from start import SEARCH
    clip = tiny_clip(image_size=40)
    x = ranking.layer_input(clip, torch.randn(1, 3, 40, 40, dtype=torch.float64), 1)
    groups = [[p] for p in range(25)]
    cos = lambda e, r: (e * r).sum().item()
    assert ranking.golden_ranking(clip, x, 1)[0].tolist() == brute_force_greedy(clip, x, 1, groups, 1, cos)
    assert SEARCH == dict(k=1, chunk=1, mode="similarity")


@pytest.mark.parametrize("k,chunk", [(1, 2), (2, 1)])
def test_greedy_search_with_fusion_follows_the_greedy_rule(k, chunk):
    """With fusion, removing the first single patch only moves it to the end (a fused token of
    one patch is that patch): every candidate ties there, so instead of comparing orders, each
    removal is checked to be among the best by a one-at-a-time evaluation, up to ties."""
    clip = tiny_clip(image_size=40)
    x = ranking.layer_input(clip, torch.randn(2, 3, 40, 40, dtype=torch.float64), 1)
    groups = [row.nonzero()[:, 0].tolist() for row in ranking.candidate_groups((5, 5), k)]
    group_of = {p: g for g, ps in enumerate(groups) for p in ps}
    got = ranking.golden_ranking(clip, x, 1, grid=(5, 5), k=k, chunk=chunk, fuse=True)
    for b in range(2):
        ref = ranking.embed_from(clip, 1, x[b:b + 1])
        removal = list(reversed(list(dict.fromkeys(group_of[p] for p in got[b].tolist()))))
        alive = set(range(len(groups)))
        while alive:
            scores = {g: (ranking.embed_from(clip, 1, without(x[b:b + 1], sorted(p for h in alive - {g} for p in groups[h]),
                                                               fuse=True)) * ref).sum().item() for g in alive}
            take, removal = removal[:min(chunk, len(alive))], removal[min(chunk, len(alive)):]
            bar = sorted(scores.values(), reverse=True)[len(take) - 1]
            assert all(scores[g] >= bar - 1e-9 for g in take)
            alive -= set(take)
    assert not torch.equal(got, ranking.golden_ranking(clip, x, 1, grid=(5, 5), k=k, chunk=chunk))  # it matters


def test_fused_pruning_keeps_the_top_tokens_and_averages_the_rest():
    clip = tiny_clip()
    clip.rcfg.fuse = True
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    x = ranking.layer_input(clip, images, 1)
    scores = torch.rand(2, 16, dtype=torch.float64)
    K = ranking.keep_count(0.6, 16)
    out = clip.visual.forward_tokens(images, clip.reducer(lambda x, vit: scores), track_source=True)
    assert out.x.shape[1] == 1 + K + 1 + 2  # [CLS], the kept patches, the fused one, the learnable tokens
    assert out.size[:, :1 + K + 1].sum(1).tolist() == [17.0, 17.0]  # sizes add up
    # by hand: the kept patches, the mean of the rest once per patch it holds, the learnable tokens
    for b in range(2):
        top = sorted(scores[b].topk(K).indices.tolist())
        seq = torch.cat([without(x[b:b + 1], top, fuse=True), clip.learned_tokens[None].to(x.dtype)], 1)
        for block in clip.visual.blocks[1:]:
            seq = block(seq)
        torch.testing.assert_close(out.x[b, 0], clip.visual.norm(seq)[0, 0])


def test_fused_token_of_patch_ranking_by_hand():
    """Catches Patch Ranking's fused token (ours: a plain mean of the patches not kept, ELIP's
    token with equal weights) weighting by the predictor's scores, letting gradient into them,
    or miscounting its size and source."""
    x = torch.tensor([[[9., 9], [1, 0], [0, 1], [2, 2], [4, 0], [0, 8]]], requires_grad=True)
    tokens = Tokens(x, torch.ones(1, 6), torch.eye(6)[None])
    scores = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]], requires_grad=True)  # keep 2 -> patches 2 and 4
    out = ranking.RankPrune(layer=0, keep=2, scorer=lambda x, vit: scores, fuse=True).before_block(0, tokens, None)
    torch.testing.assert_close(out.x[0], torch.tensor([[9., 9], [0, 1], [4, 0], [1, 10 / 3]]), atol=1e-5, rtol=0)
    assert out.size[0].tolist() == [1, 1, 1, 3]
    assert [row.nonzero().flatten().tolist() for row in out.source[0]] == [[0], [2], [4], [1, 3, 5]]
    out.x[0, -1].sum().backward()
    assert scores.grad is None
    torch.testing.assert_close(x.grad[0, :, 0], torch.tensor([0, 1 / 3, 0, 1 / 3, 0, 1 / 3]), atol=1e-5, rtol=0)


def test_label_and_max_modes_score_a_class_logit():
    clip = tiny_clip()
    x = ranking.layer_input(clip, torch.randn(2, 3, 32, 32, dtype=torch.float64), 1)
    classes = F.normalize(torch.randn(5, 16, dtype=torch.float64), dim=-1)
    labels = torch.tensor([3, 1])
    got = ranking.golden_ranking(clip, x, 1, chunk=4, mode="label", classes=classes, labels=labels)
    for b in range(2):
        logit = lambda e, r: (e[0] @ classes[labels[b]]).item()
        assert got[b].tolist() == brute_force_greedy(clip, x[b:b + 1], 1, [[p] for p in range(16)], 4, logit)
    top = (ranking.embed_from(clip, 1, x) @ classes.T).argmax(-1)
    assert torch.equal(ranking.golden_ranking(clip, x, 1, chunk=4, mode="max", classes=classes),
                       ranking.golden_ranking(clip, x, 1, chunk=4, mode="label", classes=classes, labels=top))
    with pytest.raises(ValueError, match="class embeddings"):
        ranking.golden_ranking(clip, x, 1, mode="label")


def test_predictor_size_and_it_overfits_a_handful_of_rankings():
    b16 = ranking.Predictor(768, 196)
    assert 40_000 < sum(p.numel() for p in b16.parameters()) < 60_000  # METHODS.md: ~46K in theirs
    torch.manual_seed(1)
    feats, golden = torch.randn(6, 16, 32), torch.stack([torch.randperm(16) for _ in range(6)])
    pred = ranking.Predictor(32, 16, dim=16)
    n = 6
    before = ranking.top_n_match(pred(feats), golden, n)
    opt = torch.optim.AdamW(pred.parameters(), lr=3e-3)
    for _ in range(300):
        loss = ranking.listwise_loss(pred(feats), golden)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ranking.top_n_match(pred(feats), golden, n) == 1.0 > before


def test_losses_against_hand_computations():
    golden = torch.tensor([[2, 0, 1]])  # patch 2 most important, patch 1 least
    # target logits by place: patch 2 -> 0, patch 0 -> -0.5/T, patch 1 -> -1/T (T = 0.3)
    perfect = torch.tensor([[-0.5, -1.0, 0.0]]) / 0.3
    assert ranking.listwise_loss(perfect, golden).item() == pytest.approx(0.0, abs=1e-6)
    assert ranking.listwise_loss(torch.zeros(1, 3), golden).item() > 0.1
    assert ranking.pairwise_loss(torch.tensor([[1.0, 0.0, 2.0]]), golden, margin=0.5).item() == 0.0
    # one pair out of order (0 over 2 by 1) among three: relu(0.5 - (-1)) = 1.5, others 0 -> mean 0.5
    assert ranking.pairwise_loss(torch.tensor([[3.0, 0.0, 2.0]]), golden, margin=0.5).item() == pytest.approx(0.5)
    assert ranking.top_n_match(torch.tensor([[1.0, 0.0, 2.0]]), golden, 1) == 1.0
    assert ranking.top_n_match(torch.tensor([[0.0, 1.0, 2.0]]), golden, 1) == 0.0


def test_pruning_with_the_golden_ranking_keeps_exactly_its_top_tokens():
    clip = tiny_clip()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    golden = ranking.golden_ranking(clip, ranking.layer_input(clip, images, 1), 1, chunk=2)
    K = ranking.keep_count(0.6, 16)
    reducer = clip.reducer(ranking.golden_scorer(clip, 1, chunk=2))
    out = clip.visual.forward_tokens(images, reducer, track_source=True)
    assert out.x.shape[1] == 1 + K + 2  # [CLS], the kept patches, the learnable tokens
    held = out.source[:, 1:1 + K, 1:]  # (B, K, P): each kept token holds exactly one patch
    assert (held.sum(-1) == 1).all() and (out.source[:, 1 + K:].sum(-1) == 0).all()  # extras hold none
    for b in range(3):
        assert held[b].argmax(-1).tolist() == sorted(golden[b, :K].tolist())  # the top K, original order


def test_only_the_learnable_tokens_train():
    clip = tiny_clip(dtype=torch.float32)
    clip.freeze_all_but_tokens()
    loss = clip(torch.randn(4, 3, 32, 32), torch.randint(1, 20, (4, 8)))["loss"]
    loss.backward()
    assert clip.learned_tokens.grad is not None and clip.learned_tokens.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in clip.named_parameters() if n != "learned_tokens")


def test_the_cache_resumes_and_refuses_another_checkpoint(tmp_path):
    clip = tiny_clip(dtype=torch.float32)
    images = torch.randn(5, 3, 32, 32)
    cache, ident = str(tmp_path / "rankings.pt"), dict(checkpoint="abc", layer=1, chunk=4)
    first = ranking.search_cached(clip, lambda i: images[i], 2, cache, ident, 1, batch_size=2, chunk=4, say=lambda m: 0)
    full = ranking.search_cached(clip, lambda i: images[i], 5, cache, ident, 1, batch_size=2, chunk=4, say=lambda m: 0)
    assert torch.equal(full[:2], first) and len(torch.load(cache)["rankings"]) == 5
    fresh = ranking.golden_ranking(clip, ranking.layer_input(clip, images, 1), 1, chunk=4)
    assert torch.equal(full, fresh)
    with pytest.raises(ValueError, match="another checkpoint"):
        ranking.search_cached(clip, lambda i: images[i], 5, cache, dict(ident, checkpoint="xyz"), 1, chunk=4)


def test_bad_settings_stop_with_a_message():
    with pytest.raises(ValueError, match="outside the ViT's blocks 0..5"):
        ranking.pruning_layer(6, 6)
    for keep in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
            ranking.keep_count(keep, 64)
    assert ranking.pruning_layer(12) == 3 and ranking.pruning_layer(6) == 2 and ranking.keep_count(0.6, 196) == 118


def test_train_runs_the_phases_reuses_the_caches_and_refuses_a_stale_one(tmp_path):
    from test_train import run, tiny
    clip, other, out = (str(tmp_path / n) for n in ("clip", "other", "rank"))
    for path, seed in ((clip, "0"), (other, "1")):
        assert run([*tiny(depth=4), "--steps", "2", "--batch-size", "8", "--no-eval", "--seed", seed,
                    "--out", path]).returncode == 0
    args = ["--method", "ranking", "--train-size", "64", "--test-size", "20", "--rank-images", "20",
            "--predictor-steps", "10", "--steps", "2", "--batch-size", "8", "--log-every", "1", "--out", out]
    first = run([*args, "--init", f"{clip}/ckpt.pt"])
    assert first.returncode == 0, first.stderr
    assert "golden ranking: 20/20 images" in first.stdout and "predictor step 10/10" in first.stdout
    assert "frozen CLIP unchanged by training: yes" in first.stdout and "results: method ranking" in first.stdout
    again = run([*args, "--init", f"{clip}/ckpt.pt", "--overwrite", "--rank-images", "24"])
    assert again.returncode == 0, again.stderr
    assert "20 of 24 images cached" in again.stdout and "predictor step 10/10" in again.stdout  # 4 more searched
    third = run([*args, "--init", f"{clip}/ckpt.pt", "--overwrite", "--rank-images", "24"])
    assert "all 24 images cached" in third.stdout and "predictor step" not in third.stdout  # both cached
    assert "top-n match" in third.stdout and "results: method ranking" in third.stdout
    stale = run([*args, "--init", f"{other}/ckpt.pt", "--overwrite"])
    assert stale.returncode != 0 and "was made with another checkpoint" in stale.stderr
    assert "Traceback" not in stale.stderr
    fusing = run([*args, "--init", f"{clip}/ckpt.pt", "--overwrite", "--rank-fuse"])  # the cache dropped
    assert fusing.returncode != 0 and "was made with another fuse" in fusing.stderr
    for flags, message in ((["--rank-layer", "4"], "outside the ViT's blocks 0..3"),
                           (["--rank-keep", "1.2"], r"outside (0, 1]"), ([], "pass --init")):
        bad = run([*args[:-2], "--out", str(tmp_path / "bad"), *flags] + (["--init", f"{clip}/ckpt.pt"] if flags else []))
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr


def test_train_caches_the_golden_rankings_a_search_by_hand_finds(tmp_path):
    import prepare
    import train
    from test_train import run, tiny
    clip, out = str(tmp_path / "clip"), str(tmp_path / "rank")
    assert run([*tiny(depth=4), "--steps", "2", "--batch-size", "8", "--no-eval", "--out", clip]).returncode == 0
    args = ["--method", "ranking", "--init", f"{clip}/ckpt.pt", "--train-size", "64", "--rank-images", "6",
            "--predictor-steps", "1", "--steps", "1", "--batch-size", "4", "--no-eval", "--out", out]
    got = run(args)
    assert got.returncode == 0, got.stderr
    cached = torch.load(f"{out}/rankings.pt", weights_only=True)
    assert cached["identity"]["score"] == "similarity" and "fuse" not in cached["identity"]  # as published
    model, _, _ = load_checkpoint(f"{clip}/ckpt.pt")  # the CLIP of --init, on the first 6 training images
    dataset = prepare.build_data(train.parse_args(args), model.cfg.vision.image_size, model.cfg.vision.patch_size, 0)
    x = ranking.layer_input(model, torch.stack([dataset[i]["image"] for i in range(6)]), 1)
    assert torch.equal(cached["rankings"], ranking.golden_ranking(model, x, 1))  # block 1 of 4: 3 of 12, scaled


def test_eval_and_the_ranking_table_read_ranking_checkpoints(tmp_path):
    import json
    import subprocess
    import sys
    from experiments import points as experiment
    from test_train import ROOT, TINY, run, tiny
    clip, out = str(tmp_path / "clip"), str(tmp_path / "rank")
    assert run([*tiny(depth=4), "--steps", "2", "--batch-size", "8", "--no-eval", "--out", clip]).returncode == 0
    assert run(["--method", "ranking", "--init", f"{clip}/ckpt.pt", "--train-size", "64", "--rank-images", "10",
                "--predictor-steps", "2", "--steps", "1", "--batch-size", "8", "--no-eval", "--out", out]).returncode == 0
    got = subprocess.run([sys.executable, "eval.py", "--ckpt", f"{out}/ckpt.pt", "--n-test", "10", "--json"], cwd=ROOT,
                         capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert "image_to_text_R@1" in json.loads(got.stdout.strip().splitlines()[-1])
    points = experiment.ranking_points([f"{out}/ckpt.pt"], n_test=10, repeats=1, batch_size=2)
    names = [p["name"] for p in points]
    assert names[0] == "unpruned" and "golden ranking (oracle)" in names and names[-1].endswith("learnable tokens")
    by = {p["name"]: p for p in points}
    pruned = by["random"]["gflops"]
    assert by["EViT-style [CLS] attention"]["gflops"] == by["golden ranking (oracle)"]["gflops"] == pruned
    assert pruned < by["unpruned"]["gflops"] and pruned < by["predictor"]["gflops"] < by["predictor + 4 learnable tokens"]["gflops"]
    tome = next(p for p in points if p["method"] == "ToMe")
    assert abs(tome["gflops"] - pruned) < 0.25 * (by["unpruned"]["gflops"] - pruned)  # equal FLOPs, as near as r allows
    assert all(0 <= p["zeroshot_top1"] <= 100 for p in points)
    assert tome["paired_r1"] == tome["paired_loss"] == 0 and all(  # every row paired with ToMe, inside its interval
        p[f"paired_{k}_low"] <= p[f"paired_{k}"] <= p[f"paired_{k}_high"] for p in points for k in ("r1", "loss"))
    assert by["unpruned"]["paired_r1"] == pytest.approx(by["unpruned"]["accuracy"] - tome["accuracy"], abs=1e-6)
    assert "| unpruned | 1 |" in experiment.ranking_markdown(points)
    assert all(p["scene_seed"] == 0 and p["n_test"] == 10 for p in points)  # --pool-ranking's check reads them
    import viz
    from test_viz import readable_png
    assert readable_png(viz.draw_masks(f"{out}/ckpt.pt", n=2, out=str(tmp_path / "masks.png")))
