import math

import pytest
import torch

import eval as evaluation
import relevance
import shapes


def brute_force_recall(sim, owner, k):
    """Loops over the definitions: image i is a hit if one of its captions is in its top k;
    caption j is a hit if its image is in the top k of its column."""
    N, M = sim.shape
    i2t = sum(any(owner[j] == i for j in sim[i].argsort(descending=True)[:k].tolist()) for i in range(N)) / N
    t2i = sum(owner[j].item() in sim[:, j].argsort(descending=True)[:k].tolist() for j in range(M)) / M
    return i2t, t2i


def test_retrieval_metrics_match_brute_force():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(30, 8), dim=-1)
    owner = torch.arange(30).repeat_interleave(3)  # three captions per image
    txt = torch.nn.functional.normalize(img[owner] + 0.9 * torch.randn(90, 8), dim=-1)
    got = evaluation.retrieval_metrics(img, txt, owner)
    for k in (1, 5, 10):
        i2t, t2i = brute_force_recall(img @ txt.T, owner, k)
        assert abs(got[f"image_to_text_R@{k}"] - i2t) < 1e-6
        assert abs(got[f"text_to_image_R@{k}"] - t2i) < 1e-6
    assert 0 < got["image_to_text_R@1"] < 1  # the noise makes it a real test


def test_a_collapsed_model_scores_chance_not_a_perfect_score():
    """Catches ties counted for the model: when every image and caption embed alike, each image's
    captions and each caption's image tie with everything, so R@k is chance (by hand: C(M-t, k) /
    C(M, k) the chance that none of an image's t captions is among k of M), not 100%."""
    owner = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 4, 4])  # 1 to 3 captions per image
    N, M = 5, len(owner)
    got = evaluation.retrieval_metrics(torch.ones(N, 4), torch.ones(M, 4), owner)
    counts = owner.bincount().tolist()
    for k in (1, 5):
        i2t = sum(1 - math.comb(M - t, k) / math.comb(M, k) for t in counts) / N
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t, abs=1e-6)
        assert got[f"text_to_image_R@{k}"] == pytest.approx(min(k, N) / N, abs=1e-6)


def test_retrieval_with_ties_equals_the_mean_over_every_tie_break():
    """Catches tie handling that is not a fair random order: scores on a coarse grid tie often,
    and each image's (caption's) hit must equal its hit averaged over every order of the texts
    (images), each order ranking by score, then by the order."""
    import itertools
    torch.manual_seed(0)
    owner = torch.tensor([0, 0, 1, 2, 2, 3])
    N, M = 4, 6
    sim = torch.randint(0, 3, (N, M)).float()
    for k in (1, 2, 3):
        i2t, t2i = evaluation.retrieval_hits(sim, sim, owner, k)
        for i in range(N):
            hits = [any(owner[j] == i for j in sorted(range(M), key=lambda j: (-sim[i, j].item(), order[j]))[:k])
                    for order in itertools.permutations(range(M))]
            assert i2t[i].item() == pytest.approx(sum(hits) / len(hits), abs=1e-6)
        for j in range(M):
            hits = [owner[j].item() in sorted(range(N), key=lambda i: (-sim[i, j].item(), order[i]))[:k]
                    for order in itertools.permutations(range(N))]
            assert t2i[j].item() == pytest.approx(sum(hits) / len(hits), abs=1e-6)
    assert 0 < i2t.mean() < 1 and (sim[:, None] == sim[:, :, None]).sum() > N * M  # real ties, not all hits


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_stop_with_one_sentence(bad):
    """Catches NaN or infinite features scored as if they were numbers (NaN compares false with
    everything, so a diverged model would get whatever the comparisons happen to give)."""
    img, txt = torch.randn(4, 8), torch.randn(6, 8)
    img[2, 3] = bad
    owner = torch.tensor([0, 0, 1, 2, 3, 3])
    with pytest.raises(ValueError, match=r"^1 of 4 image features are NaN or infinite: the model has diverged"):
        evaluation.retrieval_metrics(img, txt, owner)
    with pytest.raises(ValueError, match="NaN or infinite"):
        evaluation.per_image_retrieval(txt[:4], img.repeat(2, 1)[:6], owner, 10.0)


def test_per_image_retrieval_averages_to_the_gallery_metrics():
    """With an uneven number of captions per image: the mean of the per-image shares is the mean R@1,
    and the mean per-image loss is CLIP's contrastive loss on the gallery as one batch (first captions)."""
    from model import contrastive_loss
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    owner = torch.tensor([i for i in range(20) for _ in range(1 + i % 3)])
    owner = owner[torch.randperm(len(owner))]  # 1 to 3 captions per image, shuffled
    txt = torch.nn.functional.normalize(img[owner] + 0.9 * torch.randn(len(owner), 8), dim=-1)
    per = evaluation.per_image_retrieval(img, txt, owner, 10.0)
    i2t, t2i = brute_force_recall(img @ txt.T, owner, 1)
    assert abs(per["r1"].mean().item() - (i2t + t2i) / 2) < 1e-6 and 0 < i2t < 1
    first = torch.tensor([next(j for j in range(len(owner)) if owner[j] == i) for i in range(20)])
    assert torch.allclose(per["loss"].mean(), contrastive_loss(img, txt[first], 10.0), atol=1e-5)


