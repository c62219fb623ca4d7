"""
Evaluation: image-text retrieval (R@1/5/10 both ways, also ITM-reranked as in ALBEF) and zero-shot
classification; the command line for every kind of checkpoint (captioning metrics are in
captioning.py, token relevance in relevance.py).

Read first: `recall_at_k` (the standard definitions, on score matrices), then
`zeroshot_classifier`, then `evaluate`, which `train.py` calls at the end.
`python eval.py --ckpt A [B C ...]` evaluates checkpoints and averages several (e.g. seeds).

Paired comparison (`per_image_retrieval`, `paired_interval`): whether one model is ahead of
another on the same gallery, or inside its sampling noise (a bootstrap over the gallery's images).

Definitions (as in CLIP, ALBEF and open_clip's benchmark): with several captions per image,
image->text R@k is the share of images with ANY of their captions among the k most similar texts;
text->image R@k is the share of captions whose own image is among the k most similar images.
Ties are broken in a random order, in expectation (`hit_chance`), so a collapsed model that
scores everything alike gets chance, not 100%. Metric names follow open_clip (`image_to_text_R@1`,
...), values are fractions.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

import data
import shapes
from captioner import Captioner, LanguageModel
from captioning import curves_table, evaluate_captioner, evaluate_lm
from checkpoint import ReducerConfig, elip_schedule, load_checkpoint, make_reducer, reducer_config, tome_schedule, trained_on
from data import DataError
from merge import ToMe
from model import RankingCLIP
from relevance import relevance_table, steering_table


@torch.no_grad()
def retrieval_metrics(image_features, text_features, text_to_image, ks=(1, 5, 10)) -> dict:
    """image_features (N, E), text_features (M, E), text_to_image (M,) the image of each text."""
    sim = similarity(image_features, text_features)  # (N, M)
    return recall_at_k(sim, sim, text_to_image, ks)


def similarity(image_features, text_features) -> torch.Tensor:
    """(N, M) dot products, after checking that no feature is NaN or infinite (a diverged model
    would otherwise score whatever its NaNs happen to compare as)."""
    for what, f in (("image", image_features), ("text", text_features)):
        bad = int((~torch.isfinite(f)).any(-1).sum())
        if bad:
            raise ValueError(f"{bad} of {len(f)} {what} features are NaN or infinite: the model has diverged "
                             f"or its weights are broken, so retrieval cannot be scored")
    return image_features.float() @ text_features.float().T


def hit_chance(ahead, tied_wrong, tied_right, k: int) -> torch.Tensor:
    """The chance that one of the `tied_right` items lands in the top k when `ahead` items score
    strictly higher and `tied_wrong` wrong items tie with them, ties broken in a random order:
    1 - C(w, m) / C(w + r, m) with m = k - ahead places left. Without ties it is exactly 0 or 1."""
    m = (k - ahead).clamp(min=0).double()
    w, n = tied_wrong.double(), (tied_wrong + tied_right).double()
    log_choose = lambda a, b: torch.lgamma(a + 1) - torch.lgamma(b + 1) - torch.lgamma(a - b + 1)
    fits = torch.minimum(m, w)  # m > w: the wrong ones cannot fill the places, a hit for sure
    miss = torch.where(m <= w, (log_choose(w, fits) - log_choose(n, fits)).exp(), torch.zeros_like(m))
    return (1 - miss).float()


def retrieval_hits(i2t_scores, t2i_scores, text_to_image, k: int) -> tuple:
    """From (N, M) image-text score matrices: per image, whether one of its captions is among its
    k best-scored texts, (N,); per caption, whether its image is among its k best images, (M,).
    Ties count as a random order, so they count against the model as often as for it: a model
    that scores everything alike gets chance (k / N text->image), never a perfect score."""
    N, M = i2t_scores.shape
    cols = torch.arange(M, device=i2t_scores.device)
    positive = torch.zeros(N, M, dtype=torch.bool, device=i2t_scores.device)
    positive[text_to_image, cols] = True
    best = i2t_scores.masked_fill(~positive, float("-inf")).max(1, keepdim=True).values  # (N, 1)
    tied = i2t_scores == best
    i2t = hit_chance((i2t_scores > best).sum(1), (tied & ~positive).sum(1), (tied & positive).sum(1), k)
    own = t2i_scores[text_to_image, cols][None]  # (1, M)
    t2i = hit_chance((t2i_scores > own).sum(0), (t2i_scores == own).sum(0) - 1, torch.ones_like(cols), k)
    return i2t, t2i


def recall_at_k(i2t_scores, t2i_scores, text_to_image, ks=(1, 5, 10)) -> dict:
    """R@k both ways from (N, M) image-text score matrices (one per direction, so a reranker may
    rescore each direction's candidates)."""
    out = {}
    for k in ks:
        i2t, t2i = retrieval_hits(i2t_scores, t2i_scores, text_to_image, k)
        out[f"image_to_text_R@{k}"] = i2t.mean().item()
        out[f"text_to_image_R@{k}"] = t2i.mean().item()
    return out


@torch.no_grad()
def encode_texts(model, tokenizer, texts, device, batch_size=256) -> torch.Tensor:
    return torch.cat([model.encode_text(tokenizer(texts[i:i + batch_size]).to(device))
                      for i in range(0, len(texts), batch_size)])


@torch.no_grad()
def encode_images(model, images, device, batch_size=256, reducer=None) -> torch.Tensor:
    return torch.cat([model.encode_image(images[i:i + batch_size].to(device), reducer)
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def gallery_features(model, tokenizer, dataset, device, n=None, reducer=None) -> tuple:
    """(image features (N, E), caption features (M, E), text_to_image (M,)) of a gallery's first n images."""
    images, captions, owner = data.load_gallery(dataset, n)
    return (encode_images(model, images, device, reducer=reducer), encode_texts(model, tokenizer, captions, device),
            owner.to(device))


def retrieval(model, tokenizer, dataset, device, n=None, reducer=None) -> dict:
    return retrieval_metrics(*gallery_features(model, tokenizer, dataset, device, n, reducer))


# ----------------------------------------------------------------------------------------------
# Paired comparison: is one model ahead of another on THIS gallery, or within its sampling noise?
# Two reducers of the same CLIP differ on few images, so their difference is far less noisy than
# either R@1 alone; the bootstrap resamples gallery images (an image's captions move with it).

def per_image_retrieval(image_features, text_features, text_to_image, logit_scale) -> dict:
    """Per gallery image, two numbers whose means are gallery metrics, so models compare image by image.
    `r1`: its share of the mean R@1 (its image->text hit and its captions' text->image hits, the
    latter weighted N/M so the mean over images is the mean R@1 exactly, whatever the captions per image).
    `loss`: its term of CLIP's contrastive loss with the whole gallery as one batch, each image
    with its first caption: a smooth measure of the same ranking that R@1 thresholds."""
    sim = similarity(image_features, text_features)  # (N, M)
    N, M = sim.shape
    i2t_hit, t2i_hit = retrieval_hits(sim, sim, text_to_image, 1)
    caption_hits = torch.zeros(N, device=sim.device).index_add_(0, text_to_image, t2i_hit)
    r1 = 0.5 * (i2t_hit + caption_hits * N / M)
    first = torch.full((N,), M, device=sim.device).scatter_reduce(
        0, text_to_image, torch.arange(M, device=sim.device), "amin")  # each image's first caption
    logits = logit_scale * sim[:, first]  # (N, N)
    target = torch.arange(N, device=sim.device)
    loss = 0.5 * (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none"))
    return dict(r1=r1, loss=loss)


def paired_interval(diff: torch.Tensor, level: float = 0.95, reps: int = 4000, seed: int = 0) -> tuple:
    """The percentile bootstrap interval of mean(diff), diff (N,) one value per gallery image."""
    g = torch.Generator().manual_seed(seed)
    means = diff.double().cpu()[torch.randint(len(diff), (reps, len(diff)), generator=g)].mean(1)  # (reps,)
    tail = (1 - level) / 2
    return means.quantile(tail).item(), means.quantile(1 - tail).item()


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames, templates, device) -> torch.Tensor:
    """(C, E): each class's mean prompt embedding over the templates, re-normalised (as CLIP)."""
    weights = [encode_texts(model, tokenizer, [t.format(c) for t in templates], device).mean(0)
               for c in classnames]
    return F.normalize(torch.stack(weights), dim=-1)


def topk_accuracy(logits, labels, ks=(1, 5)) -> dict:
    """Top-k accuracy for each k up to the number of classes (top-5 of 2 classes means nothing)."""
    ks = [k for k in ks if k <= logits.shape[1]]
    top = logits.topk(max(ks), dim=1).indices  # (N, kmax)
    hit = top == labels[:, None]
    return {f"top{k}": hit[:, :k].any(1).float().mean().item() for k in ks}


@torch.no_grad()
def itm_rerank(model, tokenizer, dataset, device, n=None, k=16, chunk=64) -> dict:
    """ALBEF's retrieval: the top-k candidates by ITC similarity are rescored by the ITM head's
    match probability (all image tokens: inference does not prune); the rest keep -inf."""
    images, captions, owner = data.load_gallery(dataset, n)
    image_tokens = torch.cat([model.visual.forward_tokens(images[i:i + 256].to(device)).x
                              for i in range(0, len(images), 256)])  # (N, 1+P, Dv)
    ids = tokenizer(captions).to(device)
    text_tokens = torch.cat([model.text.forward_tokens(ids[i:i + 256]) for i in range(0, len(ids), 256)])
    img = F.normalize(model.visual_proj(image_tokens[:, 0]), dim=-1)
    txt = F.normalize(model.text_proj(text_tokens[:, 0]), dim=-1)
    sim = img @ txt.T  # (N, M)

    def rescore(scores, rows_are_images):
        out = torch.full_like(scores, float("-inf"))
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (R, k)
        for r in range(0, len(scores), chunk):
            rows = torch.arange(r, min(r + chunk, len(scores)), device=scores.device)
            a, b = rows[:, None].expand(-1, top.shape[1]).flatten(), top[rows].flatten()
            im, tx = (a, b) if rows_are_images else (b, a)
            p = model.itm_logits(image_tokens[im], text_tokens[tx], ids[tx]).float().softmax(-1)[:, 1]
            out[a, b] = p
        return out

    i2t = rescore(sim, True)
    t2i = rescore(sim.T.contiguous(), False).T
    return {f"itm_{key}": v for key, v in recall_at_k(i2t, t2i, owner.to(device)).items()}


class ShapesZeroShot(torch.utils.data.Dataset):
    """The first n one-object scenes of the shapes test split, labelled '{colour} {shape}'."""
    classes, templates = shapes.SHAPES_CLASSES, shapes.SHAPES_TEMPLATES

    def __init__(self, n, image_size=64, patch_size=8, seed=0):
        self.scenes = shapes.ShapesDataset("test", 10 ** 9, image_size, patch_size, seed)
        self.index = []
        i = 0
        while len(self.index) < n:
            if len(self.scenes.scene(i)[0]) == 1:
                self.index.append(i)
            i += 1

    def __len__(self):
        return len(self.index)

    def __getitem__(self, k):
        item = self.scenes[self.index[k]]
        return item["image"], self.classes.index(shapes.zeroshot_label(item["attributes"]))


@torch.no_grad()
def zeroshot(model, tokenizer, dataset, device, reducer=None) -> dict:
    """Top-1/top-5 of classifying `dataset`'s (image, label) pairs by prompts of its classes."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    classifier = zeroshot_classifier(model, tokenizer, dataset.classes, dataset.templates, device)
    logits = encode_images(model, torch.stack(images), device, reducer=reducer) @ classifier.T
    return {f"zeroshot_{k}": v for k, v in topk_accuracy(logits, torch.tensor(labels, device=device)).items()}


def eval_sets(image_size, patch_size, seed=0, n_test=1000, val_data="", image_root="", zeroshot_dir="",
              skip_bad=False, frames=0, keys=()):
    """(retrieval gallery or None, zero-shot set or None): the shapes test split by default, else
    the caption file / class folders given. Built before training, so a bad path stops early.
    frames > 0: video clips of that many frames (the shapes videos, or clip folders), no zero-shot."""
    if frames:
        gallery = (data.VideoCaptionDataset(val_data, image_root, image_size, frames, skip_bad) if val_data else
                   shapes.ShapesVideoDataset("test", n_test, image_size, patch_size, seed, frames))
        return gallery, None
    if val_data or zeroshot_dir:
        gallery = data.image_text_pairs(val_data, image_root, image_size, skip_bad, keys) if val_data else None
        folder = data.ImageFolder(zeroshot_dir, image_size) if zeroshot_dir else None
        return gallery, folder
    return (shapes.ShapesDataset("test", n_test, image_size, patch_size, seed),
            ShapesZeroShot(max(1, n_test // 2), image_size, patch_size, seed))


@torch.no_grad()
def evaluate(model, tokenizer, device, sets, n_test=None, reducer=None) -> dict:
    """Retrieval on the gallery (its first n_test images) and zero-shot accuracy, in eval mode."""
    gallery, zeroshot_set = sets
    was_training = model.training
    model.eval()
    metrics = {}
    if gallery is not None:
        metrics.update(retrieval(model, tokenizer, gallery, device, n_test, reducer))
    if zeroshot_set is not None:
        metrics.update(zeroshot(model, tokenizer, zeroshot_set, device, reducer))
    model.train(was_training)
    return metrics


def shown_scale(key: str) -> int:
    """Metrics are fractions, printed as percentages; perplexities are printed as they are."""
    return 1 if key.startswith("perplexity") else 100


HEADLINE = ("image_to_text_R@1", "text_to_image_R@1", "zeroshot_top1", "bleu4", "cider_d", "vqa_accuracy",
            "motion_accuracy", "direction_accuracy", "direction_accuracy_one_object", "perplexity", "perplexity_in_context",
            "perplexity_other_context")


def headline(metrics: dict) -> str:
    """The metrics train.py prints when a run ends, on one line."""
    return " | ".join(f"{k} {v:.2f}" if shown_scale(k) == 1 else f"{k} {100 * v:.1f}"
                      for k, v in metrics.items() if k in HEADLINE)


def evaluate_model(model, tokenizer, device, sets, n: int, curve: bool = False) -> dict:
    """What train.py evaluates a model it trained on: a captioner's captions (`curve`: without the
    Q&A, for a learning curve), a language model's perplexity, a CLIP's retrieval and zero-shot.
    Patch Ranking's model is pruned by its predictor, as it was made to be; a CLIP trained with a
    reducer is evaluated with all its tokens, the authors' protocol (`--prune` here prunes)."""
    if isinstance(model, Captioner):
        return evaluate_captioner(model, tokenizer, device, sets, n, vqa=not curve)
    if isinstance(model, LanguageModel):
        return evaluate_lm(model.lm, tokenizer, device, sets, n)
    return evaluate(model, tokenizer, device, sets, n, model.reducer() if isinstance(model, RankingCLIP) else None)


def format_table(metrics: dict) -> str:
    lines = [f"{k:<25} {shown_scale(k) * v:6.2f}" for k, v in metrics.items()
             if isinstance(v, float)]
    lines += [f"example caption: {c}" for c in metrics.get("examples", [])]
    if "temporal_alpha" in metrics:
        lines.append("temporal gates (alpha per ViT block): " + " ".join(f"{a:+.3f}" for a in metrics["temporal_alpha"]))
    for true, said in metrics.get("direction_said", {}).items():
        lines.append(f"one-mover clips moving {true:<5} first motion word said: "
                     + (", ".join(f"{w} {n}" for w, n in sorted(said.items(), key=lambda kv: -kv[1])) or "-"))
    for name, r in metrics.get("token_relevance", {}).items():
        stages = " ".join(f"{100 * c:5.1f}" for c in r["coverage"])
        kept = " ".join(f"{100 * k:5.1f}" for k in r["kept"])
        lines.append(f"relevance {name:<18} object patches kept per stage: {stages}   (patches kept: {kept})")
    for name, r in metrics.get("text_steering", {}).items():
        lines.append(f"steering  {name:<18} named object's patches kept per stage: "
                     + " ".join(f"{100 * c:5.1f}" for c in r["named"]) + "   (the other object's: "
                     + " ".join(f"{100 * c:5.1f}" for c in r["unnamed"]) + f"; {r['pairs']} captions)")
    return "\n".join(lines)


def evaluate_checkpoint(path, args) -> dict:
    """Every metric the flags ask for, for one checkpoint."""
    model, tokenizer, ckpt = load_checkpoint(path, args.device)
    cfg, trained = reducer_config(ckpt), trained_on(ckpt)
    kind = ckpt.get("kind", "clip")
    if kind in ("lm", "captioner") and (args.prune or args.tome_r or args.relevance or args.itm_rerank or args.zeroshot_dir):
        raise ValueError(f"{path} holds a {kind}: --prune, --tome-r, --relevance, --itm-rerank and "
                         f"--zeroshot-dir are for CLIP checkpoints")
    if kind == "ranking" and (args.prune or args.tome_r or args.relevance):
        raise ValueError(f"{path} holds a Patch Ranking model, evaluated with its own pruning: --prune, --tome-r "
                         f"and --relevance are for the CLIPs of train.py's other methods")
    frames = trained["frames"]
    if kind == "lm":  # only its captions are read
        sets = eval_sets(64, 8, trained["scene_seed"], args.n_test, args.val_data, args.image_root, frames=frames)
        return evaluate_lm(model.lm, tokenizer, args.device, sets, args.n_test)
    v = model.cfg.vision
    keys = (args.csv_img_key, args.csv_caption_key) if args.csv_img_key else ()
    sets = eval_sets(v.image_size, v.patch_size, trained["scene_seed"], args.n_test, args.val_data, args.image_root,
                     args.zeroshot_dir, frames=frames, keys=keys)
    if kind == "captioner":
        return evaluate_captioner(model, tokenizer, args.device, sets, args.n_test, args.beams)
    reducer = model.reducer() if kind == "ranking" else None  # Patch Ranking: its predictor and learned tokens
    if args.prune:
        make = make_reducer(cfg, v, guided=False)
        if make is None:
            raise ValueError(f"--prune: {path} was trained with --method none, which prunes nothing")
        reducer = make(None)
    if args.tome_r:  # off the shelf: ToMe needs no training, so any checkpoint can be merged
        if args.prune:
            raise ValueError("--prune and --tome-r each choose the reducer: give one")
        r, note = tome_schedule(ReducerConfig(tome_r=args.tome_r), v.depth, 1 + v.num_patches)
        print(f"ToMe off the shelf: r per block {r}" + (f" ({note})" if note else ""), file=sys.stderr)
        reducer = ToMe(r)
    metrics = evaluate(model, tokenizer, args.device, sets, args.n_test, reducer)
    if args.itm_rerank:
        if "itm" not in model.cfg.objectives:
            raise ValueError(f"--itm-rerank: {path} was trained without the itm objective")
        metrics.update(itm_rerank(model, tokenizer, sets[0], args.device, args.n_test, args.itm_rerank))
    if args.relevance:
        scenes = shapes.ShapesDataset("test", args.n_test, v.image_size, v.patch_size, trained["scene_seed"])
        schedule = elip_schedule(cfg, v.depth) if cfg.method == "elip" else None  # the one it trained with
        prop_attn = cfg.fused_prop_attn if cfg.method in ("elip", "evit") else True  # as trained, else ours
        rollout = cfg.rollout if cfg.method == "elip" else True
        lam = cfg.elip_lambda if args.elip_lambda is None else args.elip_lambda
        if not 0 <= lam <= 1:
            raise ValueError(f"--elip-lambda is a weight between 0 and 1, not {lam}")
        settings = (min(500, args.n_test), lam, schedule, prop_attn, rollout)
        metrics["token_relevance"] = relevance_table(model, tokenizer, scenes, args.device, *settings)
        metrics["text_steering"] = steering_table(model, tokenizer, scenes, args.device, *settings)
    return metrics


def mean_over_runs(runs: list) -> dict:
    """Per metric, the mean and the standard deviation over runs (e.g. seeds), and their count."""
    t = {k: torch.tensor([r[k] for r in runs]) for k in runs[0] if isinstance(runs[0][k], float)}
    return {k: dict(mean=v.mean().item(), std=v.std().item() if len(v) > 1 else 0.0, n=len(v)) for k, v in t.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate train.py checkpoints: CLIP (retrieval, zero-shot "
                                            "classification, token relevance), captioners (BLEU-4, CIDEr-D, Q&A), "
                                            "language models (perplexity). Several checkpoints (e.g. seeds) are "
                                            "also averaged.")
    p.add_argument("--ckpt", nargs="+", default=[], help="checkpoint(s) written by train.py")
    p.add_argument("--curves", nargs="+", default=[], metavar="LOG",
                   help="instead: a Markdown table of the CIDEr-D curves in these log.jsonl files (--eval-every runs)")
    p.add_argument("--json", action="store_true", help="print JSON (open_clip key names, fractions)")
    p.add_argument("--val-data", default="", help="caption file or shards for retrieval (default: the shapes test split)")
    p.add_argument("--image-root", default="", help="folder the caption file's image paths are relative to")
    p.add_argument("--csv-img-key", default="", help="a CSV/TSV with a header: the image column (with --csv-caption-key)")
    p.add_argument("--csv-caption-key", default="", help="a CSV/TSV with a header: the caption column")
    p.add_argument("--zeroshot-dir", default="", help="class-per-folder image tree for zero-shot classification")
    p.add_argument("--n-test", type=int, default=1000, help="gallery size (images)")
    p.add_argument("--relevance", action="store_true",
                   help="token relevance on the shapes test split at ELIP's schedule, for ELIP, EViT scoring and random; "
                        "and ELIP's text steering")
    p.add_argument("--elip-lambda", type=float, default=None, metavar="L",
                   help="with --relevance: ELIP's weight of the vision [CLS] (1 - the text's) instead of the checkpoint's")
    p.add_argument("--prune", action="store_true",
                   help="evaluate with the checkpoint's pruning method applied without text (default: all tokens)")
    p.add_argument("--tome-r", default="", metavar="R",
                   help="evaluate with ToMe merging R tokens per block (a number, one per block, or auto), off the shelf")
    p.add_argument("--itm-rerank", type=int, default=0, metavar="K",
                   help="also rerank the top K retrieval candidates with the ITM head (models trained with itm)")
    p.add_argument("--beams", type=int, default=1, help="beam size of caption generation (captioners)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if not args.ckpt and not args.curves:
        p.error("give --ckpt CKPT [...] or --curves LOG [...]")
    if args.elip_lambda is not None and not args.relevance:
        p.error("--elip-lambda applies to --relevance")
    try:
        if args.curves:
            print(curves_table(args.curves))
            return
        runs = [evaluate_checkpoint(path, args) for path in args.ckpt]
    except (DataError, ValueError) as e:
        sys.exit(f"error: {e}")
    if len(runs) == 1:
        print(json.dumps(runs[0]) if args.json else format_table(runs[0]))
        return
    summary = mean_over_runs(runs)
    if args.json:
        print(json.dumps(dict(mean=summary, runs=runs)))
        return
    for k, s in summary.items():
        f = shown_scale(k)
        print(f"{k:<25} {f * s['mean']:6.2f} +- {f * s['std']:5.2f}  (mean +- std over {s['n']} checkpoints)")
    for path, r in zip(args.ckpt, runs):
        for name, rel in r.get("token_relevance", {}).items():
            print(f"{path}: relevance {name:<18} " + " ".join(f"{100 * c:5.1f}" for c in rel["coverage"]))
    for name in runs[0].get("token_relevance", {}):
        mean = torch.tensor([r["token_relevance"][name]["coverage"] for r in runs]).mean(0)
        print(f"mean over checkpoints: relevance {name:<18} " + " ".join(f"{100 * c:5.1f}" for c in mean.tolist()))
    for name in runs[0].get("text_steering", {}):
        for side in ("named", "unnamed"):
            mean = torch.tensor([r["text_steering"][name][side] for r in runs]).mean(0)
            print(f"mean over checkpoints: steering {name:<18} {side:<8} " + " ".join(f"{100 * c:5.1f}" for c in mean.tolist()))


if __name__ == "__main__":
    main()
