"""
The video studies: where the direction of motion goes (a probe with three readers) and the video
captioners' tables. Studies of ours: not on the reading path. Command line: `python -m experiments`.
"""
import statistics
import time
from contextlib import nullcontext

import torch

import captioning
import eval as evaluation
import train
from captioning import cider_d_scores, motion_hits, one_mover_direction
from checkpoint import load_checkpoint, trained_on
from data import DataError
from experiments.points import signed_interval
PROBE_STEPS = 600  # the direction probe's, per reader (32 clips a step)


# ----------------------------------------------------------------------------------------------
# Video: where the direction of motion goes. A probe, not a captioner: a small reader is trained
# to name the direction of the one moving object of a clip from the ViT's output tokens, with a
# cross-entropy on the direction itself (the strongest signal there is). Three readers differ in
# what they can see: LayoutReader where each token sits (its input is the tokens in their grid
# order, flattened), SetReader only what the tokens hold (per-token logits pooled: any order of
# the tokens gives the same answer), AttentionReader what a bridge sees (transformer blocks over
# the tokens with learned positions, read at the first token).

class LayoutReader(torch.nn.Module):
    def __init__(self, width: int, slots: int, classes: int, hidden: int = 256):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, 8), torch.nn.Flatten(1),
                                       torch.nn.Linear(slots * 8, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, classes))

    def forward(self, x):  # (B, L, D) -> (B, classes)
        return self.net(x)


class SetReader(torch.nn.Module):
    def __init__(self, width: int, slots: int, classes: int, hidden: int = 256):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x).logsumexp(1)  # (B, L, classes) -> (B, classes): a soft "any token says so"


class AttentionReader(torch.nn.Module):
    def __init__(self, width: int, slots: int, classes: int, depth: int = 2, heads: int = 4):
        super().__init__()
        from vit import Block
        self.pos_embed = torch.nn.Parameter(0.02 * torch.randn(1, slots, width))
        self.blocks = torch.nn.Sequential(*(Block(width, heads) for _ in range(depth)))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(x + self.pos_embed))[:, 0])


READERS = {"layout": LayoutReader, "set": SetReader, "attention": AttentionReader}
# (tokens the reader gets, reader): the frames themselves, frame averaging, the contextualizer + averaging
PROBE_CASES = [("frames", "layout"), ("frames", "attention"), ("average", "layout"),
               ("contextualizer", "layout"), ("contextualizer", "set"), ("contextualizer", "attention")]
PROBE_TOKENS = {"frames": "the T frames' tokens, not averaged (frozen ViT)", "average": "frame averaging (frozen ViT)",
                "contextualizer": "the temporal contextualizer (trained with the reader), then averaging",
                "captioner": "a video captioner's contextualizer (frozen, as the LM's loss trained it), then averaging"}


def one_mover_clips(split: str, n: int, vcfg, seed: int, frames: int):
    """The clips among the first n of a split with exactly one moving object: (clips (M, T, 3, S, S),
    direction index (M,)), the directions in shapes.DIRECTIONS order without "still"."""
    import shapes
    directions = [d for d in shapes.DIRECTIONS if d != "still"]
    dataset = shapes.ShapesVideoDataset(split, n, vcfg.image_size, vcfg.patch_size, seed, frames)
    clips, labels = [], []
    for i in range(len(dataset)):
        moving = [o["motion"] for o in dataset.scene(i)[0] if o["motion"] != "still"]
        if len(moving) == 1:
            clips.append(dataset[i]["image"])
            labels.append(directions.index(moving[0]))
    return torch.stack(clips), torch.tensor(labels)


