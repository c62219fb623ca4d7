import pytest
import torch

import eval as evaluation


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