def test_paired_interval_collapses_on_a_constant_and_matches_the_normal_approximation():
    assert evaluation.paired_interval(torch.full((50,), 0.3)) == pytest.approx((0.3, 0.3))
    diff = torch.tensor([1.0, -1.0]).repeat(500)  # mean 0, standard error 1 / sqrt(1000)
    low, high = evaluation.paired_interval(diff)
    assert low == pytest.approx(-1.96 / 1000 ** 0.5, abs=0.01) and high == pytest.approx(1.96 / 1000 ** 0.5, abs=0.01)


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    acc = evaluation.topk_accuracy(logits, labels, ks=(1, 2))
    assert acc["top1"] == pytest.approx(1 / 3) and acc["top2"] == pytest.approx(2 / 3)


def test_shapes_zeroshot_set_holds_one_object_scenes():
    ds = evaluation.ShapesZeroShot(12)
    for k in range(12):
        image, label = ds[k]
        scene = ds.scenes.scene(ds.index[k])[0]
        assert image.shape == (3, 64, 64) and len(scene) == 1
        assert ds.classes[label] == f"{scene[0]['colour']} {scene[0]['shape']}"


def test_object_coverage_by_hand():
    # 4 patches; tokens: [CLS], patch 0 alone, patch 2 alone, a fused token holding patches 1 and 3
    source = torch.tensor([[[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 0, 1]]]).float()
    size = source.sum(-1)
    mask = torch.tensor([[True, True, False, False]])  # the object covers patches 0 and 1
    assert relevance.object_coverage(size, source, mask).tolist() == [0.5]  # patch 1 was fused away


def test_token_relevance_records_every_stage():
    import data
    from elip import ELIP, scaled_schedule
    from model import CLIP, CLIPConfig
    from text import TextConfig, Tokenizer
    from vit import ViTConfig
    ds = shapes.ShapesDataset("test", 8)
    tok = Tokenizer.build([c for i in range(8) for c in ds.captions(i)])
    model = CLIP(CLIPConfig(vision=ViTConfig(width=32, depth=6, heads=2),
                            text=TextConfig(vocab_size=len(tok), width=32, depth=1, heads=2), embed_dim=16))
    r = relevance.token_relevance(model, tok, ds, "cpu", lambda t: ELIP(scaled_schedule(6), 64, t), n=8, batch_size=4)
    assert len(r["coverage"]) == 3 and r["kept"][0] == pytest.approx(57 / 64)
    assert all(0 <= c <= 1 for c in r["coverage"])


def tiny_clip_on_shapes(n=8):
    import data
    from model import CLIP, CLIPConfig
    from text import TextConfig, Tokenizer
    from vit import ViTConfig
    ds = shapes.ShapesDataset("test", n)
    tok = Tokenizer.build([c for i in range(n) for c in ds.captions(i)])
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(vision=ViTConfig(width=32, depth=6, heads=2),
                            text=TextConfig(vocab_size=len(tok), width=32, depth=1, heads=2), embed_dim=16))
    return model.eval(), tok, ds


def test_one_object_captions_name_the_object_and_only_it():
    _, _, ds = tiny_clip_on_shapes(12)
    pairs = relevance.one_object_captions(ds, 12)
    several = [i for i in range(12) if len(ds[i]["attributes"]) >= 2]
    assert [i for i, _, _, _ in pairs] == [i for i in several for _ in (0, 1)]  # each scene twice, both ways
    for i, a, b, caption in pairs:
        named, other = ds[i]["attributes"][a], ds[i]["attributes"][b]
        words = caption.split()
        assert named["colour"] in words and named["shape"] in words and {a, b} == {0, 1}
        if other["colour"] != named["colour"]:
            assert other["colour"] not in words


def test_text_steering_equals_a_loop_over_captions_and_is_zero_without_text():
    from elip import ELIP, scaled_schedule
    model, tok, ds = tiny_clip_on_shapes(10)
    make = lambda t: ELIP(scaled_schedule(6), 64, t, 0.2)  # a strong text share, so the text matters
    got = relevance.text_steering(model, tok, ds, "cpu", make, n=10, batch_size=3)
    named, unnamed = [], []
    with torch.no_grad():
        for i, a, b, caption in relevance.one_object_captions(ds, 10):  # one caption at a time
            item = ds[i]
            recorder = relevance.StageRecorder(make(model.text_guidance(model.text(tok([caption])))))
            model.visual.forward_tokens(item["image"][None], recorder, track_source=True)
            cover = lambda k: [relevance.object_coverage(s, src, item["object_patches"][k][None]).item()
                               for s, src in recorder.stages]
            named.append(cover(a))
            unnamed.append(cover(b))
    assert got["named"] == pytest.approx(torch.tensor(named).mean(0).tolist(), abs=1e-6)
    assert got["unnamed"] == pytest.approx(torch.tensor(unnamed).mean(0).tolist(), abs=1e-6)
    blind = relevance.text_steering(model, tok, ds, "cpu", lambda t: ELIP(scaled_schedule(6), 64, None), n=10)
    assert blind["named"] == pytest.approx(blind["unnamed"], abs=1e-6)  # the same tokens kept for either caption
    assert got["pairs"] == blind["pairs"] > 0


