"""
Pictures: which patches a method kept, fused or merged, drawn over the image; training curves; the
accuracy-cost plot.

Read first: `draw_tokens` (from the seam's source tracking: a patch its token holds alone is
drawn as it is; for a pruning method (ELIP, EViT, Patch Ranking) every other patch is dimmed, the
ones its fused token holds as the ones dropped, as EViT's figures grey out pruned patches; for a
merging method (ToMe) a patch whose token holds several is filled with that token's mean colour
and outlined), then `mask_grid` (stages side by side, the true object outlines on top, the guiding
caption wrapped under each row).

    python viz.py --ckpt out/ckpt.pt [--method elip] [--n 8] --out masks.png
    python viz.py --curves a/log.jsonl b/log.jsonl --metric loss --out curves.png
    python viz.py --tradeoff points.json --out tradeoff.png

No method is re-implemented here: the reducer comes from checkpoint.py's dispatch and the stages from
eval.py's `StageRecorder`.
"""
import argparse
import json
import os
import sys
import warnings

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

GREY_WEIGHT = 0.35  # a dropped patch keeps this much of its luminance, over a light grey
OUTLINE = np.array([1.0, 1.0, 1.0])  # group borders


def patch_owner(size: np.ndarray, source: np.ndarray) -> np.ndarray:
    """(P,) for each patch: the token holding it, or -1 if none does. size (N,), source (N, 1+P)."""
    src = source[:, 1:] > 0
    return np.where(src.any(0), src.argmax(0), -1)


def draw_tokens(image: np.ndarray, size: np.ndarray, source: np.ndarray, patch: int,
                merged: bool = True) -> np.ndarray:
    """image (S, S, 3) in [0, 1] -> the same image as the token sequence sees it (module docstring);
    `merged`: ToMe's style for tokens that hold several patches, else they are dimmed (pruning)."""
    S = image.shape[0]
    g = S // patch
    owner = patch_owner(size, source)
    cells = image.reshape(g, patch, g, patch, 3).transpose(0, 2, 1, 3, 4).copy()  # (g, g, p, p, 3)
    flat = cells.reshape(g * g, patch, patch, 3)
    out = flat.copy()
    grouped = np.zeros(g * g, dtype=bool)
    for t in np.unique(owner[owner >= 0]):
        members = owner == t
        if members.sum() > 1:
            out[members] = flat[members].reshape(-1, 3).mean(0)
            grouped |= members
    gone = owner == -1
    if not merged:  # a fused token's patches are as good as pruned: dimmed, not outlined
        gone, grouped = gone | grouped, np.zeros_like(grouped)
    luminance = flat[gone].mean(-1, keepdims=True)
    out[gone] = 0.6 + GREY_WEIGHT * (luminance - 0.6)
    out = out.reshape(g, g, patch, patch, 3)
    for r in range(g):  # outline the sides of grouped patches that face another token
        for c in range(g):
            k = r * g + c
            if not grouped[k]:
                continue
            if r == 0 or owner[k - g] != owner[k]:
                out[r, c, 0, :] = OUTLINE
            if r == g - 1 or owner[k + g] != owner[k]:
                out[r, c, -1, :] = OUTLINE
            if c == 0 or owner[k - 1] != owner[k]:
                out[r, c, :, 0] = OUTLINE
            if c == g - 1 or owner[k + 1] != owner[k]:
                out[r, c, :, -1] = OUTLINE
    return out.transpose(0, 2, 1, 3, 4).reshape(S, S, 3)


@torch.no_grad()
def reduction_stages(model, tokenizer, images, captions, make_reducer) -> list:
    """[(size (B, N), source (B, N, 1+P)) after each stage that changed the token count]."""
    from relevance import StageRecorder
    ids = tokenizer(captions)
    recorder = StageRecorder(make_reducer(model.text_guidance(model.text(ids))))
    model.visual.forward_tokens(images, recorder, track_source=True)
    return [(s.numpy(), src.numpy()) for s, src in recorder.stages]


def mask_grid(images, captions, scenes, stages, patch, title, note="", merged=True):
    """A figure: a row per image (the image, then each stage), object outlines on every panel, the
    caption wrapped under its row."""
    import textwrap
    from data import denormalize
    from shapes import object_pixels
    n, cols = len(images), 1 + len(stages)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.85 * n + 0.8), squeeze=False,
                             gridspec_kw=dict(hspace=0.28, wspace=0.04))
    for b in range(n):
        img = denormalize(images[b]).permute(1, 2, 0).numpy()
        panels = [img] + [draw_tokens(img, s[b], src[b], patch, merged) for s, src in stages]
        outlines = object_pixels(scenes[b], img.shape[0]) if scenes is not None else []
        for c, (ax, panel) in enumerate(zip(axes[b], panels)):
            ax.imshow(panel, interpolation="nearest")
            for m in outlines:
                ax.contour(m.astype(float), levels=[0.5], colors="black", linewidths=0.8)
            ax.set_xticks([]), ax.set_yticks([])
            if b == 0:
                ax.set_title("image" if c == 0 else f"stage {c}: {int((stages[c - 1][0][b] > 0).sum())} tokens",
                             fontsize=8)
        axes[b][0].text(0, -0.03, textwrap.fill(captions[b], 24 * cols), transform=axes[b][0].transAxes,
                        va="top", ha="left", fontsize=6.5)
    head = 0.62 + (0.18 if note else 0.0)  # inches above the first row: the title, then the column titles
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=9, y=1 - 0.06 / fig.get_figheight(), va="top")
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - head / fig.get_figheight(), bottom=0.03)
    return fig


