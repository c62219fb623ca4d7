"""
Benchmarks: the cost of every token-reduction method, side by side, measured on this machine.

Three tables: ToMe off the shelf (inference images/s of a ViT with and without merging); the
EVLGen captioner's training step per bridge (merged, unmerged, learned queries) and where its time
goes; the CLIP training step under each method (below).

Read first: `count_tokens` (how many tokens each block's attention and MLP see, measured through
the seam), then `forward_flops` (the analytic count), then `bench_model`.

For each method and model it reports, relative to `none` measured in the same run:
- the measured time of one training step (forward, backward, AdamW), median over repeats;
- the FLOPs of the step counted analytically: 3x the forward of everything that gets gradients
  (backward ~ 2x forward) plus 1x ELIP's look-ahead (forward only, under no_grad); the speed
  ratio the FLOP count allows is printed beside the measured one;
- the activation memory of the step: the bytes of all tensors autograd saves for backward
  (device-independent; on CUDA the allocator's peak is printed too);
- the largest batch whose activations, parameters, gradients and AdamW state fit `--mem-budget-gb`.

    python bench.py                 # all three tables (each one's time on 2 CPU cores: README)
    python bench.py --tome vit_s16 --no-captioner --models ''   # ToMe's row alone
    python bench.py --direction-probe out/clip/ckpt.pt out/video_ctx/ckpt.pt   # video: who can read the direction of motion
    python bench.py --ranking out/ranking_0/ckpt.pt out/ranking_1/ckpt.pt out/ranking_2/ckpt.pt   # Patch Ranking's table
    python bench.py --pool-ranking a_points.json b_points.json   # its differences from ToMe pooled over CLIPs
"""
import argparse
import dataclasses
import json
import statistics
import time
from contextlib import nullcontext

import torch

import train
from data import DataError
from model import CLIP
from train import TrainConfig
from vit import Observed

VARIANTS = {  # name -> TrainConfig overrides
    "none": dict(method="none"),
    "evit": dict(method="evit"),
    "elip": dict(method="elip"),
    "elip_no_lookahead": dict(method="elip", lookahead=False),
    "elip_no_rollout": dict(method="elip", rollout=False),  # the last block's [CLS] row, as published
    "elip_paper": dict(method="elip", fused_prop_attn=False, rollout=False),  # as published
    "tome": dict(method="tome"),
}


class TokenCounter(Observed):
    """Records, per block, the token count its attention and its MLP see under the wrapped reducer."""

    def __init__(self, inner=None):
        super().__init__(inner)
        self.attn, self.mlp = {}, {}

    def observe(self, i, hook, before, after):
        (self.attn if hook == "before_block" else self.mlp)[i] = after.x.shape[1]


def block_flops(n_attn, n_mlp, d, mlp_ratio=4.0, context=0, d_context=0) -> float:
    """Forward FLOPs (2 per multiply-add) of one pre-norm block: qkv, scores, weighted sum and
    projection at n_attn tokens, MLP at n_mlp; with `context` tokens, a cross-attention too."""
    f = 2 * n_attn * d * 3 * d + 2 * 2 * n_attn * n_attn * d + 2 * n_attn * d * d
    f += 2 * 2 * n_mlp * d * int(mlp_ratio * d)
    if context:
        f += 2 * n_attn * d * d + 2 * context * d_context * 2 * d + 2 * 2 * n_attn * context * d + 2 * n_attn * d * d
    return f


def count_tokens(model, cfg: TrainConfig, images, ids):
    """(per-block attention and MLP token counts, tokens leaving the ViT) of one guided forward."""
    make = train.reducer_fn(cfg, model.cfg.vision, step=cfg.steps)  # past any warm-up
    text = model.text_guidance(model.text(ids))
    counter = TokenCounter(make(text) if make else None)
    with torch.no_grad():
        out = model.visual.forward_tokens(images, counter)
    return counter, out.x.shape[1]


def vit_forward_flops(vit, counter) -> float:
    """Forward FLOPs of the ViT: the patch embedding, then each block at the token counts seen."""
    v = vit.cfg
    return 2 * v.num_patches * 3 * v.patch_size ** 2 * v.width + sum(
        block_flops(counter.attn[i], counter.mlp[i], v.width, v.mlp_ratio) for i in range(v.depth))


def forward_flops(model, cfg: TrainConfig, counter, n_out, text_len) -> dict:
    """Per-sample forward FLOPs of a training step, by part."""
    v, t = model.cfg.vision, model.cfg.text
    P = v.num_patches
    vit = vit_forward_flops(model.visual, counter)
    lookahead = 0.0
    if cfg.method == "elip" and cfg.lookahead:
        s = train.elip_schedule(cfg, v.depth)
        for b, n in zip(s.begin_layers, s.num_layers):
            N = counter.mlp[b - 1] if b else 1 + P  # the sequence entering block b, unpruned
            # n - 1 whole blocks, then the last block's qkv projection and one row of logits
            lookahead += (n - 1) * block_flops(N, N, v.width, v.mlp_ratio) + 2 * N * v.width * 3 * v.width + 2 * N * v.width
            if cfg.rollout:  # each earlier block's attention logits again, and the row carried back through them
                lookahead += (n - 1) * (2 * N * N * v.width + 2 * N * N)
    text = t.depth * block_flops(text_len, text_len, t.width, t.mlp_ratio)
    objectives = model.cfg.objectives
    fusion_one = model.cfg.fusion_depth * block_flops(text_len, text_len, t.width, 4.0, n_out, v.width)
    fusion = (3 if "itm" in objectives else 0) * fusion_one + (1 if "mlm" in objectives else 0) * fusion_one
    text *= 2 if "mlm" in objectives else 1  # the masked text is encoded again
    return dict(vit=vit, lookahead=lookahead, text=text, fusion=fusion)