def test_object_prune_keeps_the_object_patches_first():
    from elip import Schedule
    from vit import ViT, ViTConfig
    vit = ViT(ViTConfig(image_size=32, patch_size=8, width=32, depth=3, heads=2)).eval()
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5, 6]] = True  # fewer object patches than kept tokens: all of them stay
    mask[1, [0, 3, 4, 7, 8, 9, 10, 11, 12, 15]] = True  # more: only object patches stay
    reducer = relevance.ObjectPrune(Schedule((1,), (1,), (0.5,)), 16, mask)  # keep 8
    out = vit.forward_tokens(torch.randn(2, 3, 32, 32), reducer, track_source=True)
    kept = [set(out.source[b, 1:9, 1:].nonzero()[:, 1].tolist()) for b in range(2)]  # the 8 un-fused patches
    assert {1, 5, 6} <= kept[0] and len(kept[0]) == 8
    assert kept[1] <= set(mask[1].nonzero()[:, 0].tolist()) and len(kept[1]) == 8
    assert out.size[:, -1].tolist() == [8.0, 8.0]  # the rest fused into one


def test_itm_rerank_reorders_only_the_top_k():
    import data
    from model import CLIP, CLIPConfig
    from text import TextConfig, Tokenizer
    from vit import ViTConfig
    ds = shapes.ShapesDataset("test", 6)
    tok = Tokenizer.build([c for i in range(6) for c in ds.captions(i)])
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(vision=ViTConfig(width=32, depth=2, heads=2), objectives=("itc", "itm"),
                            text=TextConfig(vocab_size=len(tok), width=32, depth=1, heads=2), embed_dim=16)).eval()
    images, captions, owner = data.load_gallery(ds)
    with torch.no_grad():
        img_cls = model.visual.forward_tokens(images).x[:, 0]
        txt_cls = model.text.forward_tokens(tok(captions))[:, 0]
    calls = []

    def oracle_itm(image_tokens, text_tokens, ids):
        """An ITM head that knows the truth: it identifies each pair by its [CLS] tokens."""
        i = (image_tokens[:, 0, None] == img_cls[None]).all(-1).float().argmax(1)
        j = (text_tokens[:, 0, None] == txt_cls[None]).all(-1).float().argmax(1)
        calls.append(len(i))
        return torch.stack([torch.zeros(len(i)), 10.0 * (owner[j] == i).float()], 1)

    model.itm_logits = oracle_itm
    m = evaluation.itm_rerank(model, tok, ds, "cpu", k=30)
    assert m["itm_image_to_text_R@1"] == 1.0 and m["itm_text_to_image_R@1"] == 1.0
    assert sum(calls) == 6 * 30 + 30 * 6  # every image's 30 texts, every text's 6 images
    m = evaluation.itm_rerank(model, tok, ds, "cpu", k=1)  # top-1 only: ITC's R@1 stands
    assert m["itm_image_to_text_R@1"] == evaluation.retrieval(model, tok, ds, "cpu")["image_to_text_R@1"]


def test_mean_over_runs_by_hand():
    runs = [{"a": 0.1, "rel": {}}, {"a": 0.3, "rel": {}}]
    s = evaluation.mean_over_runs(runs)
    assert s["a"]["mean"] == pytest.approx(0.2) and s["a"]["std"] == pytest.approx(0.1414213, rel=1e-5)
    assert s["a"]["n"] == 2 and "rel" not in s


def test_curves_and_time_to_reach(tmp_path):
    import json as _json
    from captioning import curves_table, read_curve, time_to_reach
    from data import DataError
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(_json.dumps(r) for r in [dict(step=1, loss=2.0), dict(step=2, time=10.0, curve=dict(cider_d=0.3)),
                                                    dict(step=4, time=20.0, curve=dict(cider_d=0.6))]))
    b.write_text(_json.dumps(dict(step=8, time=90.0, curve=dict(cider_d=0.5))))
    assert read_curve(str(a)) == [(2, 10.0, 0.3), (4, 20.0, 0.6)]
    assert time_to_reach(read_curve(str(a)), 0.5) == 20.0 and time_to_reach(read_curve(str(a)), 0.7) is None
    table = curves_table([str(a), str(b)])
    assert "s to reach 50.0" in table and "| 60.0 | 20 | 20 |" in table and "| 50.0 | 90 | 90 |" in table
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no cider_d curve"):
        read_curve(str(empty))


def test_elip_lambda_needs_relevance(capsys):
    with pytest.raises(SystemExit):
        evaluation.main(["--ckpt", "missing.pt", "--elip-lambda", "0.5"])
    assert "--elip-lambda applies to --relevance" in capsys.readouterr().err