def direction_probe(model, scene_seed: int, steps: int = PROBE_STEPS, batch_size: int = 32, n_train: int = 4000,
                    n_test: int = 1000, frames: int = 4, seed: int = 0, device="cpu", cases=PROBE_CASES) -> list:
    """Test accuracy of naming the direction of a clip's one moving object, for each (tokens,
    reader) case, on the ViT of a CLIP or a video captioner (model) kept frozen; with a
    contextualizer, its gates. The case "captioner" reads through the captioner's own contextualizer."""
    from merge import TemporalContext
    vit, v = model.visual.eval(), model.cfg.vision
    frozen = [p.requires_grad for p in vit.parameters()]
    vit.requires_grad_(False)
    train_clips, train_labels = one_mover_clips("train", n_train, v, scene_seed, frames)
    test_clips, test_labels = one_mover_clips("test", n_test, v, scene_seed, frames)
    rows = []
    for tokens_from, reader_name in cases:
        torch.manual_seed(seed)
        trained = tokens_from == "contextualizer"
        temporal = (TemporalContext(v.depth, v.width, v.heads, frames).to(device) if trained
                    else model.temporal if tokens_from == "captioner" else None)
        slots = (1 + v.num_patches) * (frames if tokens_from == "frames" else 1)
        reader = READERS[reader_name](v.width, slots, 4).to(device)
        params = list(reader.parameters()) + (list(temporal.parameters()) if trained else [])
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

        def logits(clips):
            B = clips.shape[0]
            with nullcontext() if trained else torch.no_grad():
                x = vit.forward_tokens(clips.to(device).flatten(0, 1), temporal).x.unflatten(0, (B, frames))
            return reader(x.flatten(1, 2) if tokens_from == "frames" else x.mean(1))  # (B, T*N, D) or (B, N, D)

        t0, g = time.time(), torch.Generator().manual_seed(seed)
        for _ in range(steps):
            pick = torch.randint(len(train_clips), (batch_size,), generator=g)
            loss = torch.nn.functional.cross_entropy(logits(train_clips[pick]), train_labels[pick].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            guesses = torch.cat([logits(test_clips[i:i + 64]).argmax(-1).cpu() for i in range(0, len(test_clips), 64)])
        rows.append(dict(tokens=tokens_from, reader=reader_name, accuracy=(guesses == test_labels).float().mean().item(),
                         n_test=len(test_labels), majority=test_labels.bincount().max().item() / len(test_labels),
                         n_train=len(train_labels), steps=steps, minutes=(time.time() - t0) / 60,
                         gates=temporal.gates() if temporal else None))
        print(f"{tokens_from:>14} | {reader_name:>9} reader | direction accuracy {100 * rows[-1]['accuracy']:.1f}%", flush=True)
    for p, requires_grad in zip(vit.parameters(), frozen):
        p.requires_grad_(requires_grad)
    return rows


def direction_probe_checkpoints(paths: list, steps: int, n_test: int, device="cpu") -> list:
    """The probe's rows for each checkpoint: every case on a CLIP, the captioner's own
    contextualizer on a video captioner; training clips from the first 4 x n_test."""
    rows = []
    for path in paths:
        model, _, ckpt = load_checkpoint(path, device)
        captioner = getattr(model, "temporal", None) is not None
        if not captioner and ckpt.get("kind", "clip") != "clip":
            raise DataError(f"--direction-probe {path}: neither a CLIP nor a video captioner with the temporal "
                            f"contextualizer (a {ckpt['kind']} checkpoint)")
        rows += direction_probe(model, trained_on(ckpt)["scene_seed"], steps, n_train=4 * n_test, n_test=n_test,
                                frames=model.cfg.frames if captioner else 4, device=device,
                                cases=[("captioner", "layout")] if captioner else PROBE_CASES)
    return rows


def direction_markdown(rows: list) -> str:
    lines = ["| tokens the reader gets | reader | direction accuracy (4 choices) | mean abs(alpha) | min |",
             "|---|---|---|---|---|"]
    for r in rows:
        alpha = f"{statistics.mean(abs(a) for a in r['gates']):.3f}" if r["gates"] else "—"
        lines.append(f"| {PROBE_TOKENS[r['tokens']]} | {r['reader']} | {100 * r['accuracy']:.1f} | {alpha} | {r['minutes']:.1f} |")
    r = rows[0]
    return "\n".join(lines) + (f"\n\n{r['n_train']} training clips, {r['steps']} steps, {r['n_test']} test clips "
                               f"(always the most frequent direction: {100 * r['majority']:.1f}%)")


def caption_test_clips(path: str, n_test: int, device, flag: str) -> dict:
    """A video captioner checkpoint's greedy captions of its shapes test clips, with their
    references, scenes, the checkpoint's training config and its gates (empty: frame averaging)."""
    model, tokenizer, ckpt = load_checkpoint(path, device)
    cfg = train.TrainConfig.from_checkpoint(ckpt)
    if ckpt.get("kind") != "captioner" or not cfg.video or cfg.val_data:
        raise DataError(f"{flag}: {path} is not a video captioner of the shapes clips (--method evlgen --video)")
    v = model.cfg.vision
    clips = evaluation.eval_sets(v.image_size, v.patch_size, trained_on(ckpt)["scene_seed"], n_test, frames=cfg.frames)[0]
    images, refs = captioning.caption_gallery(clips, n_test)
    cands = captioning.caption_images(model, tokenizer, images, device)
    gates = model.temporal.gates() if model.temporal is not None else []
    return dict(cands=cands, refs=refs, scenes=[clips.scene(i)[0] for i in range(len(images))], cfg=cfg, gates=gates)


def video_paired(paths: list, n_test: int = 1000, device="cpu") -> str:
    """Markdown, a row per pair A B of video captioners of one seed (paths A1 B1 A2 B2 ...), both
    captioning the same test clips (greedy): A's and B's motion accuracy, direction on clips of
    one moving object and CIDEr-D, and A − B clip by clip with its 95% bootstrap interval over the
    clips (`paired_motion`). The interval holds the test clips' sampling noise only, not a
    seed's."""
    if not paths or len(paths) % 2:
        raise DataError(f"--video-paired takes checkpoints in pairs A B [A B ...], got {len(paths)}")
    rows = ["| A | B | seed | steps | test clips (of one moving object) | motion accuracy (5 choices): A, B, "
            "A − B [95%] | direction, clips of one moving object: A, B, A − B [95%] | CIDEr-D: A, B, A − B [95%] |",
            "|---|---|---|---|---|---|---|---|"]
    for pa, pb in zip(paths[::2], paths[1::2]):
        a, b = runs = [caption_test_clips(path, n_test, device, "--video-paired") for path in (pa, pb)]
        if a["scenes"] != b["scenes"]:
            raise DataError(f"--video-paired: {pa} and {pb} were trained on other shapes scenes (--seed / "
                            f"the CLIP of Patch Ranking), so their test clips differ: pair runs of one seed")
        paired = paired_motion(a["cands"], b["cands"], a["refs"], a["scenes"])
        own = [dict(captioning.motion_accuracy(r["cands"], r["scenes"]), cider_d=captioning.cider_d(r["cands"], r["refs"]))
               for r in runs]
        cells = []
        for key in ("motion_accuracy", "direction_accuracy_one_object", "cider_d"):
            d, (low, high) = paired[key]["diff"], paired[key]["interval"]
            cells.append(f"{100 * own[0][key]:.1f}, {100 * own[1][key]:.1f}, "
                         + signed_interval(100 * d, 100 * low, 100 * high, ".1f"))
        steps = [r["cfg"].steps for r in runs]
        steps = steps[0] if steps[0] == steps[1] else f"{steps[0]} / {steps[1]}"
        rows.append(f"| `{pa}` | `{pb}` | {a['cfg'].seed} | {steps} | {len(a['scenes'])} "
                    f"({paired['direction_accuracy_one_object']['clips']}) | {' | '.join(cells)} |")
    return "\n".join(rows)


AXIS = {"left": "horizontal", "right": "horizontal", "up": "vertical", "down": "vertical"}


def on_the_axis(direction_said: dict) -> tuple:
    """(clips whose first motion word lies on the true direction's axis, clips) from
    `captioning.motion_accuracy`'s direction_said. A captioner that knows the axis but not the sign has
    all of its clips on the axis and about half of them right."""
    said = [(true, word, n) for true, words in direction_said.items() for word, n in words.items()]
    return sum(n for true, word, n in said if AXIS.get(word) == AXIS[true]), sum(n for _, _, n in said)


def video_runs(paths: list, n_test: int = 1000, device="cpu") -> str:
    """Markdown: one row per video captioner checkpoint — its seed, steps, temporal model and bridge
    positions as trained, then CIDEr-D, BLEU-4 and the motion measures on its own test clips
    (greedy, as `eval.py` computes them), how often it puts a one-mover clip on the right axis, and
    its gates. The runs of a seed share their test clips; other seeds draw their own."""
    rows = ["| checkpoint | seed | steps | temporal model | bridge positions | CIDEr-D | BLEU-4 | motion accuracy "
            "(5 choices) | direction accuracy (moving objects, 4) | direction, clips of one moving object | "
            "one-mover clips on the right axis | gates (alpha, first block to last) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        r = caption_test_clips(path, n_test, device, "--video-runs")
        cfg, m = r["cfg"], captioning.motion_accuracy(r["cands"], r["scenes"])
        model = f"contextualizer, learning rate x{cfg.temporal_lr_scale:g}" if cfg.temporal else "frame averaging"
        right, ones = on_the_axis(m["direction_said"])
        gates = " ".join(f"{a:+.2f}" for a in r["gates"]) or "—"
        rows.append(f"| `{path}` | {cfg.seed} | {cfg.steps} | {model} | {'yes' if cfg.bridge_pos else 'no'} | "
                    f"{100 * captioning.cider_d(r['cands'], r['refs']):.1f} | {100 * captioning.bleu(r['cands'], r['refs']):.1f} | "
                    f"{100 * m['motion_accuracy']:.1f} | {100 * m['direction_accuracy']:.1f} | "
                    f"{100 * m['direction_accuracy_one_object']:.1f} | {right} of {ones} | {gates} |")
    return "\n".join(rows)


def paired_motion(cands_a: list, cands_b: list, refs: list, scenes: list) -> dict:
    """Two captioners on the same clips: A's motion accuracy, one-mover direction accuracy and
    CIDEr-D minus B's, each with its 95% bootstrap interval over the clips (`eval.paired_interval`; a
    clip's objects stay together). Motion accuracy counts objects, so each clip's difference in
    hits is scaled by clips / objects: their mean is the difference of the two accuracies."""
    scale = len(scenes) / sum(len(s) for s in scenes)
    ones = [i for i, s in enumerate(scenes) if one_mover_direction("", s)]

    def per_clip(cands):
        hits = torch.tensor([sum(h for h, _ in motion_hits(c, s)) for c, s in zip(cands, scenes)], dtype=torch.float64)
        said = [one_mover_direction(cands[i], scenes[i]) for i in ones]
        right = torch.tensor([float(true == word) for true, word in said], dtype=torch.float64)
        return scale * hits, right, torch.tensor(cider_d_scores(cands, refs), dtype=torch.float64)

    keys = ("motion_accuracy", "direction_accuracy_one_object", "cider_d")
    diffs = {k: a - b for k, a, b in zip(keys, per_clip(cands_a), per_clip(cands_b))}
    return {k: dict(diff=d.mean().item(), interval=evaluation.paired_interval(d), clips=len(d)) for k, d in diffs.items()}
