"""viz.py: the drawn mask against a hand-made source map, pixel for pixel; every entry point writes a PNG."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import viz
from test_train import TINY, run


def test_drawn_tokens_match_a_synthetic_source_map_pixel_for_pixel():
    # a 2x2 grid of 3x3-pixel patches: token 1 holds patch 0 alone, token 2 holds patches 1 and 3
    # (the right column), nothing holds patch 2 any more ([CLS] is token 0)
    image = np.arange(6 * 6 * 3, dtype=float).reshape(6, 6, 3) / 108
    source = np.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 1]], dtype=float)
    size = source.sum(1)
    got = viz.draw_tokens(image, size, source, patch=3)
    want = image.copy()
    want[:, 3:6] = image[:, 3:6].reshape(-1, 3).mean(0)  # patches 1 and 3: their token's mean colour,
    want[:, 3:6] = viz.OUTLINE  # outlined on the image border and towards patches 0 and 2 ...
    for r in (1, 2, 3, 4):  # ... but not inside, nor between patches 1 and 3 (rows 2 and 3)
        want[r, 4] = image[:, 3:6].reshape(-1, 3).mean(0)
    lum = image[3:6, 0:3].mean(-1, keepdims=True)
    want[3:6, 0:3] = 0.6 + viz.GREY_WEIGHT * (lum - 0.6)  # patch 2: greyed
    np.testing.assert_allclose(got, want)  # patch 0 (held alone): unchanged
    assert viz.patch_owner(size, source).tolist() == [1, 2, -1, 2]
    # a pruning method's fused token (patches 1 and 3) is dimmed as the dropped patch 2 is, not outlined
    pruned = viz.draw_tokens(image, size, source, patch=3, merged=False)
    dim = lambda rows, cols: np.repeat(0.6 + viz.GREY_WEIGHT * (image[rows, cols].mean(-1, keepdims=True) - 0.6), 3, -1)
    np.testing.assert_allclose(pruned[:, 3:6], dim(slice(0, 6), slice(3, 6)))
    np.testing.assert_allclose(pruned[3:6, 0:3], dim(slice(3, 6), slice(0, 3)))
    np.testing.assert_allclose(pruned[0:3, 0:3], image[0:3, 0:3])


def readable_png(path):
    with Image.open(path) as im:
        im.verify()
    return True


def test_masks_for_every_reducer_and_a_note_for_none(tmp_path):
    out = str(tmp_path / "clip")
    assert run([*TINY, "--steps", "1", "--batch-size", "8", "--no-eval", "--out", out]).returncode == 0
    for method in ("elip", "evit", "tome"):
        png = viz.draw_masks(f"{out}/ckpt.pt", method, n=2, out=str(tmp_path / f"{method}.png"))
        assert readable_png(png)
    png = viz.draw_masks(f"{out}/ckpt.pt", "", n=2, out=str(tmp_path / "none.png"))  # --method none: a note
    assert readable_png(png)
    from experiments import points as experiment  # the accuracy-cost points come from a measurement, then plot
    points = experiment.tome_sweep(f"{out}/ckpt.pt", rs=(0, 8), batch_size=4, repeats=1, n_test=10)
    assert [p["name"] for p in points] == ["none", "ToMe r=8"] and points[1]["gflops"] < points[0]["gflops"]
    assert all(0 <= p["accuracy"] <= 100 and p["img_s"] > 0 for p in points)
    assert readable_png(viz.plot_tradeoff(points, str(tmp_path / "t.png")))


def test_curves_skip_empty_and_partial_logs_with_a_warning(tmp_path):
    good, empty, partial = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    good.write_text("\n".join(json.dumps(dict(step=s, time=s * 2.0, loss=1 / s)) for s in range(1, 5)))
    empty.write_text("")
    partial.write_text(json.dumps(dict(step=1, loss=1.0)) + "\n{\"step\": 2, \"lo")
    with pytest.warns(UserWarning) as record:
        png = viz.plot_curves([str(good), str(empty), str(partial)], out=str(tmp_path / "c.png"))
    messages = " ".join(str(w.message) for w in record)
    assert str(empty) in messages and f"line 2 of log {partial}" in messages
    assert readable_png(png)


def test_pareto_front_and_tradeoff_plot(tmp_path):
    pts = [dict(name="none", accuracy=30, img_s=10, gflops=2.0), dict(name="a", accuracy=29, img_s=15, gflops=1.5),
           dict(name="b", accuracy=25, img_s=12, gflops=1.8), dict(name="c", accuracy=20, img_s=20, gflops=1.0)]
    assert [p["name"] for p in viz.pareto_front(pts, "img_s", "accuracy")] == ["none", "a", "c"]
    assert readable_png(viz.plot_tradeoff(pts, str(tmp_path / "t.png")))
