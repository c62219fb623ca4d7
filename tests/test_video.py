"""Video: the moving-shapes clips, clip folders from disk, the temporal contextualizer (identity at
the start, attention over frames at each position, only it learns in the ViT), motion accuracy."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import shapes
from checkpoint import load_checkpoint
from eval import format_table
from captioning import motion_accuracy
from merge import TemporalAttention, TemporalContext
from captioner import Captioner, CaptionerConfig
from text import LMConfig, TextConfig
from vit import ViT, ViTConfig

from test_train import ROOT, TINY, run


def colour_centroids(frames, colour):
    """(T, 2) mean x, y of the pixels painted exactly in `colour`, frame by frame."""
    out = []
    for f in frames:
        ys, xs = np.nonzero((f == np.array(shapes.COLOURS[colour])).all(-1))
        out.append((xs.mean(), ys.mean()))
    return np.array(out)


def test_objects_move_the_way_their_captions_say():
    ds = shapes.ShapesVideoDataset("train", 60, image_size=64, frames=4)
    seen = set()
    for i in range(len(ds)):
        frames, captions, scene = ds.render(i)
        if len(scene) != 1:
            continue  # one object: its pixels are the pixels of its colour
        o = scene[0]
        c = colour_centroids(frames, o["colour"])
        shift = c[-1] - c[0]  # pixels, image y grows downwards
        want = np.array(shapes.DIRECTIONS[o["motion"]]) * shapes.TRAVEL * 64 / 3
        assert np.abs(shift - want).max() < 3.5, (o, shift, want)  # rasterising and the image edge move it a little
        assert all(shapes.motion_of(cap, o["colour"], o["shape"]) == o["motion"] for cap in captions), captions
        seen.add(o["motion"])
    assert seen == set(shapes.MOTIONS)


def test_clips_are_deterministic_and_splits_disjoint():
    a, b = shapes.ShapesVideoDataset("train", 5), shapes.ShapesVideoDataset("train", 5)
    assert torch.equal(a[3]["image"], b[3]["image"]) and a[3]["captions"] == b[3]["captions"]
    assert a[0]["image"].shape == (4, 3, 64, 64)
    key = lambda s: repr(sorted((o["shape"], o["colour"], o["size"], o["row"], o["col"], o["motion"]) for o in s))
    train, test = shapes.ShapesVideoDataset("train", 400), shapes.ShapesVideoDataset("test", 100)
    assert not {key(train.scene(i)[0]) for i in range(400)} & {key(test.scene(i)[0]) for i in range(100)}


def test_motion_of_and_motion_accuracy_by_hand():
    cap = "a small red circle moves to the left and a blue square of large size stays still"
    assert shapes.motion_of(cap, "red", "circle") == "left"
    assert shapes.motion_of(cap, "blue", "square") == "still"
    assert shapes.motion_of(cap, "green", "cross") is None  # not named
    assert shapes.motion_of(cap, "red", "square") == "left"  # found by its colour: the shape is often wrong
    two_reds = "a red circle goes up and a red cross moving down"
    assert shapes.motion_of(two_reds, "red", "cross") == "down" and shapes.motion_of(two_reds, "red", "diamond") == "up"
    scenes = [[dict(colour="red", shape="circle", motion="left"), dict(colour="blue", shape="square", motion="still")],
              [dict(colour="green", shape="cross", motion="up")], [dict(colour="purple", shape="cross", motion="down")]]
    cands = [cap, "a green cross moves down", "a purple cross"]
    # objects: left right, still right, up wrong, down missing -> 2 of 4; moving ones: left only -> 1 of 3;
    # one-object clips: "down" for up, nothing for down -> 0 of 2
    assert motion_accuracy(cands, scenes) == dict(motion_accuracy=2 / 4, direction_accuracy=1 / 3,
                                                  direction_accuracy_one_object=0.0,
                                                  direction_said=dict(left={}, right={}, up={"down": 1}, down={"none": 1}))
    assert motion_accuracy(["a blue circle goes up"], [scenes[1]])["direction_accuracy_one_object"] == 1.0
    said = motion_accuracy(["a red cross is still", "a red cross moves left", "a red cross goes left"],
                           [scenes[2]] * 3)["direction_said"]
    assert said == dict(left={}, right={}, up={}, down={"still": 1, "left": 2})
    assert "moving down  first motion word said: left 2, still 1" in format_table(dict(direction_said=said))


def test_on_the_axis_counts_the_first_words_on_the_true_axis_by_hand():
    from experiments.video import on_the_axis
    said = dict(left={"left": 3, "right": 2, "up": 1}, right={"none": 4}, up={"down": 5}, down={"down": 1, "still": 2})
    # on the axis: left 3 + right 2 (moving left), down 5 (moving up), down 1 (moving down); 18 clips in all
    assert on_the_axis(said) == (11, 18)
    assert on_the_axis(dict(left={}, right={}, up={}, down={})) == (0, 0)


def test_paired_motion_differences_are_the_accuracies_differences_by_hand():
    from captioning import cider_d
    from experiments.video import paired_motion
    scenes = [[dict(colour="red", shape="circle", motion="left"), dict(colour="blue", shape="square", motion="still")],
              [dict(colour="green", shape="cross", motion="up")], [dict(colour="purple", shape="cross", motion="down")]]
    refs = [["a red circle moves to the left and a blue square stays still"], ["a green cross moves up"],
            ["a purple cross moves down"]]
    a = ["a red circle moves to the left and a blue square stays still", "a green cross moves down", "a purple cross"]
    b = ["a red circle moves to the left", "a green cross moves up", "a purple cross moves down"]
    got = paired_motion(a, b, refs, scenes)
    # A: objects 2 of 4, one-mover clips 0 of 2; B: objects 3 of 4 (the blue square unnamed), one-mover clips 2 of 2.
    # Hits per clip A - B: +1, -1, -1 -> mean -1/3, times 3 clips / 4 objects = -1/4
    assert got["motion_accuracy"]["diff"] == pytest.approx(motion_accuracy(a, scenes)["motion_accuracy"]
                                                           - motion_accuracy(b, scenes)["motion_accuracy"]) == -0.25
    assert got["direction_accuracy_one_object"]["diff"] == -1.0 and got["direction_accuracy_one_object"]["clips"] == 2
    assert got["cider_d"]["diff"] == pytest.approx(cider_d(a, refs) - cider_d(b, refs))
    assert got["motion_accuracy"]["clips"] == got["cider_d"]["clips"] == 3
    same = paired_motion(a, a, refs, scenes)
    assert all(v["diff"] == 0.0 and v["interval"] == (0.0, 0.0) for v in same.values())


def test_the_contextualizer_is_the_identity_at_initialisation():
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=32, patch_size=8, width=32, depth=3, heads=2)).eval()
    ctx = TemporalContext(depth=3, width=32, heads=2, frames=4, frame_embed=True)
    for layer in ctx.layers:  # everything random but the gate: the output must still be the input
        torch.nn.init.normal_(layer.frame_embed)
    x = torch.randn(2 * 4, 3, 32, 32)
    assert torch.equal(vit.forward_tokens(x, ctx).x, vit.forward_tokens(x).x)
    t = torch.randn(8, 17, 32)
    assert torch.equal(ctx.layers[0](t), t)


def attention_over_frames_by_loop(layer, x, T, H):
    """The definition, one clip and one spatial position at a time."""
    BT, N, C = x.shape
    out = torch.empty_like(x)
    for b in range(BT // T):
        for n in range(N):
            v = x[b * T:(b + 1) * T, n]  # (T, C): this position in every frame of clip b
            h = v + layer.frame_embed
            q, k = layer.q(h).view(T, H, -1), layer.k(h).view(T, H, -1)
            heads = []
            for j in range(H):
                w = (q[:, j] @ k[:, j].T / q.shape[-1] ** 0.5).softmax(-1)  # (T, T)
                heads.append(w @ v.view(T, H, -1)[:, j])
            out[b * T:(b + 1) * T, n] = v + layer.alpha * torch.cat(heads, -1)
    return out


@pytest.mark.parametrize("B,T,N,C,H,dim", [(2, 4, 5, 12, 3, 6), (3, 2, 1, 8, 2, 4), (1, 5, 7, 16, 4, 8)])
def test_attention_over_frames_matches_the_definition(B, T, N, C, H, dim):
    torch.manual_seed(B * T)
    layer = TemporalAttention(C, H, T, dim, frame_embed=True).double()
    with torch.no_grad():
        layer.alpha.fill_(0.7)
        layer.frame_embed.normal_()
    x = torch.randn(B * T, N, C, dtype=torch.double)
    out = layer(x)
    assert out.shape == (B * T, N, C)
    torch.testing.assert_close(out, attention_over_frames_by_loop(layer, x, T, H))


def test_without_the_frame_embedding_frame_order_is_lost():
    """The published module treats frames as a set: the frame average cannot tell a clip from its
    reverse (left from right). The frame embedding breaks that symmetry."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 16)  # (B, T, N, C)
    reverse = x.flip(1)
    for embed, same in ((False, True), (True, False)):
        layer = TemporalAttention(16, 2, 4, 8, frame_embed=embed)
        with torch.no_grad():
            layer.alpha.fill_(1.0)
            if embed:
                layer.frame_embed.normal_()
        avg = lambda clip: layer(clip.flatten(0, 1)).view(2, 4, 9, 16).mean(1)
        assert torch.allclose(avg(x), avg(reverse), atol=1e-6) == same