def draw_masks(ckpt_path: str, method: str = "", n: int = 8, out: str = "masks.png") -> str:
    """The kept / merged patches of a CLIP checkpoint's reducer on the first n shapes test images,
    guided by each image's first caption (ELIP) — through checkpoint.py's dispatch (a Patch Ranking
    checkpoint: its predictor)."""
    import shapes
    from checkpoint import load_checkpoint, make_reducer, reducer_config, trained_on
    model, tokenizer, ckpt = load_checkpoint(ckpt_path)
    kind = ckpt.get("kind", "clip")
    if kind not in ("clip", "ranking"):
        raise ValueError(f"{ckpt_path} holds a {kind}: masks are drawn for CLIP checkpoints")
    cfg = reducer_config(ckpt, method=method or ckpt["config"]["method"])
    v = model.cfg.vision
    dataset = shapes.ShapesDataset("test", n, v.image_size, v.patch_size, trained_on(ckpt)["scene_seed"])
    items = [dataset[i] for i in range(n)]
    images = torch.stack([it["image"] for it in items])
    captions = [it["captions"][0] for it in items]
    make = make_reducer(cfg, v)  # as trained, past any warm-up; None for a method that reduces nothing
    if kind == "ranking" and not method:  # Patch Ranking: its predictor's choice (the learned tokens hold no patch)
        make = lambda text: model.reducer()
    note = ""
    if make is None:
        stages = []
        note = f"--method {cfg.method} does not reduce tokens: nothing to draw but the images"
        print(f"note: {note}", file=sys.stderr)
    else:
        stages = reduction_stages(model, tokenizer, images, captions, make)
    fig = mask_grid(images, captions, [it["attributes"] for it in items], stages, v.patch_size,
                    f"{cfg.method} on {os.path.basename(os.path.dirname(os.path.abspath(ckpt_path)))}", note,
                    merged=cfg.method == "tome")
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def read_log(path: str) -> list:
    """The JSON lines of a train.py log, or [] with a warning naming the file if it is empty or
    cannot be read; a partial last line (a run killed mid-write) is skipped with a warning."""
    try:
        with open(path) as f:
            lines = [line for line in f if line.strip()]
    except OSError as e:
        warnings.warn(f"skipping log {path}: {e}")
        return []
    rows = []
    for k, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"skipping line {k} of log {path}: not complete JSON")
    if not rows:
        warnings.warn(f"skipping log {path}: it is empty")
    return rows


def plot_curves(paths: list, metric: str = "loss", x: str = "step", out: str = "curves.png") -> str:
    """One line per run: `metric` (a logged loss, or an --eval-every curve metric such as cider_d)
    against the step or the training time."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for path in paths:
        rows = read_log(path)
        points = [(r[x], r[metric] if metric in r else r.get("curve", {}).get(metric)) for r in rows if x in r]
        points = [(a, b) for a, b in points if b is not None]
        if not points:
            if rows:
                warnings.warn(f"skipping log {path}: no {metric!r} against {x!r} in it")
            continue
        ax.plot(*zip(*points), label=os.path.basename(os.path.dirname(os.path.abspath(path))) or path)
        drawn += 1
    ax.set_xlabel("training seconds" if x == "time" else x)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no readable logs", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def pareto_front(points: list, x: str, y: str) -> list:
    """The points no other point beats on both x and y (higher is better on both), by x."""
    front = [p for p in points if not any(q[x] >= p[x] and q[y] >= p[y] and (q[x] > p[x] or q[y] > p[y])
                                          for q in points)]
    return sorted(front, key=lambda p: p[x])


def plot_tradeoff(points: list, out: str = "tradeoff.png", accuracy: str = "accuracy") -> str:
    """Accuracy against measured throughput and against FLOPs (less is better, so GFLOPs are
    negated for the front), one marker per setting, one colour per method, the Pareto front drawn."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    methods = list(dict.fromkeys(p.get("method", p["name"]) for p in points))
    colour = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, key, label in ((axes[0], "img_s", "measured images/s"), (axes[1], "neg_gflops", "GFLOPs per image")):
        pts = [dict(p, neg_gflops=-p["gflops"]) for p in points]
        for m in methods:
            mine = [p for p in pts if p.get("method", p["name"]) == m]
            ax.scatter([abs(p[key]) for p in mine], [p[accuracy] for p in mine], s=25, color=colour[m], label=m)
        for p in pts:
            ax.annotate(p["name"], (abs(p[key]), p[accuracy]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front(pts, key, accuracy)
        ax.plot([abs(p[key]) for p in front], [p[accuracy] for p in front], "k--", lw=1, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel(accuracy)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw kept / merged patches, training curves, or the accuracy-cost plot.")
    p.add_argument("--ckpt", help="a CLIP checkpoint: draw its reducer's stages over test images")
    p.add_argument("--method", default="", help="the reducer to draw (elip, evit, tome); default: the checkpoint's")
    p.add_argument("--n", type=int, default=8, help="images")
    p.add_argument("--curves", nargs="+", metavar="LOG", help="train.py log.jsonl files: one curve each")
    p.add_argument("--metric", default="loss", help="with --curves: a logged value, or cider_d")
    p.add_argument("--x", default="step", choices=("step", "time"), help="with --curves: the x axis")
    p.add_argument("--tradeoff", metavar="JSON", help="a list of {name, accuracy, img_s, gflops}")
    p.add_argument("--out", default="", help="the PNG to write")
    args = p.parse_args(argv)
    try:
        if args.ckpt:
            print(draw_masks(args.ckpt, args.method, args.n, args.out or "masks.png"))
        elif args.curves:
            print(plot_curves(args.curves, args.metric, args.x, args.out or "curves.png"))
        elif args.tradeoff:
            with open(args.tradeoff) as f:
                print(plot_tradeoff(json.load(f), args.out or "tradeoff.png"))
        else:
            p.error("give --ckpt, --curves or --tradeoff")
    except (ValueError, OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
