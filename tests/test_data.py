import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import shapes
from data import DataError


def test_shapes_are_deterministic_from_seed_and_index():
    a, b = shapes.ShapesDataset("train", 50, seed=3), shapes.ShapesDataset("train", 50, seed=3)
    for i in (0, 7, 49):
        torch.testing.assert_close(a[i]["image"], b[i]["image"])
        assert a[i]["captions"] == b[i]["captions"]
    c = shapes.ShapesDataset("train", 50, seed=4)
    assert not torch.equal(a[0]["image"], c[0]["image"])
    cached = shapes.ShapesDataset("train", 50, seed=3, cache=True)
    for _ in range(2):  # first read renders, second comes from the cache
        torch.testing.assert_close(cached[5]["image"], a[5]["image"])


def scene_key(scene):
    return tuple(sorted((o["shape"], o["colour"], o["size"], o["row"], o["col"]) for o in scene))


def test_splits_are_disjoint_by_scene():
    train = {scene_key(shapes.ShapesDataset("train", 3000).scene(i)[0]) for i in range(3000)}
    test = {scene_key(shapes.ShapesDataset("test", 600).scene(i)[0]) for i in range(600)}
    assert train and test and not (train & test)


def test_patch_masks_match_the_drawn_pixels():
    ds = shapes.ShapesDataset("test", 40, image_size=64, patch_size=8)
    for i in range(40):
        scene, rng = ds.scene(i)
        shapes.caption_scene(scene, rng)  # the rng goes on to draw the texture, as in render()
        texture = shapes.render_background(rng, 64)
        image = shapes.render_scene(scene, texture)
        changed = (image != np.clip(texture, 0, 255).astype(np.uint8)).any(-1)  # pixels an object painted
        blocks = changed.reshape(8, 8, 8, 8).any(axis=(1, 3)).reshape(-1)  # (64,) patches
        item = ds[i]
        torch.testing.assert_close(item["image"], data.to_tensor(image))
        assert torch.equal(item["patch_mask"], torch.from_numpy(blocks)), i
        assert item["object_patches"].shape == (len(scene), 64)
        assert torch.equal(item["object_patches"].any(0), item["patch_mask"])


def test_captions_name_every_object():
    ds = shapes.ShapesDataset("train", 20)
    for i in range(20):
        scene, _ = ds.scene(i)
        for cap in ds[i]["captions"]:
            for o in scene:
                assert o["shape"] in cap and o["colour"] in cap and o["size"] in cap
        assert len(set(ds[i]["captions"])) > 1  # paraphrases, not copies


def test_background_is_textured():
    item = shapes.ShapesDataset("train", 1)[0]
    patches = item["image"].unfold(1, 8, 8).unfold(2, 8, 8).reshape(3, 64, -1)[:, ~item["patch_mask"]]
    assert patches.std(-1).min() > 0.01  # no flat background patch: merging it must not be trivial


def test_transforms_sizes_and_normalisation_round_trip():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8))
    assert data.resize_center_crop(img, 32).size == (32, 32)
    assert data.random_resized_crop(img, 24, np.random.default_rng(1)).size == (24, 24)
    x = data.to_tensor(img)
    assert x.shape == (3, 50, 80)
    back = (data.denormalize(x) * 255).round().permute(1, 2, 0).numpy()
    np.testing.assert_allclose(back, np.asarray(img), atol=1)


def write_images(root, names):
    for n in names:
        Image.fromarray(np.full((20, 30, 3), 100, np.uint8)).save(root / n)