def tiny_video_captioner(**kw):
    cfg = CaptionerConfig(vision=ViTConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
                          lm=LMConfig(vocab_size=30, context_length=40, width=32, depth=1, heads=2),
                          text=TextConfig(vocab_size=30, context_length=40, width=32, depth=2, heads=2),
                          frames=3, **kw)
    torch.manual_seed(0)
    return Captioner(cfg)


def test_only_the_contextualizer_learns_inside_the_vit():
    model = tiny_video_captioner(temporal=True).train()
    with torch.no_grad():
        for layer in model.temporal.layers:
            layer.alpha.fill_(0.5)  # at 0, only the gates would get a gradient
    clips, ids = torch.randn(2, 3, 3, 32, 32), torch.randint(4, 30, (2, 6))
    model(clips, ids)["loss"].backward()
    assert all(p.grad is None for p in model.visual.parameters())
    assert all(p.grad is None for p in model.lm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.temporal.parameters())
    assert all(p.grad is not None for p in model.bridge.parameters())


def test_a_new_video_captioner_is_frame_averaging_and_checks_the_clip_length():
    with_ctx, without = tiny_video_captioner(temporal=True).eval(), tiny_video_captioner(temporal=False).eval()
    without.load_state_dict({k: v for k, v in with_ctx.state_dict().items() if not k.startswith("temporal.")})
    clips = torch.randn(2, 3, 3, 32, 32)
    by_hand = torch.stack([without.visual.forward_tokens(c).x for c in clips]).mean(1)  # each clip's frames, averaged
    torch.testing.assert_close(with_ctx.visual_tokens(clips), by_hand)
    assert torch.equal(with_ctx.visual_tokens(clips), without.visual_tokens(clips))
    with pytest.raises(ValueError, match="clips of 3 frames, got 2"):
        with_ctx.visual_tokens(clips[:, :2])