def saved_activation_bytes(fn, model) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn` runs, the model's
    own parameters (which Linear layers save too) excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def bench_model(preset, batch_size, objectives, repeats, budget_gb, device):
    rows = {}
    for name, overrides in VARIANTS.items():
        cfg = TrainConfig(vit=preset, objectives=objectives, **overrides,
                          **({} if preset == "tiny64" else dict(text_width=768, text_heads=12, embed_dim=512)))
        torch.manual_seed(0)
        model = CLIP(train.model_config(cfg, vocab_size=100)).to(device)
        v = model.cfg.vision
        images = torch.randn(batch_size, 3, v.image_size, v.image_size, device=device)
        ids = torch.randint(5, 100, (batch_size, 24), device=device)
        ids[:, 0], ids[:, -1] = 2, 3
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        make = train.reducer_fn(cfg, v, step=cfg.steps)

        def step():
            out = model(images, ids, make, torch.Generator().manual_seed(0))
            return out["loss"]

        times = []
        for r in range(repeats + 1):  # the first is a warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss, act = saved_activation_bytes(step, model) if r == 0 else (step(), None)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r == 0:
                activation = act
            else:
                times.append(time.perf_counter() - t0)
        counter, n_out = count_tokens(model, cfg, images[:2], ids[:2])
        f = forward_flops(model, cfg, counter, n_out, ids.shape[1])
        train_flops = 3 * (f["vit"] + f["text"] + f["fusion"]) + f["lookahead"]
        state = 4 * sum(p.numel() * p.element_size() for p in model.parameters())  # weights, grads, 2 Adam moments
        rows[name] = dict(step_s=statistics.median(times), train_gflops=train_flops / 1e9,
                          lookahead_share=f["lookahead"] / train_flops, activation_mb=activation / 2 ** 20,
                          tokens_out=n_out, largest_batch=int((budget_gb * 2 ** 30 - state) / (activation / batch_size)),
                          cuda_peak_mb=torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None)
    return rows


def markdown(preset, batch_size, rows, budget_gb) -> str:
    base = rows["none"]
    lines = [f"**{preset}**, batch {batch_size}:", "",
             "| method | step (s) | measured speed-up | FLOP-allowed speed-up | train GFLOPs/img | look-ahead share "
             f"| activations (MB) | largest batch in {budget_gb:g} GB | tokens out |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['step_s']:.3f} | {base['step_s'] / r['step_s']:.2f}x | "
                     f"{base['train_gflops'] / r['train_gflops']:.2f}x | {r['train_gflops']:.2f} | "
                     f"{100 * r['lookahead_share']:.0f}% | {r['activation_mb']:.0f} "
                     f"({r['activation_mb'] / base['activation_mb']:.2f}x) | {r['largest_batch']} | {r['tokens_out']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# ToMe off the shelf: inference throughput of a ViT with and without merging

def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_tome(preset: str, batch_size: int, r: str, repeats: int, device) -> dict:
    """Images per second of the plain ViT and of ToMe with r per block, in the same run (timed in
    alternation so that both see the same machine), and the forward FLOPs of each."""
    from merge import ToMe
    from vit import ViT, vit_config
    torch.manual_seed(0)
    vit = ViT(vit_config(preset)).to(device).eval()
    images = torch.randn(batch_size, 3, vit.cfg.image_size, vit.cfg.image_size, device=device)
    schedule, note = train.tome_schedule(TrainConfig(tome_r=r), vit.cfg.depth, 1 + vit.cfg.num_patches)
    reducers = dict(none=None, tome=ToMe(schedule))
    times = {k: [] for k in reducers}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, reducer in reducers.items():
                times[name].append(timed(lambda: vit(images, reducer), 1))
    rows = {}
    for name, reducer in reducers.items():
        counter = TokenCounter(reducer)
        with torch.inference_mode():
            out = vit.forward_tokens(images[:1], counter)
        rows[name] = dict(img_s=batch_size / statistics.median(times[name]), gflops=vit_forward_flops(vit, counter) / 1e9,
                          tokens_out=out.x.shape[1])
    rows["tome"]["r"] = schedule
    return rows


def tome_markdown(preset, batch_size, rows) -> str:
    base = rows["none"]
    lines = [f"**{preset}** inference, batch {batch_size}, ToMe r per block {rows['tome']['r']}:", "",
             "| model | img/s | measured speed-up | FLOP-allowed speed-up | GFLOPs/img | tokens out |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['img_s']:.1f} | {r['img_s'] / base['img_s']:.2f}x | "
                     f"{base['gflops'] / r['gflops']:.2f}x | {r['gflops']:.2f} | {r['tokens_out']} |")
    return "\n".join(lines)


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
            model, tokenizer, ckpt = train.load_checkpoint(path, device)
            cfg, v = train.saved_config(ckpt), model.cfg.vision
            made = make(model, cfg)
            reducer, extra, timeable = (made + (True,))[:3] if isinstance(made, tuple) else (made, 0.0, True)
            gallery, zeroshot_set = evaluation.eval_sets(v.image_size, v.patch_size, cfg.scene_seed(), n_test)
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
    import data
    from elip import ELIP, RandomPrune, scaled_schedule
    model, tokenizer, ckpt = train.load_checkpoint(ckpt_path, device)
    v = model.cfg.vision
    dataset = data.ShapesDataset("test", n_test, v.image_size, v.patch_size, train.saved_config(ckpt).scene_seed())
    images, captions, owner = evaluation.load_gallery(dataset, n_test)
    masks = torch.stack([dataset[i]["patch_mask"] for i in range(len(images))])
    texts = evaluation.encode_texts(model, tokenizer, captions, device)
    S, P = scaled_schedule(v.depth), v.num_patches
    scorers = {"ELIP look-ahead (no text)": lambda prop, m, g: ELIP(S, P, None, prop_attn=prop),
               "EViT's [CLS] attention (previous block)": lambda prop, m, g: ELIP(S, P, None, lookahead=False, prop_attn=prop),
               "random": lambda prop, m, g: RandomPrune(S, P, g, prop_attn=prop),
               "the object patches (ground truth)": lambda prop, m, g: evaluation.ObjectPrune(S, P, m, prop, g)}

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
    model, tokenizer, ckpt = train.load_checkpoint(paths[0], device)
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
                          m, layer, **train.search_settings(cfg, m, tokenizer)[0]), fuse=fuse), 0.0, False)))
    specs += [("predictor", "predictor", paths,
               lambda m, cfg: (m.reducer(tokens=False), predictor_flops(m.predictor))),
              ("predictor", f"predictor + {model.rcfg.num_tokens} learnable tokens", paths,
               lambda m, cfg: (m.reducer(), predictor_flops(m.predictor)))]
    points = cost_points(specs, batch_size, repeats, n_test, device, zeroshot=True,
                         against=[spec[0] for spec in specs].index("ToMe"))
    scene_seed = train.saved_config(ckpt).scene_seed()
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
    """The points `bench.py --ranking` wrote (its --points), checked to carry the paired differences."""
    try:
        with open(path) as f:
            points = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"--pool-ranking: cannot read {path} as JSON ({e})")
    if not (isinstance(points, list) and points and all(isinstance(p, dict) and "paired_r1_high" in p for p in points)):
        raise DataError(f"--pool-ranking: {path} is not the --points file of a `bench.py --ranking` run")
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


# ----------------------------------------------------------------------------------------------
# EVLGen: the captioner's training step, merged and unmerged, and where its time goes

CAPTIONERS = {  # name -> TrainConfig overrides (the bridge)
    "evlgen (merge r=16)": dict(bridge="merge", bridge_r=16),
    "no merging (r=0)": dict(bridge="merge", bridge_r=0),
    "learned queries (32)": dict(bridge="query"),
    "learned queries, stage 1 (ITC+ITM)": dict(bridge="query", stage1_steps=1),
}


def bench_captioner(batch_size: int, repeats: int, device) -> dict:
    """Per bridge: seconds of a training step, split into the frozen ViT's forward, the bridge
    (forward + backward of its output alone) and the rest (the frozen LM's forward and backward
    to the prompt); tokens entering the LM. Default model sizes, frozen ViT, random weights and captions."""
    from model import Captioner
    from text import LMConfig
    rows = {}
    for name, overrides in CAPTIONERS.items():
        cfg = TrainConfig(method="evlgen", lm="-", **overrides)
        lm = dict(model_config=dict(vars(LMConfig(vocab_size=100, context_length=cfg.lm_context))))
        torch.manual_seed(0)
        mcfg = dataclasses.replace(train.captioner_config(cfg, dict(lm=lm), vocab_size=100), freeze_vit=True)
        model = Captioner(mcfg).to(device).train()  # the ViT frozen, as when loaded with --clip
        v = model.cfg.vision
        images = torch.randn(batch_size, 3, v.image_size, v.image_size, device=device)
        ids = torch.randint(5, 100, (batch_size, 24), device=device)
        ids[:, 0], ids[:, -1] = 2, 3
        model.stage = 1 if cfg.stage1_steps else 2
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            model(images, ids, generator=torch.Generator().manual_seed(0))["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        features = model.visual_tokens(images).detach()

        def bridge_only():
            model.bridge(features).x.sum().backward()

        t_step = timed(step, repeats)
        t_vit = timed(lambda: model.visual_tokens(images), repeats)
        t_bridge = timed(bridge_only, repeats)
        opt.zero_grad(set_to_none=True)
        rows[name] = dict(step_s=t_step, vit_s=t_vit, bridge_s=t_bridge, rest_s=t_step - t_vit - t_bridge,
                          lm_tokens=model.prompt(images[:1]).x.shape[1] if model.stage == 2 else 0)
    return rows


def captioner_markdown(batch_size, rows) -> str:
    base = rows["no merging (r=0)"]
    lines = [f"**captioner training step** (default sizes), batch {batch_size}:", "",
             "| bridge | step (s) | speed vs no merging | frozen ViT fwd (s) | bridge fwd+bwd (s) | rest: LM / heads (s) "
             "| visual tokens into the LM |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['step_s']:.3f} | {base['step_s'] / r['step_s']:.2f}x | {r['vit_s']:.3f} | "
                     f"{r['bridge_s']:.3f} | {r['rest_s']:.3f} | {r['lm_tokens'] or '- (no LM in stage 1)'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# --all: every run behind the README's results, its tables and figures, end to end

QUICK = ["--width", "32", "--depth", "6", "--heads", "2", "--text-width", "32", "--text-depth", "1",
         "--embed-dim", "16", "--train-size", "64", "--test-size", "20", "--warmup", "2", "--batch-size", "8"]
PRUNING_RUNS = {"none": ("none", []), "elip": ("elip", []), "elip_ft": ("elip", ["--prune-until", "0.9"]),
                "elip_last_row": ("elip", ["--no-rollout"]),
                "evit": ("evit", []),  # name: (method, extra flags)
                "elip_paper": ("elip", ["--no-fused-prop-attn", "--no-rollout"]),
                "evit_paper": ("evit", ["--no-fused-prop-attn"]),
                "elip_partial": ("elip", ["--partial-captions", "0.5"])}  # for the text-steering table only
PRUNING_NAMES = {"none": "`none`",
                 "elip": "`elip` (`--keep-warmup 0`; default: proportional attention and rollout)",
                 "elip_ft": "`elip --prune-until 0.9` (the same, its last 10% of the steps on all tokens)",
                 "elip_last_row": "`elip --no-rollout` (proportional attention; the last block's row, as published)",
                 "elip_paper": "`elip` as published (`--keep-warmup 0 --no-fused-prop-attn --no-rollout`)",
                 "evit": "`evit` (default: fused token with proportional attention)",
                 "evit_paper": "`evit` as published (`--no-fused-prop-attn`)"}
RANKING_STEPS = 300  # the learnable tokens' training steps in the README's Patch Ranking runs
RANKING_RUNS = {"ranking": ["--no-rank-fuse"], "ranking_fuse": []}  # the pruned patches dropped (the paper) / fused
CAPTIONERS_RUN = {"evlgen": [], "nomerge": ["--bridge-r", "0"], "query1": ["--bridge", "query"],
                  "query2": ["--bridge", "query", "--stage1-steps", "{stage1}"]}

LM_STEPS = 2000  # the frozen LMs': enough to learn to use their context (450 are not: README, EVLGen)
VIDEO_STEPS, VIDEO_BATCH, VIDEO_SEEDS = 2000, 64, (0,)  # the video captioners' (their LM: LM_STEPS of 128)
# All three with bridge positions: without them the merging bridge sees a set of tokens, and a
# captioner on a contextualizer that carries the direction did not word it (README, Video).
VIDEO_RUNS = {"video_avg": ["--bridge-pos", "--no-temporal"],
              "video_ctx": ["--bridge-pos", "--temporal-lr-scale", "10"],
              "video_marker": ["--bridge-pos", "--no-temporal", "--motion-marker"]}
VIDEO_NAMES = {"video_avg": "frame averaging only (the ViT untouched)",
               "video_ctx": "+ temporal contextualizer with the frame embedding, its learning rate x10",
               "video_marker": "diagnostic: frame averaging, the direction painted in a corner (`--motion-marker`)"}
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
    direction index (M,)), the directions in data.DIRECTIONS order without "still"."""
    import data
    directions = [d for d in data.DIRECTIONS if d != "still"]
    dataset = data.ShapesVideoDataset(split, n, vcfg.image_size, vcfg.patch_size, seed, frames)
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
        model, _, ckpt = train.load_checkpoint(path, device)
        captioner = getattr(model, "temporal", None) is not None
        if not captioner and ckpt.get("kind", "clip") != "clip":
            raise DataError(f"--direction-probe {path}: neither a CLIP nor a video captioner with the temporal "
                            f"contextualizer (a {ckpt['kind']} checkpoint)")
        rows += direction_probe(model, train.saved_config(ckpt).scene_seed(), steps, n_train=4 * n_test, n_test=n_test,
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


def all_runs(root: str, quick: bool) -> dict:
    """name -> train.py arguments of every run the README's tables come from (quick: tiny models
    and a few steps, to check the pipeline, not the figures)."""
    q = QUICK if quick else []
    steps = (lambda n: ["--steps", "3"]) if quick else (lambda n: ["--steps", str(n)])
    runs = {"clip": q + steps(450), "lm": ["--method", "lm"] + q + steps(LM_STEPS) + (["--lm-width", "32"] if quick else [])}
    for name, (method, extra) in PRUNING_RUNS.items():
        for seed in (0, 1, 2):
            runs[f"{name}_{seed}"] = (["--method", method, "--objectives", "itc,itm,mlm", "--seed", str(seed)] + q
                                      + steps(300) + (["--keep-warmup", "0"] if method == "elip" else []) + extra)
    cap = ["--method", "evlgen", "--lm", f"{root}/lm/ckpt.pt", "--clip", f"{root}/clip/ckpt.pt", "--eval-every",
           "1" if quick else "25", "--eval-size", "10" if quick else "500"] + q + steps(300)
    for seed in (0, 1):
        for name, extra in CAPTIONERS_RUN.items():
            runs[f"{name}_{seed}"] = cap + ["--seed", str(seed)] + [e.format(stage1=3 if quick else 300) for e in extra]
    runs["lm_video"] = ["--method", "lm", "--video"] + q + steps(LM_STEPS) + (["--lm-width", "32"] if quick else [])
    for seed in VIDEO_SEEDS:
        for name, extra in VIDEO_RUNS.items():
            runs[f"{name}_{seed}"] = (["--method", "evlgen", "--video", "--lm", f"{root}/lm_video/ckpt.pt", "--clip",
                                       f"{root}/clip/ckpt.pt", "--seed", str(seed)] + q + steps(VIDEO_STEPS) + extra
                                      + ([] if quick else ["--batch-size", str(VIDEO_BATCH)]))
    for name, extra in RANKING_RUNS.items():  # Patch Ranking on the default CLIP: one search, three predictors and token sets
        for seed in (0, 1, 2):
            runs[f"{name}_{seed}"] = (["--method", "ranking", "--init", f"{root}/clip/ckpt.pt", "--rank-cache",
                                       f"{root}/{name.replace('ranking', 'rankings')}.pt", "--data-seed", "0", "--seed",
                                       str(seed)] + steps(RANKING_STEPS) + extra
                                      + (QUICK[-8:] + ["--rank-images", "10", "--predictor-steps", "3"] if quick else []))
    return {name: args + ["--out", f"{root}/{name}", "--overwrite"] for name, args in runs.items()}


# --all --quick runs each script's main() in this interpreter instead of a new process: at toy size
# Python's and torch's start-up (about 1.7 s on 2 CPU cores) is half of every call, and the test
# suite makes 81 of them. The full --all keeps a process per call, so no run's memory or state
# can reach the next.
IN_PROCESS = False


def run_logged(cmd: list, log_path: str, what: str):
    """Run a script of this folder (cmd = ["train.py", *args]), its output to log_path; stop naming
    the run and the log if it fails."""
    import subprocess
    import sys
    with open(log_path, "w") as log:
        if IN_PROCESS:
            code = run_in_process(cmd, log)
        else:
            code = subprocess.run([sys.executable, *cmd], stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"error: {what} failed (exit {code}); its output is in {log_path}")


def run_in_process(cmd: list, log) -> int:
    """cmd's script's main(args) here, stdout and stderr to log; the exit code its process would give."""
    import contextlib
    import importlib
    import sys
    import traceback
    name = cmd[0].removesuffix(".py")
    # bench.py itself: this module, whether it was imported or run as __main__, so the flag holds
    module = sys.modules[__name__] if name == "bench" else importlib.import_module(name)
    argv, sys.argv = sys.argv, list(cmd)  # argparse names the script in its messages from sys.argv[0]
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            module.main(cmd[1:])
        except SystemExit as e:  # argparse, or a script's one-sentence error
            if e.code is None or isinstance(e.code, int):
                return e.code or 0
            print(e.code, file=log)
            return 1
        except DataError as e:  # as bench.py's __main__ says it
            print(f"error: {e}", file=log)
            return 1
        except Exception:  # a process would print the traceback and exit 1
            traceback.print_exc(file=log)
            return 1
        finally:
            sys.argv = argv
    return 0


def video_table(root: str, n_test: list) -> str:
    """Markdown: CIDEr-D, BLEU-4 and the motion accuracies of the video captioners of --all (mean
    and std over their seeds), the gates they learned and their training time."""
    import eval as evaluation
    keys = ("cider_d", "bleu4", "motion_accuracy", "direction_accuracy", "direction_accuracy_one_object")
    rows = ["| model | seeds | CIDEr-D | BLEU-4 | motion accuracy (5 choices) | direction accuracy (moving "
            "objects, 4) | direction, clips of one moving object | mean abs(alpha) | training min/run |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, label in VIDEO_NAMES.items():
        ckpts = [f"{root}/{name}_{seed}/ckpt.pt" for seed in VIDEO_SEEDS]
        runs = [eval_json(["--ckpt", c, *n_test], root, f"eval_{name}_{s}") for c, s in zip(ckpts, VIDEO_SEEDS)]
        m = evaluation.mean_over_runs(runs)
        cells = " | ".join(f"{100 * m[k]['mean']:.1f}" + (f" ± {100 * m[k]['std']:.1f}" if len(runs) > 1 else "")
                           for k in keys)
        gates = [abs(a) for run in runs for a in run.get("temporal_alpha", [])]
        alpha = f"{sum(gates) / len(gates):.3f}" if gates else "—"
        minutes = statistics.mean(torch.load(c, weights_only=True)["train_seconds"] / 60 for c in ckpts)
        rows.append(f"| {label} | {len(runs)} | {cells} | {alpha} | {minutes:.1f} |")
    return "\n".join(rows)


def caption_test_clips(path: str, n_test: int, device, flag: str) -> dict:
    """A video captioner checkpoint's greedy captions of its shapes test clips, with their
    references, scenes, the checkpoint's training config and its gates (empty: frame averaging)."""
    import eval as evaluation
    model, tokenizer, ckpt = train.load_checkpoint(path, device)
    cfg = train.saved_config(ckpt)
    if ckpt.get("kind") != "captioner" or not cfg.video or cfg.val_data:
        raise DataError(f"{flag}: {path} is not a video captioner of the shapes clips (--method evlgen --video)")
    v = model.cfg.vision
    clips = evaluation.eval_sets(v.image_size, v.patch_size, cfg.scene_seed(), n_test, frames=cfg.frames,
                                 marker=cfg.motion_marker)[0]
    images, refs = evaluation.caption_gallery(clips, n_test)
    cands = evaluation.caption_images(model, tokenizer, images, device)
    gates = model.temporal.gates() if model.temporal is not None else []
    return dict(cands=cands, refs=refs, scenes=[clips.scene(i)[0] for i in range(len(images))], cfg=cfg, gates=gates)


def video_paired(paths: list, n_test: int = 1000, device="cpu") -> str:
    """Markdown, a row per pair A B of video captioners of one seed (paths A1 B1 A2 B2 ...), both
    captioning the same test clips (greedy): A's and B's motion accuracy, direction on clips of
    one moving object and CIDEr-D, and A − B clip by clip with its 95% bootstrap interval over the
    clips (`eval.paired_motion`). The interval holds the test clips' sampling noise only, not a
    seed's."""
    import eval as evaluation
    if not paths or len(paths) % 2:
        raise DataError(f"--video-paired takes checkpoints in pairs A B [A B ...], got {len(paths)}")
    rows = ["| A | B | seed | steps | test clips (of one moving object) | motion accuracy (5 choices): A, B, "
            "A − B [95%] | direction, clips of one moving object: A, B, A − B [95%] | CIDEr-D: A, B, A − B [95%] |",
            "|---|---|---|---|---|---|---|---|"]
    for pa, pb in zip(paths[::2], paths[1::2]):
        a, b = runs = [caption_test_clips(path, n_test, device, "--video-paired") for path in (pa, pb)]
        if a["scenes"] != b["scenes"]:
            raise DataError(f"--video-paired: {pa} and {pb} were trained on other shapes scenes (--seed / "
                            f"--data-seed), so their test clips differ: pair runs of one seed")
        paired = evaluation.paired_motion(a["cands"], b["cands"], a["refs"], a["scenes"])
        own = [dict(evaluation.motion_accuracy(r["cands"], r["scenes"]), cider_d=evaluation.cider_d(r["cands"], r["refs"]))
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
    `eval.motion_accuracy`'s direction_said. A captioner that knows the axis but not the sign has
    all of its clips on the axis and about half of them right."""
    said = [(true, word, n) for true, words in direction_said.items() for word, n in words.items()]
    return sum(n for true, word, n in said if AXIS.get(word) == AXIS[true]), sum(n for _, _, n in said)


def video_runs(paths: list, n_test: int = 1000, device="cpu") -> str:
    """Markdown: one row per video captioner checkpoint — its seed, steps, temporal model and bridge
    positions as trained, then CIDEr-D, BLEU-4 and the motion measures on its own test clips
    (greedy, as `eval.py` computes them), how often it puts a one-mover clip on the right axis, and
    its gates. The runs of a seed share their test clips; other seeds draw their own."""
    import eval as evaluation
    rows = ["| checkpoint | seed | steps | temporal model | bridge positions | CIDEr-D | BLEU-4 | motion accuracy "
            "(5 choices) | direction accuracy (moving objects, 4) | direction, clips of one moving object | "
            "one-mover clips on the right axis | gates (alpha, first block to last) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        r = caption_test_clips(path, n_test, device, "--video-runs")
        cfg, m = r["cfg"], evaluation.motion_accuracy(r["cands"], r["scenes"])
        kind = "causal contextualizer" if cfg.temporal_causal else "contextualizer"
        model = f"{kind}, learning rate x{cfg.temporal_lr_scale:g}" if cfg.temporal else "frame averaging"
        model += f", motion words x{cfg.motion_word_weight:g} in the loss" if cfg.motion_word_weight != 1.0 else ""
        right, ones = on_the_axis(m["direction_said"])
        gates = " ".join(f"{a:+.2f}" for a in r["gates"]) or "—"
        rows.append(f"| `{path}` | {cfg.seed} | {cfg.steps} | {model} | {'yes' if cfg.bridge_pos else 'no'} | "
                    f"{100 * evaluation.cider_d(r['cands'], r['refs']):.1f} | {100 * evaluation.bleu(r['cands'], r['refs']):.1f} | "
                    f"{100 * m['motion_accuracy']:.1f} | {100 * m['direction_accuracy']:.1f} | "
                    f"{100 * m['direction_accuracy_one_object']:.1f} | {right} of {ones} | {gates} |")
    return "\n".join(rows)


CAPTIONER_NAMES = {"evlgen": "EVLGen (merge, r = 16)", "nomerge": "(a) no merging",
                   "query1": "(b) learned queries, one stage", "query2": "(c) learned queries, two stages"}


def captioner_table(root: str, seeds=(0, 1)) -> str:
    """Markdown: the captioners of --all, one row per seed — final metrics (the last evaluation of
    each log), training time, and the time each first reached the two-stage baseline's (c) final
    CIDEr-D on its curve — then the CIDEr-D curves side by side, seed by seed ((c) counted from the
    start of its LM loss)."""
    import eval as evaluation
    logs = {(n, s): [json.loads(line) for line in open(f"{root}/{n}_{s}/log.jsonl")] for n in CAPTIONERS_RUN
            for s in seeds}
    curves = {k: evaluation.read_curve(f"{root}/{k[0]}_{k[1]}/log.jsonl", "cider_d") for k in logs}
    rows = ["| captioner | seed | BLEU-4 | CIDEr-D | Q&A acc. | training time | time to reach (c)'s final CIDEr-D "
            "| share of (c)'s total |", "|---|---|---|---|---|---|---|---|"]
    for name, label in CAPTIONER_NAMES.items():
        for s in seeds:
            last = [r for r in logs[name, s] if "eval" in r][-1]
            stage1 = [r["time"] for r in logs[name, s] if "itc" in r]
            target, total = curves["query2", s][-1][2], curves["query2", s][-1][1]
            reach = evaluation.time_to_reach(curves[name, s], target)
            m = last["eval"]
            rows.append(f"| {label if s == seeds[0] else ''} | {s} | {100 * m['bleu4']:.1f} | {100 * m['cider_d']:.1f}"
                        f" | {100 * m['vqa_accuracy']:.1f} | {last['time']:.0f} s"
                        + (f" (stage 1: {stage1[-1]:.0f} s)" if stage1 else "")
                        + (" | never | — |" if reach is None else f" | {reach:.0f} s | {reach / total:.2f} |"))
    targets = ", ".join(f"{100 * curves['query2', s][-1][2]:.1f} for seed {s}" for s in seeds)
    steps = sorted({st for (n, _), c in curves.items() if n != "query2" for st, _, _ in c})
    stage1_steps = {s: max([r["step"] for r in logs["query2", s] if "itc" in r], default=0) for s in seeds}
    head = ["", f"(c)'s final CIDEr-D: {targets}. CIDEr-D along the curves (seed " + " / ".join(map(str, seeds))
            + "; steps of the LM loss):", "", "| captioner | " + " | ".join(map(str, steps)) + " |",
            "|---|" + "---|" * len(steps)]
    for name, label in CAPTIONER_NAMES.items():
        cells = []
        for st in steps:
            vals = [[v for at, _, v in curves[name, s] if at == st + (stage1_steps[s] if name == "query2" else 0)]
                    for s in seeds]
            cells.append(" / ".join(f"{100 * v[0]:.0f}" if v else "—" for v in vals))
        head.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows + head)


def elip_table(root: str, n_test: list, names=tuple(PRUNING_NAMES)) -> str:
    """Markdown: R@1 of the ITC+ITM+MLM runs ROOT/NAME_S of --all (3 seeds each), evaluated with all
    tokens and with the pruning each trained with, and the gap of the pruned mean R@1 to `none`'s."""
    rows = ["| run | i2t R@1, all tokens | t2i R@1, all tokens | i2t R@1, pruned | t2i R@1, pruned | "
            "zero-shot top-1, all tokens | mean R@1, pruned, minus none's |", "|---|---|---|---|---|---|---|"]
    cell = lambda m, k: f"{100 * m[k]['mean']:.1f} ± {100 * m[k]['std']:.1f}" if m else "—"
    mean_r1 = lambda m: 50 * (m["image_to_text_R@1"]["mean"] + m["text_to_image_R@1"]["mean"])
    baseline = None
    for name in names:
        label, ckpts = PRUNING_NAMES[name], [f"{root}/{name}_{seed}/ckpt.pt" for seed in (0, 1, 2)]
        full = eval_json(["--ckpt", *ckpts, *n_test], root, f"eval_{name}")["mean"]
        pruned = eval_json(["--ckpt", *ckpts, "--prune", *n_test], root, f"eval_{name}_prune")["mean"] \
            if name != "none" else None
        baseline = mean_r1(full) if name == "none" else baseline
        gap = f"{mean_r1(pruned) - baseline:+.1f}" if pruned else "—"
        rows.append(f"| {label} | {cell(full, 'image_to_text_R@1')} | {cell(full, 'text_to_image_R@1')} | "
                    f"{cell(pruned, 'image_to_text_R@1')} | {cell(pruned, 'text_to_image_R@1')} | "
                    f"{cell(full, 'zeroshot_top1')} | {gap} |")
    return "\n".join(rows)


def elip_table_of_folder(root: str, n_test: int) -> str:
    """--elip-table DIR: the table above for the runs DIR holds (none_S, and any of the other names
    of --all, S = 0, 1, 2), trained outside --all at some other budget. Stops unless `none` is
    there and every run trained for the same number of steps."""
    import os
    present = [n for n in PRUNING_NAMES if all(os.path.exists(f"{root}/{n}_{s}/ckpt.pt") for s in (0, 1, 2))]
    if "none" not in present:
        raise SystemExit(f"error: --elip-table {root}: needs none_0, none_1 and none_2 (DIR/none_S/ckpt.pt), "
                         "the baseline every gap is measured against")
    steps = {f"{n}_{s}": train.saved_config(train.read_checkpoint(f"{root}/{n}_{s}/ckpt.pt")).steps
             for n in present for s in (0, 1, 2)}
    if len(set(steps.values())) > 1:
        raise SystemExit(f"error: --elip-table {root}: the runs trained for different numbers of steps "
                         f"({', '.join(f'{k} {v}' for k, v in steps.items())}); the table compares equal budgets")
    return (f"{len(present)} runs x 3 seeds, {steps['none_0']} steps each, {n_test}-image gallery\n\n"
            + elip_table(root, ["--n-test", str(n_test)], present))


RELEVANCE_MODELS = {"none": "trained with `--method none`", "elip": "trained with `--method elip` (default)",
                    "elip_last_row": "trained with `--method elip --no-rollout`",
                    "elip_partial": "trained with `--method elip --partial-captions 0.5`"}
SCORINGS = {"elip": "ELIP (look-ahead, text, scored as the model trained; `none`: rollout)",
            "elip_no_text": "ELIP without the text (lambda 1)", "elip_no_rollout": "ELIP, the last block's row alone",
            "elip_no_lookahead": "ELIP without look-ahead", "evit_scoring": "EViT's ([CLS] attention of the previous block)",
            "random": "random"}


def relevance_markdown(root: str, n: int = 500) -> str:
    """Markdown: token relevance (object coverage after each ELIP stage) of the none / elip /
    elip --no-rollout runs of --all, mean ± std over their 3 seeds, for every scoring."""
    rows = ["| model (3 seeds) | kept tokens chosen by | stage 1 | stage 2 | stage 3 |", "|---|---|---|---|---|"]
    steering = []
    for model, label in RELEVANCE_MODELS.items():
        ckpts = [f"{root}/{model}_{seed}/ckpt.pt" for seed in (0, 1, 2)]
        runs = eval_json(["--ckpt", *ckpts, "--relevance", "--n-test", str(n)], root, f"relevance_{model}")["runs"]
        for name, scoring in SCORINGS.items():
            if name not in runs[0]["token_relevance"]:
                continue
            c = torch.tensor([r["token_relevance"][name]["coverage"] for r in runs]) * 100  # (seeds, stages)
            cells = " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in zip(c.mean(0).tolist(), c.std(0).tolist()))
            rows.append(f"| {label if name == 'elip' else ''} | {scoring} | {cells} |")
        steering.append((label, runs))
    return "\n".join(rows) + "\n\n" + steering_markdown(steering)


def steering_markdown(models: list) -> str:
    """Markdown: text steering (eval.text_steering) of each model's runs, (label, runs) pairs: the
    named object's coverage, the other object's, and the gap, per stage, mean ± std over the seeds."""
    rows = ["| model (3 seeds) | kept tokens chosen by | stage 1: named / other | stage 2: named / other | "
            "stage 3: named / other | gap (named minus other), stages 1 / 2 / 3 |", "|---|---|---|---|---|---|"]
    for label, runs in models:
        for name in ("elip", "elip_no_text"):
            named, other = (torch.tensor([r["text_steering"][name][side] for r in runs]) * 100 for side in ("named", "unnamed"))
            gap = named - other  # (seeds, stages)
            cells = " | ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(named.mean(0).tolist(), other.mean(0).tolist()))
            gaps = " / ".join(f"{m:+.1f} ± {s:.1f}" for m, s in zip(gap.mean(0).tolist(), gap.std(0).tolist()))
            rows.append(f"| {label if name == 'elip' else ''} | {SCORINGS[name]} | {cells} | {gaps} |")
    return "\n".join(rows)


def eval_json(args: list, root: str, name: str) -> dict:
    run_logged(["eval.py", "--json", *args], f"{root}/{name}.json", f"eval.py {' '.join(args)}")
    with open(f"{root}/{name}.json") as f:
        return json.loads(f.read().strip().splitlines()[-1])


class StepTimes:
    """Wall seconds of every step of an --all folder, kept in ROOT/timings.json across invocations:
    a folder built in several sittings (an interrupted --all continues) still says what it cost.
    A finished training run keeps the time it took when it ran; tables and figures are rebuilt
    by every invocation and keep their latest time."""

    def __init__(self, root: str):
        import os
        self.path = f"{root}/timings.json"
        self.seconds = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.seconds = json.load(f)

    def run(self, name: str, fn, *args):
        """fn(*args), its wall time recorded under `name`."""
        import os
        t0 = time.time()
        out = fn(*args)
        self.seconds[name] = time.time() - t0
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.seconds, f, indent=1)
        os.replace(self.path + ".tmp", self.path)
        return out

    def summary(self, runs: list) -> str:
        """One sentence: the folder's total, split into training runs and the rest."""
        train_s = sum(self.seconds.get(f"train.py {name}", 0.0) for name in runs)
        untimed = [name for name in runs if f"train.py {name}" not in self.seconds]
        rest_s = sum(v for k, v in self.seconds.items() if not k.startswith("train.py "))
        return (f"every step of this folder, each timed when it last ran: {(train_s + rest_s) / 60:.1f} min "
                f"({train_s / 60:.1f} training runs, {rest_s / 60:.1f} tables and figures)"
                + (f"; not counted, finished before timings.json existed: {', '.join(untimed)}" if untimed else ""))


def section_from_file(times: StepTimes, name: str, cmd: list, md: str, log: str, title: str) -> str:
    """A table another bench.py call writes to `md`, timed, under a heading."""
    times.run(name, run_logged, cmd, log, name)
    with open(md) as f:
        return f"### {title}\n\n" + f.read()


def tome_off_the_shelf(root: str, n_test: list) -> str:
    rows = ["| r per block | image→text R@1 | text→image R@1 | zero-shot top-1 |", "|---|---|---|---|"]
    for r in ("0", "4", "8", "12"):
        m = eval_json(["--ckpt", f"{root}/clip/ckpt.pt", *n_test] + (["--tome-r", r] if r != "0" else []), root, f"tome_{r}")
        rows.append(f"| {r} | {100 * m['image_to_text_R@1']:.1f} | {100 * m['text_to_image_R@1']:.1f} | "
                    f"{100 * m['zeroshot_top1']:.1f} |")
    return "\n".join(rows)


def train_all(root: str, quick: bool, times: StepTimes, t0: float) -> list:
    """Every training run of all_runs not finished yet, each timed. Returns the runs' names."""
    import os
    os.makedirs(root, exist_ok=True)
    runs = all_runs(root, quick)
    for name, args in runs.items():
        if os.path.exists(f"{root}/{name}/ckpt.pt"):
            continue  # finished before: rerunning is a matter of deleting the folder
        print(f"[{(time.time() - t0) / 60:5.1f} min] train.py {name}", flush=True)
        times.run(f"train.py {name}", run_logged, ["train.py", *args], f"{root}/{name}.txt", f"train.py {name}")
    return list(runs)


def reproduce_all(root: str, quick: bool = False) -> str:
    """Every training run (skipping those already finished), then the tables (Markdown, in
    ROOT/results.md) and the figures (ROOT/*.png), each step timed (ROOT/timings.json).
    Returns the Markdown."""
    global IN_PROCESS
    was, IN_PROCESS = IN_PROCESS, quick
    try:
        return run_every_step(root, quick)
    finally:
        IN_PROCESS = was


def run_every_step(root: str, quick: bool) -> str:
    """reproduce_all's work: the training runs, the tables, the figures."""
    import os
    t0, sections, times = time.time(), [], StepTimes(root)
    runs = train_all(root, quick, times, t0)  # makes the folder
    print(f"[{(time.time() - t0) / 60:5.1f} min] tables and figures", flush=True)
    n_test = ["--n-test", "20" if quick else "1000"]
    sections.append("### ELIP and EViT against no pruning (3 seeds)\n\n" + times.run("elip table", elip_table, root, n_test))
    sections.append("### Token relevance (3 seeds)\n\n"
                    + times.run("relevance table", relevance_markdown, root, 20 if quick else 500))
    sections.append(section_from_file(
        times, "bench.py --fused-probe", ["bench.py", "--fused-probe", f"{root}/none_0/ckpt.pt", "--out",
                                          f"{root}/probe.md", *n_test], f"{root}/probe.md", f"{root}/probe.txt",
        "The none_0 CLIP pruned at inference: which tokens, and the fused token's attention"))
    sections.append("### ToMe off the shelf on the default CLIP\n\n" + times.run("tome table", tome_off_the_shelf, root, n_test))
    sections.append("### Captioners: final metrics, time to reach (c)'s final CIDEr-D, curves\n\n"
                    + times.run("captioner table", captioner_table, root))
    sections.append("### Video captioning: the temporal contextualizer\n\n" + times.run("video table", video_table, root, n_test))
    sections.append(section_from_file(
        times, "bench.py --direction-probe",
        ["bench.py", "--direction-probe", f"{root}/clip/ckpt.pt", f"{root}/video_ctx_{VIDEO_SEEDS[0]}/ckpt.pt",
         "--out", f"{root}/direction.md", *n_test] + (["--probe-steps", "3"] if quick else []),
        f"{root}/direction.md", f"{root}/direction.txt", "Video: where the direction of motion goes (a probe)"))
    for name, title in (("ranking", "dropped, as published: --no-rank-fuse"), ("ranking_fuse", "fused into one token: the default")):
        sections.append(section_from_file(
            times, f"bench.py --ranking ({name})",
            ["bench.py", "--ranking", *[f"{root}/{name}_{s}/ckpt.pt" for s in (0, 1, 2)], "--points",
             f"{root}/{name}_points.json", "--out", f"{root}/{name}.md", *n_test], f"{root}/{name}.md",
            f"{root}/{name}.txt", f"Patch Ranking on the default CLIP (40% of the patches pruned at the layer, {title})"))
    sections.append(section_from_file(
        times, "bench.py", ["bench.py", "--out", f"{root}/bench.md"] + (
            ["--tome", "tiny64", "--models", "tiny64", "--repeats", "1", "--captioner-batch", "8", "--batch-size", "8"]
            if quick else []), f"{root}/bench.md", f"{root}/bench.txt", "Cost (bench.py)"))
    small = ["--n-test", "20"] if quick else []
    times.run("bench.py --tome-sweep", run_logged, ["bench.py", "--tome-sweep", f"{root}/clip/ckpt.pt", "--points",
                                                     f"{root}/points.json", *small], f"{root}/sweep.txt", "bench.py --tome-sweep")
    times.run("bench.py --method-points", run_logged, ["bench.py", "--method-points", root, "--points",
                                                        f"{root}/method_points.json", *small],
              f"{root}/method_points.txt", "bench.py --method-points")
    for args in (["--ckpt", f"{root}/elip_0/ckpt.pt", "--n", "6", "--out", f"{root}/masks_elip.png"],
                 ["--ckpt", f"{root}/clip/ckpt.pt", "--method", "tome", "--n", "4", "--out", f"{root}/masks_tome.png"],
                 ["--ckpt", f"{root}/ranking_fuse_0/ckpt.pt", "--n", "4", "--out", f"{root}/masks_ranking.png"],
                 ["--curves", *[f"{root}/{n}_0/log.jsonl" for n in CAPTIONERS_RUN], "--metric", "cider_d", "--x", "time",
                  "--out", f"{root}/captioner_curves.png"],
                 ["--tradeoff", f"{root}/points.json", "--out", f"{root}/tradeoff_tome.png"],
                 ["--tradeoff", f"{root}/method_points.json", "--out", f"{root}/tradeoff_methods.png"]):
        name = f"viz.py {os.path.basename(args[-1])}"
        times.run(name, run_logged, ["viz.py", *args], f"{root}/viz.txt", name)
    minutes = (time.time() - t0) / 60
    text = "\n\n".join(sections) + (f"\n\n(bench.py --all{' --quick' if quick else ''}: {minutes:.1f} min this "
                                      f"invocation; {times.summary(runs)})\n")
    with open(f"{root}/results.md", "w") as f:
        f.write(text)
    return text


def print_and_save(table: str, out: str):
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(table + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description="ToMe's inference speed-up; the captioner's training step per bridge; "
                                            "the CLIP training step under none / evit / elip / elip without "
                                            "look-ahead / tome.")
    p.add_argument("--models", default="tiny64,vit_b16", help="comma-separated ViT presets ('' to skip)")
    p.add_argument("--tome", default="vit_s16,vit_b16", help="ViT presets for ToMe's inference rows ('' to skip)")
    p.add_argument("--tome-r", default="13", help="ToMe's r (a number, one per block, or auto)")
    p.add_argument("--tome-batch", type=int, default=16)
    p.add_argument("--captioner", action=argparse.BooleanOptionalAction, default=True,
                   help="the captioner's training step per bridge (EVLGen)")
    p.add_argument("--captioner-batch", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=0, help="0: 64 for tiny64, 8 for the 224-px presets")
    p.add_argument("--objectives", default="itc,itm,mlm")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-budget-gb", type=float, default=16.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="", help="also write the Markdown tables to this file")
    p.add_argument("--tome-sweep", metavar="CKPT", default="",
                   help="instead: accuracy, images/s and GFLOPs of ToMe off the shelf on this CLIP checkpoint for "
                        "r = 0, 2, ..., 10, written as JSON to --points (for viz.py --tradeoff)")
    p.add_argument("--method-points", metavar="DIR", default="",
                   help="instead: accuracy, images/s and GFLOPs of none / ELIP / EViT (3 seeds each) and ToMe off "
                        "the shelf on the none runs, from the runs of --all DIR, written as JSON to --points")
    p.add_argument("--ranking", nargs="+", metavar="CKPT", default=[],
                   help="instead: the Patch Ranking table (unpruned, random, [CLS] attention, ToMe at equal FLOPs, "
                        "golden oracle, predictor, predictor + tokens) from --method ranking checkpoints of one CLIP")
    p.add_argument("--pool-ranking", nargs="+", metavar="POINTS", default=[],
                   help="instead: the differences from ToMe of the --points files of `--ranking` runs on different "
                        "CLIPs (each its own test images), side by side and pooled by inverse variance")
    p.add_argument("--fused-probe", metavar="CKPT", default="",
                   help="instead: R@1 of this CLIP pruned at inference at ELIP's schedule, by ELIP / EViT / random / "
                        "ground-truth object scores, the fused token attending as one token or proportionally")
    p.add_argument("--direction-probe", nargs="+", metavar="CKPT", default=[],
                   help="instead: how well small readers name a video clip's direction of motion from the ViT tokens "
                        "of a CLIP (all frames, frame averaging, the temporal contextualizer + averaging) or through "
                        "the contextualizer of a video captioner (frozen)")
    p.add_argument("--probe-steps", type=int, default=PROBE_STEPS,
                   help="with --direction-probe: training steps per reader (its training clips: the first 4 x --n-test)")
    p.add_argument("--elip-table", metavar="DIR", default="",
                   help="instead: the ELIP/EViT-against-none table (all tokens and pruned) of the runs DIR/NAME_S, "
                        "S = 0, 1, 2, NAME none (required), elip, evit, ... as --all names them")
    p.add_argument("--video-paired", nargs="+", metavar="CKPT", default=[],
                   help="instead: pairs A B [A B ...] of video captioners of one seed, each pair on the same test "
                        "clips: their motion accuracy, one-mover direction and CIDEr-D, and A - B clip by clip with "
                        "95%% bootstrap intervals, a row per pair")
    p.add_argument("--video-runs", nargs="+", metavar="CKPT", default=[],
                   help="instead: a row per video captioner (seed, steps, temporal model, bridge positions as "
                        "trained): CIDEr-D, BLEU-4, the motion measures, one-mover clips on the right axis, gates")
    p.add_argument("--no-oracle", action="store_true", help="with --ranking: skip the (slow) golden-oracle row")
    p.add_argument("--points", default="points.json")
    p.add_argument("--n-test", type=int, default=1000, help="with --tome-sweep / --method-points / --fused-probe / --ranking / --elip-table / "
                                                                  "--video-paired / --video-runs: test gallery (or clips) size")
    p.add_argument("--all", metavar="DIR", default="",
                   help="instead: every run behind the README's results, then its tables (DIR/results.md) and "
                        "figures (DIR/*.png); finished runs are kept, so an interrupted --all continues")
    p.add_argument("--quick", action="store_true", help="with --all: tiny models, a few steps (checks the pipeline)")
    args = p.parse_args(argv)
    if args.all:
        print(reproduce_all(args.all, args.quick))
        return
    if args.elip_table:
        print_and_save(elip_table_of_folder(args.elip_table, args.n_test), args.out)
        return
    if args.fused_probe:
        table = probe_markdown(fused_attention_probe(args.fused_probe, args.n_test, args.device))
        print_and_save(table, args.out)
        return
    if args.direction_probe:
        table = direction_markdown(direction_probe_checkpoints(args.direction_probe, args.probe_steps, args.n_test,
                                                               args.device))
        print_and_save(table, args.out)
        return
    if args.video_paired:
        print_and_save(video_paired(args.video_paired, args.n_test, args.device), args.out)
        return
    if args.video_runs:
        print_and_save(video_runs(args.video_runs, args.n_test, args.device), args.out)
        return
    if args.pool_ranking:
        print_and_save(pool_ranking(args.pool_ranking), args.out)
        return
    if args.ranking:
        points = ranking_points(args.ranking, args.n_test, args.device, oracle=not args.no_oracle)
        with open(args.points, "w") as f:
            json.dump(points, f, indent=1)
        table = ranking_markdown(points)
        print_and_save(table, args.out)
        return
    if args.tome_sweep or args.method_points:
        kw = dict(n_test=args.n_test, device=args.device)
        points = tome_sweep(args.tome_sweep, **kw) if args.tome_sweep else method_points(args.method_points, **kw)
        with open(args.points, "w") as f:
            json.dump(points, f, indent=1)
        for pt in points:
            print(f"{pt['name']:<14} mean R@1 {pt['accuracy']:5.1f} | {pt['img_s']:7.0f} img/s | {pt['gflops']:.3f} GFLOPs")
        return
    tables = []
    device = torch.device(args.device)
    for preset in filter(None, args.tome.split(",")):
        tables.append(tome_markdown(preset, args.tome_batch,
                                    bench_tome(preset, args.tome_batch, args.tome_r, max(args.repeats, 5), device)))
        print(tables[-1] + "\n", flush=True)
    if args.captioner:
        tables.append(captioner_markdown(args.captioner_batch, bench_captioner(args.captioner_batch, args.repeats, device)))
        print(tables[-1] + "\n", flush=True)
    for preset in filter(None, args.models.split(",")):
        B = args.batch_size or (64 if preset == "tiny64" else 8)
        rows = bench_model(preset, B, args.objectives, args.repeats, args.mem_budget_gb, torch.device(args.device))
        tables.append(markdown(preset, B, rows, args.mem_budget_gb))
        print(tables[-1] + "\n", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"objectives {args.objectives}, device {args.device}, {args.repeats} timed repeats\n\n")
            f.write("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    try:
        main()
    except DataError as e:  # a missing or unreadable checkpoint: one sentence, not a traceback
        raise SystemExit(f"error: {e}") from None