def test_albef_coco_and_csv_caption_files(tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    albef = tmp_path / "albef.json"
    albef.write_text(json.dumps([{"image": "a.png", "caption": "a cat"}, {"image": "b.png", "caption": ["x", "y"]}]))
    ds = data.CaptionDataset(str(albef), str(tmp_path), image_size=16)
    assert len(ds) == 2 and ds.captions(1) == ["x", "y"] and ds[0]["image"].shape == (3, 16, 16)
    coco = tmp_path / "captions_val.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 1, "caption": "two"}]}))
    assert data.CaptionDataset(str(coco), str(tmp_path)).captions(0) == ["one", "two"]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("image\tcaption\na.png\ta dog\nb.png\ta bird\n")
    assert [data.CaptionDataset(str(tsv), str(tmp_path)).captions(i) for i in range(2)] == [["a dog"], ["a bird"]]


def test_bad_caption_files_name_the_problem(tmp_path):
    write_images(tmp_path, ["a.png"])
    csv = tmp_path / "c.csv"
    csv.write_text("a.png,fine\nmissing.png,gone\n")
    with pytest.raises(DataError, match=r"missing\.png .*c\.csv line 2\) does not exist"):
        data.CaptionDataset(str(csv), str(tmp_path))
    ds = data.CaptionDataset(str(csv), str(tmp_path), skip_bad=True)
    assert len(ds) == 1 and ds.missing == 1
    empty = tmp_path / "e.csv"
    empty.write_text("a.png,fine\na.png,  \n")
    with pytest.raises(DataError, match=r"e\.csv line 2 has an empty caption"):
        data.CaptionDataset(str(empty), str(tmp_path))
    with pytest.raises(DataError, match="unknown format"):
        (tmp_path / "x.yaml").write_text("a: b")
        data.CaptionDataset(str(tmp_path / "x.yaml"))


def test_corrupt_image_is_named_or_skipped(tmp_path):
    write_images(tmp_path, ["good.png"])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    f = tmp_path / "c.csv"
    f.write_text("bad.png,broken\ngood.png,fine\n")
    with pytest.raises(DataError, match=r"bad\.png .*line 1\) cannot be read"):
        data.CaptionDataset(str(f), str(tmp_path))[0]
    item = data.CaptionDataset(str(f), str(tmp_path), skip_bad=True)[0]
    assert item["captions"] == ["fine"] and item["skipped"] == 1


def test_image_folder(tmp_path):
    for c in ("red_car", "tree"):
        (tmp_path / c).mkdir()
        write_images(tmp_path / c, ["1.png", "2.jpg"])
    ds = data.ImageFolder(str(tmp_path), image_size=16)
    assert ds.classes == ["red car", "tree"] and len(ds) == 4
    image, label = ds[3]
    assert image.shape == (3, 16, 16) and label == 1


def test_training_batches_carry_uint8_and_normalise_to_what_evaluation_reads(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "caps.csv").write_text("".join(f"{i}.png,picture {i}\n" for i in range(3)))
    caps = data.CaptionDataset(str(tmp_path / "caps.csv"), str(tmp_path), 16)
    scenes = shapes.ShapesDataset("train", 4, 32, 8)
    clips = shapes.ShapesVideoDataset("train", 2, 32, 8, frames=3)
    for ds in (caps, scenes, clips):
        pairs = data.Pairs(ds, lambda texts: torch.zeros(len(texts), 4, dtype=torch.long), seed=0)
        images, _, _ = pairs.collate([pairs[(0, 0)], pairs[(1, 1)]])
        assert images.dtype == torch.uint8  # a quarter of float32's bytes through workers and to the GPU
        assert torch.equal(data.normalize(ds.get(0)["image"]), ds[0]["image"])  # the eval path, to the bit
    by_hand = (torch.from_numpy(np.asarray(scenes.rendered(0)[0], np.float32) / 255).permute(2, 0, 1)
               - torch.tensor(data.CLIP_MEAN).view(3, 1, 1)) / torch.tensor(data.CLIP_STD).view(3, 1, 1)
    assert torch.equal(data.normalize(scenes.get(0)["image"]), by_hand)


def test_jpegs_decode_at_a_reduced_size_only_where_it_still_covers_the_target(tmp_path):
    from PIL import Image
    Image.new("RGB", (640, 480), (10, 120, 200)).save(tmp_path / "a.jpg", quality=90)
    Image.new("RGB", (640, 480), (10, 120, 200)).save(tmp_path / "a.png")
    path = str(tmp_path / "a.jpg")
    assert data.load_image(path, "x").size == (640, 480)
    assert data.load_image(path, "x", 224).size == (320, 240)  # 1/2 still covers 224 on both sides
    assert data.load_image(path, "x", 100).size == (160, 120)  # 1/4
    assert data.load_image(path, "x", 300).size == (640, 480)  # 1/2 would not: full size
    assert data.load_image(str(tmp_path / "a.png"), "x", 100).size == (640, 480)  # not a JPEG: as it is


def write_shard(path, samples):
    """A WebDataset shard as img2dataset writes one: KEY.jpg and KEY.txt per sample (None: left out)."""
    import io
    import tarfile
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            for ext, payload in (("jpg", image), ("txt", None if caption is None else caption.encode())):
                if payload is not None:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def jpeg_bytes(seed, size=(48, 40)):
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_webdataset_shards_read_like_a_caption_file(tmp_path):
    import io
    from PIL import Image
    for s in range(2):
        write_shard(tmp_path / f"{s:05d}.tar", [(f"{s}{k:04d}", jpeg_bytes(10 * s + k), f"picture {s} {k}") for k in range(5)])
    assert data.shard_paths("a/{008..011}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar", "a/011.tar"]
    assert data.is_shards("a/{0..3}.tar") and data.is_shards("one.tar") and not data.is_shards("caps.csv")
    ds = data.image_text_pairs(str(tmp_path / "{00000..00001}.tar"), image_size=32)
    assert len(ds) == 10 and ds.captions(7) == ["picture 1 2"]
    by_hand = data.to_tensor(data.resize_center_crop(Image.open(io.BytesIO(jpeg_bytes(12))).convert("RGB"), 32))
    assert torch.equal(ds[7]["image"], by_hand) and ds.get(7, np.random.default_rng(0))["image"].dtype == torch.uint8
    # a sample without its caption, then a shard cut off inside its last image
    write_shard(tmp_path / "gap.tar", [("a", jpeg_bytes(1), "one"), ("b", jpeg_bytes(2), None), ("c", jpeg_bytes(3), "three")])
    with pytest.raises(DataError, match=r"gap.tar: sample b has no caption \(.txt\) \(pass --skip-bad"):
        data.TarShards(str(tmp_path / "gap.tar"), 32)
    skipped = data.TarShards(str(tmp_path / "gap.tar"), 32, skip_bad=True)
    assert [ds_item["captions"] for ds_item in skipped.items] == [["one"], ["three"]] and skipped.missing == 1
    whole = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[:len(whole) - 3000])
    with pytest.raises(DataError, match=r"cut.tar is truncated or not a tar file at sample 00004"):
        data.TarShards(str(tmp_path / "cut.tar"), 32)
    cut = data.TarShards(str(tmp_path / "cut.tar"), 32, skip_bad=True)
    assert len(cut) == 4 and cut.missing == 1  # the complete samples before the cut
    with pytest.raises(DataError, match=r"shard .*00002.tar does not exist"):  # the first one missing
        data.TarShards(str(tmp_path / "{00000..00009}.tar"), 32)


def test_csv_columns_by_name_and_tsv_without_quote_handling(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "caps.tsv").write_text('title\tfilepath\tother\nthe "big" one\ta.png\tx\n')
    rows = data.read_caption_file(str(tmp_path / "caps.tsv"), ("filepath", "title"))
    assert rows == [("a.png", 'the "big" one', f"{tmp_path / 'caps.tsv'} line 2")]  # quotes are text in a TSV
    (tmp_path / "caps.csv").write_text('filepath,title\na.png,"a, quoted caption"\n')
    assert data.read_caption_file(str(tmp_path / "caps.csv"), ("filepath", "title"))[0][1] == "a, quoted caption"
    with pytest.raises(DataError, match=r"line 1 \(the header\) has no column 'caption' .*its columns: title, filepath"):
        data.read_caption_file(str(tmp_path / "caps.tsv"), ("filepath", "caption"))