def write_clip(folder, sizes):
    folder.mkdir(parents=True)
    for k, size in enumerate(sizes):
        Image.new("RGB", size, (20 * k, 0, 0)).save(folder / f"{k:03d}.png")


def test_clip_folders_give_evenly_spaced_frames_and_name_bad_clips(tmp_path):
    write_clip(tmp_path / "good", [(40, 30)] * 5)
    write_clip(tmp_path / "short", [(40, 30)] * 2)
    write_clip(tmp_path / "mixed", [(40, 30), (40, 30), (30, 40), (40, 30)])
    (tmp_path / "empty").mkdir()
    def caption_file(name, clips):
        path = tmp_path / name
        path.write_text(json.dumps([dict(image=c, caption="a red square moves up") for c in clips]))
        return str(path)
    clip = data.VideoCaptionDataset(caption_file("good.json", ["good"]), str(tmp_path), image_size=16, frames=4)[0]
    assert clip["image"].shape == (4, 3, 16, 16)
    red = data.denormalize(clip["image"][:, :, 8, 8].T[..., None, None].permute(1, 0, 2, 3))[:, 0, 0, 0] * 255
    torch.testing.assert_close(red, torch.tensor([0.0, 20, 60, 80]), atol=1.0, rtol=0)  # frames 0, 1, 3, 4 of 5
    with pytest.raises(data.DataError, match=r"clip .*short .*has 2 frame\(s\), fewer than the 4"):
        data.VideoCaptionDataset(caption_file("s.json", ["good", "short"]), str(tmp_path), 16, frames=4)
    with pytest.raises(data.DataError, match=r"clip .*empty .*holds no frame images"):
        data.VideoCaptionDataset(caption_file("e.json", ["empty"]), str(tmp_path), 16, frames=4)
    mixed = data.VideoCaptionDataset(caption_file("m.json", ["mixed"]), str(tmp_path), 16, frames=4)
    with pytest.raises(data.DataError, match=r"clip .*mixed .*frames of different sizes: 30x40, 40x30"):
        mixed.get(0)
    with pytest.raises(data.DataError, match=r"clip folder .*nowhere .*does not exist"):
        data.VideoCaptionDataset(caption_file("n.json", ["nowhere"]), str(tmp_path), 16, frames=4)


