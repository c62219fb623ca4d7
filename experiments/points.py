"""
Accuracy against cost: the points behind the trade-off figures (ToMe's sweep off the shelf, the
trained methods), the fused-token probe, and Patch Ranking's table with its pooling over CLIPs.
Studies of ours: not on the reading path. Command line: `python -m experiments`.
"""
import json
import statistics

import torch

import data
import relevance
import train
from checkpoint import load_checkpoint, trained_on
from bench import TokenCounter, forward_flops, timed, vit_forward_flops
from data import DataError
from start import SEARCH


def cost_points(specs: list, batch_size: int = 64, repeats: int = 5, n_test: int = 1000, device="cpu",
                zeroshot: bool = False, against=None) -> list:
    """Accuracy-cost points, the input of `viz.py --tradeoff`. specs: (method, name, checkpoint
    paths, make) with make(model, cfg) -> the reducer to evaluate with (None: all tokens), or
    (reducer, a scorer's own forward FLOPs[, False: not timed — an oracle]). Per point: the mean R@1 (both
    directions, shapes test gallery; zero-shot top-1 too if asked) averaged over the checkpoints
    (seeds) with their spread, the image tower's measured images/s (median over the checkpoints)
    and its forward GFLOPs. Every point is timed in this one call, so the throughputs compare.
    `against` (a spec's index): every point also gets its gallery loss and its paired differences
    from that spec's point (`paired_differences`)."""
    import eval as evaluation
    points, per_image = [], []
    for method, name, paths, make in specs:
        runs, speeds, images_of_runs = [], [], []
        for path in paths:
            model, tokenizer, ckpt = load_checkpoint(path, device)
            cfg, v = train.TrainConfig.from_checkpoint(ckpt), model.cfg.vision
            made = make(model, cfg)
            reducer, extra, timeable = (made + (True,))[:3] if isinstance(made, tuple) else (made, 0.0, True)
            gallery, zeroshot_set = evaluation.eval_sets(v.image_size, v.patch_size, trained_on(ckpt)["scene_seed"], n_test)
            model.eval()
            features = evaluation.gallery_features(model, tokenizer, gallery, device, n_test, reducer)  # encoded once: an oracle searches per image
            m = evaluation.retrieval_metrics(*features)
            if zeroshot:
                m.update(evaluation.zeroshot(model, tokenizer, zeroshot_set, device, reducer))
            m["accuracy"] = 0.5 * (m["image_to_text_R@1"] + m["text_to_image_R@1"])
            runs.append({k: 100 * val for k, val in m.items()})
            with torch.no_grad():
                images_of_runs.append(evaluation.per_image_retrieval(*features, model.scale()))
            images = torch.randn(batch_size, 3, v.image_size, v.image_size, device=device)
            with torch.inference_mode():
                speeds.append(batch_size / timed(lambda: model.visual(images, reducer), repeats) if timeable
                              else float("nan"))
        point = dict(method=method, name=name, seeds=len(paths), img_s=statistics.median(speeds),
                     gflops=vit_gflops(model, reducer) + extra / 1e9)
        for k in runs[0]:
            point[k] = statistics.mean(r[k] for r in runs)
            point[k + "_std"] = statistics.pstdev(r[k] for r in runs)
        points.append(point)
        per_image.append({k: torch.stack([r[k] for r in images_of_runs]).mean(0) for k in images_of_runs[0]})
    if against is not None:
        for point, mine in zip(points, per_image):
            point.update(paired_differences(mine, per_image[against]))
    return points


def paired_differences(mine: dict, reference: dict) -> dict:
    """A point's gallery loss, and its mean R@1 (points) and gallery loss minus the reference's,
    image by image on the same gallery, each with its 95% bootstrap interval (eval.paired_interval).
    A point of several seeds enters with each image's mean over the seeds."""
    import eval as evaluation
    out = dict(gallery_loss=mine["loss"].mean().item())
    for key, unit in (("r1", 100.0), ("loss", 1.0)):
        diff = unit * (mine[key] - reference[key]).double()
        out[f"paired_{key}"] = diff.mean().item()
        out[f"paired_{key}_low"], out[f"paired_{key}_high"] = evaluation.paired_interval(diff)
    return out


def tome_reducer(r: int):
    """make(model, cfg) for ToMe off the shelf with a constant r (0: none)."""
    from merge import ToMe, merge_schedule
    return lambda model, cfg: ToMe(merge_schedule(r, model.cfg.vision.depth, 1 + model.cfg.vision.num_patches)[0]) if r else None