def test_video_lm_then_video_captioner_end_to_end(tmp_path):
    clip, lm, cap = (str(tmp_path / n) for n in ("clip", "lm", "cap"))
    small = [*TINY, "--batch-size", "8", "--steps", "3"]
    assert run([*small, "--out", clip]).returncode == 0
    r = run([*small, "--method", "lm", "--video", "--out", lm])
    assert r.returncode == 0 and "perplexity" in r.stdout, r.stderr
    r = run([*small, "--method", "evlgen", "--video", "--frames", "3", "--lm", f"{lm}/ckpt.pt", "--clip",
             f"{clip}/ckpt.pt", "--lr", "0.05", "--out", cap])
    assert r.returncode == 0, r.stderr
    assert "frozen language model unchanged by training: yes" in r.stdout and "direction_accuracy" in r.stdout
    gates = [float(a) for a in r.stdout.split("temporal gates (alpha per ViT block, 0 at the start):")[1].split()[:2]]
    assert all(a != 0.0 for a in gates)  # the gates moved
    state = torch.load(f"{cap}/ckpt.pt", weights_only=True)["model"]
    clip_state = torch.load(f"{clip}/ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(v, clip_state[k]) for k, v in state.items() if k.startswith("visual."))
    r = subprocess.run([sys.executable, "eval.py", "--ckpt", f"{cap}/ckpt.pt", "--n-test", "5"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "motion_accuracy" in r.stdout and "temporal gates" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "eval.py", "--ckpt", f"{cap}/ckpt.pt", "--n-test", "5", "--json"], cwd=ROOT,
                       capture_output=True, text=True)
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    from experiments import video  # the runs table says what eval.py says, and what the run was trained with
    row = [cell.strip() for cell in video.video_runs([f"{cap}/ckpt.pt"], n_test=5).splitlines()[-1].split("|")[1:-1]]
    assert row[1:5] == ["0", "3", "contextualizer, learning rate x1", "no"]
    keys = ("cider_d", "bleu4", "motion_accuracy", "direction_accuracy", "direction_accuracy_one_object")
    assert row[5:10] == [f"{100 * metrics[k]:.1f}" for k in keys]
    assert row[11].split() == [f"{a:+.2f}" for a in metrics["temporal_alpha"]]
    # a captioner against itself, clip by clip: no difference, and an interval of none
    table = video.video_paired([f"{cap}/ckpt.pt", f"{cap}/ckpt.pt"] * 2, n_test=5)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()[2:]]
    assert len(rows) == 2 and rows[0] == rows[1]  # a row per pair
    assert rows[0][2:4] == ["0", "3"] and rows[0][4].startswith("5 (")
    assert [cell.split(", ", 2)[2] for cell in rows[0][5:]] == ["+0.0 [+0.0, +0.0]"] * 3
    assert [cell.split(", ")[0] for cell in rows[0][5:7]] == [f"{100 * metrics[k]:.1f}" for k in
                                                             ("motion_accuracy", "direction_accuracy_one_object")]
    with pytest.raises(data.DataError, match="in pairs A B"):
        video.video_paired([f"{cap}/ckpt.pt"] * 3, n_test=5)
    with pytest.raises(data.DataError, match="not a video captioner"):
        video.video_paired([f"{lm}/ckpt.pt", f"{cap}/ckpt.pt"], n_test=5)
    # the frame embedding (ours) is trained, saved and read back; a resume keeps the clips' length
    embedded = str(tmp_path / "embedded")
    r = run([*small, "--method", "evlgen", "--video", "--frames", "3", "--lm", f"{lm}/ckpt.pt", "--clip",
             f"{clip}/ckpt.pt", "--steps", "1", "--no-eval", "--frame-embed", "--out", embedded])
    assert r.returncode == 0, r.stderr
    layers = load_checkpoint(f"{embedded}/ckpt.pt", "cpu")[0].temporal.layers
    assert all(layer.frame_embed.shape == (3, 32) for layer in layers)  # zero yet: the gates start at 0
    assert all(layer.frame_embed is None for layer in load_checkpoint(f"{cap}/ckpt.pt", "cpu")[0].temporal.layers)
    r = run([*small, "--method", "evlgen", "--video", "--frames", "4", "--lm", f"{lm}/ckpt.pt", "--clip",
             f"{clip}/ckpt.pt", "--steps", "2", "--no-eval", "--frame-embed", "--out", embedded, "--resume"])
    assert r.returncode != 0 and "was trained with --frames 3, this run has 4" in r.stderr
    # an image LM cannot caption videos: its words lack the motions
    image_lm = str(tmp_path / "image_lm")
    assert run([*small, "--method", "lm", "--no-eval", "--out", image_lm]).returncode == 0
    r = run([*small, "--method", "evlgen", "--video", "--lm", f"{image_lm}/ckpt.pt", "--out", str(tmp_path / "y")])
    assert r.returncode != 0 and "trained on image captions" in r.stderr and "--method lm --video" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_video_flags_and_clips_stop_with_one_sentence(tmp_path):
    r = run(["--video", "--out", str(tmp_path / "a")])
    assert r.returncode != 0 and "--video is for the captioner" in r.stderr and "Traceback" not in r.stderr
    r = run(["--method", "lm", "--frames", "8", "--out", str(tmp_path / "b")])
    assert r.returncode != 0 and "apply with --video only" in r.stderr
    r = run(["--method", "lm", "--frame-embed", "--out", str(tmp_path / "b")])
    assert r.returncode != 0 and "--frame-embed and --temporal-lr-scale apply with --video only" in r.stderr
    write_clip(tmp_path / "clips" / "short", [(16, 16)] * 2)
    (tmp_path / "caps.json").write_text(json.dumps([dict(image="short", caption="a red square moves up")]))
    r = run(["--method", "lm", "--video", "--data", str(tmp_path / "caps.json"), "--image-root", str(tmp_path / "clips"),
             "--no-eval", "--out", str(tmp_path / "c")])
    assert r.returncode != 0 and "short" in r.stderr and "fewer than the 4" in r.stderr and "Traceback" not in r.stderr


def test_the_contextualizer_has_its_own_learning_rate_scale():
    import train
    model = tiny_video_captioner(temporal=True, frame_embed=True)
    groups = train.param_groups(model, 0.1, temporal_lr_scale=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(n for n, p in model.named_parameters() if p.requires_grad)  # each once
    for g in groups:
        assert all(names[id(p)].startswith("temporal.") == (g["lr_scale"] == 10.0) for p in g["params"])
    assert {n for g in groups if g["weight_decay"] == 0 for n in map(lambda p: names[id(p)], g["params"])} >= {
        "temporal.layers.0.alpha", "temporal.layers.0.frame_embed"}


def test_the_set_reader_ignores_where_tokens_are_and_the_layout_reader_does_not():
    from experiments import video
    torch.manual_seed(0)
    x, order = torch.randn(3, 10, 16), torch.randperm(10)
    for name, sees_order in (("set", False), ("layout", True), ("attention", True)):
        reader = video.READERS[name](16, 10, 4).eval()
        same = torch.allclose(reader(x), reader(x[:, order]), atol=1e-6)
        assert same != sees_order, name


def test_the_direction_probe_keeps_the_vit_frozen_and_trains_the_contextualizer():
    from experiments import video
    from model import CLIP
    from prepare import model_config
    from train import TrainConfig
    torch.manual_seed(0)
    cfg = TrainConfig(model_kwargs="width=32,heads=2,depth=2,text_width=32,text_depth=1,embed_dim=16")
    model = CLIP(model_config(cfg, vocab_size=20))
    before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    cases = [("frames", "layout"), ("average", "set"), ("contextualizer", "attention")]
    rows = video.direction_probe(model, 0, steps=2, batch_size=4, n_train=40, n_test=20, cases=cases)
    assert [(r["tokens"], r["reader"]) for r in rows] == cases
    assert all(torch.equal(v, before[k]) for k, v in model.visual.state_dict().items())
    assert all(p.requires_grad for p in model.visual.parameters())  # given back as it came
    assert rows[0]["gates"] is None and all(a != 0.0 for a in rows[2]["gates"])  # the gates left 0
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["majority"] >= 0.25 for r in rows)
    assert "| frame averaging (frozen ViT) | set |" in video.direction_markdown(rows)


def test_the_direction_probe_reads_through_a_captioners_contextualizer_without_changing_it():
    from experiments import video
    model = tiny_video_captioner(temporal=True)
    with torch.no_grad():
        for layer in model.temporal.layers:
            layer.alpha.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = video.direction_probe(model, 0, steps=2, batch_size=4, n_train=40, n_test=20, frames=3,
                                 cases=[("captioner", "layout")])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert rows[0]["gates"] == [0.5, 0.5]