def token_counts(model, reducer) -> TokenCounter:
    """The per-block token counts of the image tower under `reducer`, from one blank image."""
    counter = TokenCounter(reducer)
    v = model.cfg.vision
    with torch.no_grad():
        model.visual.forward_tokens(torch.zeros(1, 3, v.image_size, v.image_size), counter)
    return counter


def trained_reducer(model, cfg):
    """The reducer a checkpoint trained with, at inference (no text: ELIP scores without it),
    with ELIP's look-ahead FLOPs: they are real compute the token counts do not show."""
    reducer = train.reducer_fn(cfg, model.cfg.vision, cfg.steps, training=False)(None)
    if cfg.method != "elip" or not cfg.lookahead:
        return reducer
    return reducer, forward_flops(model, cfg, token_counts(model, reducer), 0, 1)["lookahead"]


def tome_sweep(ckpt_path: str, rs=(0, 2, 4, 6, 8, 10), **kw) -> list:
    """ToMe off the shelf on one CLIP checkpoint, for each constant r."""
    return cost_points([("ToMe" if r else "none", f"ToMe r={r}" if r else "none", [ckpt_path], tome_reducer(r))
                        for r in rs], **kw)


def method_points(root: str, seeds=(0, 1, 2), **kw) -> list:
    """Every reducer of the ITC+ITM+MLM runs of --all on one plot: `none` with all tokens, ELIP and
    EViT with the pruning they trained with, ToMe off the shelf on the `none` checkpoints."""
    ckpts = lambda m: [f"{root}/{m}_{s}/ckpt.pt" for s in seeds]
    specs = [("none", "none", ckpts("none"), tome_reducer(0)),
             ("ELIP", "ELIP (pruned)", ckpts("elip"), trained_reducer),
             ("EViT", "EViT (pruned)", ckpts("evit"), trained_reducer)]
    specs += [("ToMe", f"ToMe r={r}", ckpts("none"), tome_reducer(r)) for r in (2, 4, 6, 8)]
    return cost_points(specs, **kw)


@torch.no_grad()
def fused_attention_probe(ckpt_path: str, n_test: int = 1000, device="cpu", batch_size=250) -> list:
    """Retrieval R@1 of one CLIP checkpoint pruned at inference at ELIP's schedule (scaled to its
    depth), for four ways of choosing the kept tokens (ELIP's look-ahead without text, EViT's
    previous-block [CLS] attention, random, and the ground-truth object patches) with the fused
    token attending as in the papers (one token) or with proportional attention (log size)."""
    import eval as evaluation
    import shapes
    from elip import ELIP, RandomPrune, scaled_schedule
    model, tokenizer, ckpt = load_checkpoint(ckpt_path, device)
    v = model.cfg.vision
    dataset = shapes.ShapesDataset("test", n_test, v.image_size, v.patch_size, trained_on(ckpt)["scene_seed"])
    images, captions, owner = data.load_gallery(dataset, n_test)
    masks = torch.stack([dataset[i]["patch_mask"] for i in range(len(images))])
    texts = evaluation.encode_texts(model, tokenizer, captions, device)
    S, P = scaled_schedule(v.depth), v.num_patches
    scorers = {"ELIP look-ahead (no text)": lambda prop, m, g: ELIP(S, P, None, prop_attn=prop),
               "EViT's [CLS] attention (previous block)": lambda prop, m, g: ELIP(S, P, None, lookahead=False, prop_attn=prop),
               "random": lambda prop, m, g: RandomPrune(S, P, g, prop_attn=prop),
               "the object patches (ground truth)": lambda prop, m, g: relevance.ObjectPrune(S, P, m, prop, g)}

    def recall(make=None) -> dict:
        g, feats = torch.Generator().manual_seed(0), []
        for s in range(0, len(images), batch_size):
            reducer = make(masks[s:s + batch_size].to(device), g) if make else None
            x = model.visual.forward_tokens(images[s:s + batch_size].to(device), reducer, track_source=True).x[:, 0]
            feats.append(torch.nn.functional.normalize(model.visual_proj(x), dim=-1))
        return evaluation.retrieval_metrics(torch.cat(feats), texts, owner.to(device))

    full = recall()
    rows = [dict(scoring="none (all tokens)", fused="—", **full)]
    for name, make in scorers.items():
        for prop in (False, True):
            rows.append(dict(scoring=name, fused="proportional (ours)" if prop else "one token (papers)",
                             **recall(lambda m, g: make(prop, m, g))))
    return rows


def probe_markdown(rows: list) -> str:
    lines = ["| kept tokens chosen by | fused token attends as | image→text R@1 | text→image R@1 |", "|---|---|---|---|"]
    lines += [f"| {r['scoring']} | {r['fused']} | {100 * r['image_to_text_R@1']:.1f} | {100 * r['text_to_image_R@1']:.1f} |"
              for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Patch Ranking: every way of pruning the same share at the same layer of one frozen CLIP

def vit_gflops(model, reducer) -> float:
    return vit_forward_flops(model.visual, token_counts(model, reducer)) / 1e9


def predictor_flops(predictor) -> float:
    """Forward FLOPs of the predictor per image (2 per multiply-add of its Linears)."""
    mixer = predictor.mixer
    P, d = mixer.token_mlp.fc1.in_features, predictor.dim
    token = sum(l.weight.numel() for l in (mixer.token_mlp.fc1, mixer.token_mlp.fc2)) * d
    channel = sum(l.weight.numel() for l in (mixer.channel_mlp.fc1, mixer.channel_mlp.fc2, predictor.head)) * P
    return 2 * (token + channel)


def tome_equal_flops(model, target_gflops: float) -> int:
    """The constant ToMe r whose forward GFLOPs come closest to target_gflops."""
    gap = lambda r: abs(vit_gflops(model, tome_reducer(r)(model, None)) - target_gflops)
    return min(range(model.cfg.vision.num_patches // 2 + 1), key=gap)


def ranking_points(paths: list, n_test: int = 1000, device="cpu", repeats: int = 5, batch_size: int = 64,
                   oracle: bool = True) -> list:
    """The Patch Ranking table: one frozen CLIP (inside `paths`, Patch Ranking checkpoints of
    several seeds) pruned at the same layer to the same count by every criterion. Rows without
    training are measured on the first checkpoint; the predictor rows on all (their seeds)."""
    import ranking
    model, tokenizer, ckpt = load_checkpoint(paths[0], device)
    layer, keep = model.rcfg.layer, ranking.keep_count(model.rcfg.keep, model.cfg.vision.num_patches)
    fuse = model.rcfg.fuse  # every row prunes the way the checkpoints did: dropping, or fusing the rest
    prune = lambda scorer: lambda m, cfg: ranking.RankPrune(layer, keep, scorer, fuse=fuse)
    r = tome_equal_flops(model, vit_gflops(model, ranking.RankPrune(layer, keep, ranking.random_scorer(), fuse=fuse)))
    specs = [("none", "unpruned", paths[:1], lambda m, cfg: None),
             ("random", "random", paths[:1], prune(ranking.random_scorer(torch.Generator().manual_seed(0)))),
             ("EViT", "EViT-style [CLS] attention", paths[:1], prune(ranking.cls_attention_scorer(layer))),
             ("ToMe", f"ToMe r={r} (equal FLOPs)", paths[:1], lambda m, cfg: tome_reducer(r)(m, cfg))]
    if oracle:
        specs.append(("golden", "golden ranking (oracle)", paths[:1],  # its search is neither counted nor timed
                      lambda m, cfg: (ranking.RankPrune(layer, keep, ranking.golden_scorer(
                          m, layer, fuse=fuse, **SEARCH), fuse=fuse), 0.0, False)))
    specs += [("predictor", "predictor", paths,
               lambda m, cfg: (m.reducer(tokens=False), predictor_flops(m.predictor))),
              ("predictor", f"predictor + {model.rcfg.num_tokens} learnable tokens", paths,
               lambda m, cfg: (m.reducer(), predictor_flops(m.predictor)))]
    points = cost_points(specs, batch_size, repeats, n_test, device, zeroshot=True,
                         against=[spec[0] for spec in specs].index("ToMe"))
    scene_seed = trained_on(ckpt)["scene_seed"]
    return [dict(p, scene_seed=scene_seed, n_test=n_test) for p in points]  # which test images (--pool-ranking reads the seed)


def signed_interval(d: float, low: float, high: float, f: str) -> str:
    """A difference and its interval as one table cell: +0.56 [+0.13, +0.99]."""
    return f"{d:+{f}} [{low:+{f}}, {high:+{f}}]"


def paired_of(p: dict, k: str) -> tuple:
    """A point's difference from the reference (paired_differences) and its interval."""
    return p[f"paired_{k}"], p[f"paired_{k}_low"], p[f"paired_{k}_high"]


def ranking_markdown(points: list) -> str:
    base = points[0]
    cell = lambda p, k: f"{p[k]:.1f}" + (f" ± {p[k + '_std']:.1f}" if p["seeds"] > 1 else "")
    paired = lambda p, k, f: "—" if p["method"] == "ToMe" else signed_interval(*paired_of(p, k), f)
    lines = ["| pruning at the layer | seeds | zero-shot top-1 | image→text R@1 | text→image R@1 | mean R@1 | "
             "mean R@1 − ToMe's [95%] | gallery loss | gallery loss − ToMe's [95%] | "
             "GFLOPs (image tower) | img/s | measured speed-up | FLOP-allowed speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['name']} | {p['seeds']} | {cell(p, 'zeroshot_top1')} | {cell(p, 'image_to_text_R@1')} | "
                     f"{cell(p, 'text_to_image_R@1')} | {cell(p, 'accuracy')} | {paired(p, 'r1', '.2f')} | "
                     f"{p['gallery_loss']:.4f} | {paired(p, 'loss', '.4f')} | {p['gflops']:.3f} | "
                     + (f"{p['img_s']:.0f} | {p['img_s'] / base['img_s']:.2f}x" if p["img_s"] == p["img_s"] else "— | —")
                     + f" | {base['gflops'] / p['gflops']:.2f}x |")
    return "\n".join(lines)


Z95 = 1.959964  # the normal quantile of a two-sided 95% interval


def pooled_difference(estimates: list) -> tuple:
    """Fixed-effect (inverse-variance) pooling of independent differences, each (estimate, low,
    high) with a 95% interval: its standard error read off the interval as if it were normal.
    Returns the pooled estimate and its 95% interval."""
    weights = []
    for d, low, high in estimates:
        se = (high - low) / (2 * Z95)
        if not se > 0:
            raise DataError(f"a difference of {d:+.4f} has an empty interval [{low}, {high}]: nothing to weigh it by")
        weights.append(1 / se ** 2)
    mean = sum(w * d for w, (d, _, _) in zip(weights, estimates)) / sum(weights)
    half = Z95 / sum(weights) ** 0.5
    return mean, mean - half, mean + half


def read_ranking_points(path: str) -> list:
    """The points `python -m experiments --ranking` wrote (its --points), checked to carry the paired differences."""
    try:
        with open(path) as f:
            points = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"--pool-ranking: cannot read {path} as JSON ({e})")
    if not (isinstance(points, list) and points and all(isinstance(p, dict) and "paired_r1_high" in p for p in points)):
        raise DataError(f"--pool-ranking: {path} is not the --points file of a `python -m experiments --ranking` run")
    return points


def pool_ranking(paths: list) -> str:
    """The differences from ToMe of each row of several Patch Ranking tables, one per CLIP (each on
    its own test images, so independent), side by side and pooled (pooled_difference)."""
    if len(paths) < 2:
        raise DataError(f"--pool-ranking takes the --points files of two or more CLIPs, got {len(paths)}")
    tables = [read_ranking_points(path) for path in paths]
    seeds = [t[0].get("scene_seed") for t in tables]  # absent in files written before it was recorded
    if None not in seeds and len(set(seeds)) < len(seeds):
        raise DataError(f"--pool-ranking: {' '.join(paths)} share test images (scene seeds {seeds}): "
                        "pooling needs independent galleries, one per CLIP of a different --seed")
    names = [p["name"] for p in tables[0] if p["method"] != "ToMe"
             and all(p["name"] in {q["name"] for q in t} for t in tables[1:])]
    lines = ["| pruning at the layer | " + " | ".join(f"CLIP {i + 1}: mean R@1 − ToMe's [95%]" for i in range(len(paths)))
             + " | pooled mean R@1 − ToMe's [95%] | pooled gallery loss − ToMe's [95%] |",
             "|---|" + "---|" * (len(paths) + 2)]
    for name in names:
        rows = [next(p for p in t if p["name"] == name) for t in tables]
        diffs = {k: [paired_of(p, k) for p in rows] for k in ("r1", "loss")}
        try:
            pooled = {k: pooled_difference(d) for k, d in diffs.items()}
        except DataError as e:
            raise DataError(f"--pool-ranking, row {name!r}: {e}")
        lines.append(f"| {name} | " + " | ".join(signed_interval(*d, ".2f") for d in diffs["r1"])
                     + f" | {signed_interval(*pooled['r1'], '.2f')} | {signed_interval(*pooled['loss'], '.4f')} |")
    return "\n".join(lines)
