"""
Evaluation: image-text retrieval (R@1/5/10 both ways, also ITM-reranked as in ALBEF), zero-shot
classification, token relevance (does a reducer keep the patches the caption talks about?), and
captioning metrics.

Read first: `recall_at_k` (the standard definitions, on score matrices), then
`zeroshot_classifier`, then `evaluate`, which `train.py` calls at the end; then `token_relevance`.
`python eval.py --ckpt A [B C ...]` evaluates checkpoints and averages several (e.g. seeds).

Token relevance (`token_relevance`): for any reducer, after each stage that changes the token
count, the share of the patches covered by the captioned objects that are still held by kept
(un-fused, size-1) tokens. Random pruning keeps that share equal to the share of patches kept;
a reducer that keeps what the caption talks about does better. Text steering (`text_steering`):
the same, with a caption that names one object of a scene of several, against one that names
another — whether the text chooses WHICH object is kept, not only that objects are.

Paired comparison (`per_image_retrieval`, `paired_interval`): whether one model is ahead of
another on the same gallery, or inside its sampling noise (a bootstrap over the gallery's images).

Captioning (`captioning`): BLEU-4 and CIDEr-D as the COCO caption evaluation defines them
(`bleu`, `cider_d`: read these two for the exact formulas), question answering by prompting the
captioner, and (`--curves`) CIDEr-D learning curves from training logs.

Definitions (as in CLIP, ALBEF and open_clip's benchmark): with several captions per image,
image->text R@k is the share of images with ANY of their captions among the k most similar texts;
text->image R@k is the share of captions whose own image is among the k most similar images.
Ties are broken in a random order, in expectation (`hit_chance`), so a collapsed model that
scores everything alike gets chance, not 100%. Metric names follow open_clip (`image_to_text_R@1`, ...), values are fractions.
"""
import argparse
import json
import math
import sys
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

import data
import shapes
from checkpoint import ReducerConfig, elip_schedule, load_checkpoint, make_reducer, reducer_config, tome_schedule, trained_on
from data import DataError
from shapes import qa_text
from elip import ELIP, RandomPrune, scaled_schedule
from merge import ToMe
from text import normalize
from vit import Observed, Reducer


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


def load_gallery(dataset, n=None):
    """The first n items of a dataset as (images (n, 3, S, S), captions, text_to_image)."""
    n = len(dataset) if n is None else min(n, len(dataset))
    images, captions, owner = [], [], []
    for i in range(n):
        item = dataset[i]
        images.append(item["image"])
        captions += item["captions"]
        owner += [i] * len(item["captions"])
    return torch.stack(images), captions, torch.tensor(owner)


@torch.no_grad()
def gallery_features(model, tokenizer, dataset, device, n=None, reducer=None) -> tuple:
    """(image features (N, E), caption features (M, E), text_to_image (M,)) of a gallery's first n images."""
    images, captions, owner = load_gallery(dataset, n)
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
    images, captions, owner = load_gallery(dataset, n)
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
              skip_bad=False, frames=0, marker=False):
    """(retrieval gallery or None, zero-shot set or None): the shapes test split by default, else
    the caption file / class folders given. Built before training, so a bad path stops early.
    frames > 0: video clips of that many frames (the shapes videos, or clip folders), no zero-shot;
    marker: the shapes videos with the direction painted in a corner (train.py --motion-marker)."""
    if frames:
        gallery = (data.VideoCaptionDataset(val_data, image_root, image_size, frames, skip_bad) if val_data else
                   shapes.ShapesVideoDataset("test", n_test, image_size, patch_size, seed, frames, marker=marker))
        return gallery, None
    if val_data or zeroshot_dir:
        gallery = data.CaptionDataset(val_data, image_root, image_size, skip_bad=skip_bad) if val_data else None
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


# ----------------------------------------------------------------------------------------------
# Captioning: BLEU-4 and CIDEr-D as the COCO caption evaluation defines them, and question answering

def ngram_counts(words: list, n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu(cands: list, refs: list, max_n: int = 4) -> float:
    """Corpus BLEU-max_n (Papineni et al., 2002) as COCO computes it: n-gram matches clipped by the
    most any one reference has, summed over the corpus; the brevity penalty against, per caption,
    the reference length closest to the candidate's (the shorter on a tie)."""
    match, total = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for cand, rs in zip(cands, refs):
        c, rs = normalize(cand), [normalize(r) for r in rs]
        cand_len += len(c)
        ref_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            counts = ngram_counts(c, n)
            most = Counter()
            for r in rs:
                most |= ngram_counts(r, n)  # elementwise max over references
            match[n - 1] += sum(min(k, most[g]) for g, k in counts.items())
            total[n - 1] += max(len(c) - n + 1, 0)
    # COCO's scorer adds 1e-15 / 1e-9 so that a zero count gives a tiny score, not an error
    log_p = sum(math.log((m + 1e-15) / (t + 1e-9)) for m, t in zip(match, total)) / max_n
    brevity = 1.0 if cand_len >= ref_len else math.exp(1 - ref_len / max(cand_len, 1e-9))
    return brevity * math.exp(log_p)


def cider_d(cands: list, refs: list, max_n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al., 2015), COCO's definition: the mean over captions of `cider_d_scores`."""
    scores = cider_d_scores(cands, refs, max_n, sigma)
    return sum(scores) / len(scores)


def cider_d_scores(cands: list, refs: list, max_n: int = 4, sigma: float = 6.0) -> list:
    """Each caption's CIDEr-D: per n, TF-IDF vectors of n-gram counts (IDF from the references of
    the whole corpus), the candidate's weights clipped at the reference's, cosine similarity times
    a Gaussian penalty on the length difference; averaged over n and references, times 10."""
    cands = [normalize(c) for c in cands]
    refs = [[normalize(r) for r in rs] for rs in refs]
    doc_freq = Counter()
    for rs in refs:
        doc_freq.update({g for r in rs for n in range(1, max_n + 1) for g in ngram_counts(r, n)})
    log_docs = math.log(float(len(refs)))

    def tfidf(words):
        vecs, norms = [], []
        for n in range(1, max_n + 1):
            v = {g: k * (log_docs - math.log(max(1.0, doc_freq[g]))) for g, k in ngram_counts(words, n).items()}
            vecs.append(v)
            norms.append(math.sqrt(sum(w * w for w in v.values())))
        return vecs, norms

    scores = []
    for c, rs in zip(cands, refs):
        cv, cn = tfidf(c)
        total = 0.0
        for r in rs:
            rv, rn = tfidf(r)
            penalty = math.exp(-((len(c) - len(r)) ** 2) / (2 * sigma ** 2))
            for n in range(max_n):
                dot = sum(min(w, rv[n][g]) * rv[n][g] for g, w in cv[n].items() if g in rv[n])
                if cn[n] and rn[n]:
                    total += dot / (cn[n] * rn[n]) * penalty
        scores.append(10.0 * total / max_n / len(rs))
    return scores


def batched(n: int, batch_size: int):
    return (range(i, min(n, i + batch_size)) for i in range(0, n, batch_size))


@torch.no_grad()
def caption_images(model, tokenizer, images, device, num_beams=1, batch_size=200, max_new_tokens=30) -> list:
    """Generated captions (strings) for (N, 3, S, S) images: the soft prompt, then the begin id."""
    out = []
    for idx in batched(len(images), batch_size):
        start = torch.full((len(idx), 1), tokenizer.bos_id, dtype=torch.long, device=device)
        new = model.generate(images[idx.start:idx.stop].to(device), start, max_new_tokens, num_beams)
        out += [tokenizer.decode(ids) for ids in new]
    return out


@torch.no_grad()
def answer_questions(model, tokenizer, images, captions, questions, device, batch_size=200) -> list:
    """One-word answers: the captioner is prompted, after its soft prompt, with its own caption,
    then "question: ... answer:" (the text format its language model learned), and greedily
    continued."""
    answers = []
    for idx in batched(len(images), batch_size):
        prompts = [qa_text(captions[i], questions[i]) for i in idx]
        ids = tokenizer(prompts)
        # drop the [SEP] and padding after each prompt: group prompts by length so none is padded
        lengths = (ids != tokenizer.pad_id).sum(1) - 1
        for L in lengths.unique().tolist():
            rows = (lengths == L).nonzero().flatten()
            new = model.generate(images[idx.start:idx.stop][rows].to(device), ids[rows, :L].to(device), 3)
            for r, n in zip(rows.tolist(), new):
                answers.append((idx.start + r, tokenizer.decode(n).split()[:1]))
    return [" ".join(a) for _, a in sorted(answers)]


def caption_gallery(dataset, n=None):
    """(images, each image's reference captions) of the first n items."""
    images, captions, owner = load_gallery(dataset, n)
    return images, [[c for c, o in zip(captions, owner.tolist()) if o == i] for i in range(len(images))]


def captioning(model, tokenizer, dataset, device, n=None, num_beams=1, questions=True) -> dict:
    """BLEU-4 and CIDEr-D of generated captions against every reference caption of the first n
    images; on shapes also question-answering exact-match accuracy (one question per image)."""
    images, refs = caption_gallery(dataset, n)
    cands = caption_images(model, tokenizer, images, device, num_beams)
    metrics = dict(bleu4=bleu(cands, refs), cider_d=cider_d(cands, refs))
    if isinstance(dataset, shapes.ShapesVideoDataset):
        metrics.update(motion_accuracy(cands, [dataset.scene(i)[0] for i in range(len(images))]))
    elif questions and hasattr(dataset, "scene"):
        rng = torch.Generator().manual_seed(0)
        qa = [shapes.scene_questions(dataset.scene(i)[0]) for i in range(len(images))]
        picked = [q[torch.randint(len(q), (1,), generator=rng).item()] for q in qa]
        answers = answer_questions(model, tokenizer, images, cands, [q for q, _ in picked], device)
        metrics["vqa_accuracy"] = sum(a == want for a, (_, want) in zip(answers, picked)) / len(picked)
    metrics["examples"] = cands[:3]
    return metrics


def motion_accuracy(cands: list, scenes: list) -> dict:
    """How often a generated caption gives each object of the clip its true motion (the part of
    the caption naming its colour, `shapes.motion_of`, must hold the right motion word; an object not
    named counts as wrong): over all objects (5 choices) and over the moving ones (the direction, 4
    choices: a model that averages frames cannot tell them apart, 25% at best by guessing); and
    the direction in the clips of one moving object, read as the caption's first motion word
    whatever object it names (motion apart from recognising the object); and, for those clips,
    how often each word was said for each true direction (`direction_said`: does a captioner
    know the axis at least, or say one word whatever it sees?)."""
    hits = [h for c, scene in zip(cands, scenes) for h in motion_hits(c, scene)]
    moving = [h for h, m in hits if m]
    single = [d for d in map(one_mover_direction, cands, scenes) if d]  # (true direction, word said)
    said = {d: dict(Counter(w for true, w in single if true == d)) for d in shapes.MOTIONS if d != "still"}
    return dict(motion_accuracy=sum(h for h, _ in hits) / max(1, len(hits)),
                direction_accuracy=sum(moving) / max(1, len(moving)),
                direction_accuracy_one_object=sum(true == w for true, w in single) / max(1, len(single)),
                direction_said=said)


def motion_hits(cand: str, scene: list) -> list:
    """(the caption gives the object its true motion, the object moves) for each object of a clip."""
    return [(shapes.motion_of(cand, o["colour"], o["shape"]) == o["motion"], o["motion"] != "still") for o in scene]


def one_mover_direction(cand: str, scene: list):
    """For a clip of one moving object: (its direction, the caption's first motion word whatever
    colour it names, "none" if it has none); None for any other clip."""
    if len(scene) != 1 or scene[0]["motion"] == "still":
        return None
    return scene[0]["motion"], next((w for w in cand.split() if w in shapes.MOTIONS), "none")


def paired_motion(cands_a: list, cands_b: list, refs: list, scenes: list) -> dict:
    """Two captioners on the same clips: A's motion accuracy, one-mover direction accuracy and
    CIDEr-D minus B's, each with its 95% bootstrap interval over the clips (`paired_interval`; a
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
    return {k: dict(diff=d.mean().item(), interval=paired_interval(d), clips=len(d)) for k, d in diffs.items()}


@torch.no_grad()
def evaluate_captioner(model, tokenizer, device, sets, n=None, num_beams=1, vqa=True) -> dict:
    was_training = model.training
    model.eval()
    metrics = captioning(model, tokenizer, sets[0], device, n, num_beams, vqa)
    if model.temporal is not None:
        metrics["temporal_alpha"] = model.temporal.gates()
    model.train(was_training)
    return metrics


@torch.no_grad()
def continuation_nll(lm, tokenizer, firsts: list, seconds: list, device) -> tuple:
    """(summed negative log-likelihood, token count) of each second text, end id included, read
    after its first text: `shapes.in_context(first, second)` scored on the second's tokens only."""
    ids = tokenizer([shapes.in_context(a, b) for a, b in zip(firsts, seconds)]).to(device)
    begin = (tokenizer(firsts) != tokenizer.pad_id).sum(1).to(device) - 1  # [begin] + the first's words
    logits = lm(ids)[:, :-1]  # position t predicts token t + 1
    targets = ids[:, 1:].masked_fill(ids[:, 1:] == tokenizer.pad_id, -100)
    targets = targets.masked_fill(torch.arange(targets.shape[1], device=device)[None] < begin[:, None] - 1, -100)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100,
                          reduction="sum")
    return nll.item(), (targets != -100).sum().item()


@torch.no_grad()
def evaluate_lm(lm, tokenizer, device, sets, n=None) -> dict:
    """Perplexity of the language model on the test captions (every reference), alone and, to
    see whether it uses its context, after another reference of the same scene (`in_context`)
    and after a reference of the next scene (`other_context`): if the two are equal, the LM
    ignores what its context says, and so will it ignore a soft prompt."""
    gallery = sets[0]
    n = min(n or len(gallery), len(gallery))
    refs = [gallery.captions(i) for i in range(n)]
    captions = [c for caps in refs for c in caps]
    was_training = lm.training
    lm.eval()
    total = count = 0.0
    for idx in batched(len(captions), 500):
        ids = tokenizer([captions[i] for i in idx]).to(device)
        tokens = (ids[:, 1:] != tokenizer.pad_id).sum().item()
        total += lm.loss(ids).item() * tokens
        count += tokens
    out = dict(perplexity=math.exp(total / count))
    if n > 1 and all(len(caps) > 1 for caps in refs):
        seconds = [caps[1] for caps in refs]
        for name, shift in (("in_context", 0), ("other_context", 1)):
            firsts = [refs[(i + shift) % n][0] for i in range(n)]
            sums = [continuation_nll(lm, tokenizer, [firsts[i] for i in idx], [seconds[i] for i in idx], device)
                    for idx in batched(n, 500)]
            out[f"perplexity_{name}"] = math.exp(sum(s for s, _ in sums) / sum(c for _, c in sums))
    lm.train(was_training)
    return out


class StageRecorder(Observed):
    """Records (sizes, sources) each time the wrapped reducer changes the token count."""

    def __init__(self, inner: Reducer):
        super().__init__(inner)
        self.stages = []

    def observe(self, i, hook, before, after):
        if after.x.shape[1] != before.x.shape[1]:
            self.stages.append((after.size, after.source))


def object_coverage(size, source, patch_mask) -> torch.Tensor:
    """(B,) share of object patches held by un-fused tokens. size (B, N), source (B, N, 1+P),
    patch_mask (B, P) bool."""
    held = (source[:, :, 1:] * (size == 1)[..., None]).sum(1) > 0  # (B, P)
    return (held & patch_mask).sum(1) / patch_mask.sum(1).clamp(min=1)


def stage_coverage(model, tokenizer, images, captions, make_reducer, masks, device) -> list:
    """Prune `images` guided by `captions` and return, for each mask batch in `masks` ((B, P) bool),
    its coverage after every stage: a (B, stages) tensor per mask."""
    ids = tokenizer(captions).to(device)
    recorder = StageRecorder(make_reducer(model.text_guidance(model.text(ids))))
    model.visual.forward_tokens(images.to(device), recorder, track_source=True)
    return [torch.stack([object_coverage(s, src, m.to(device)) for s, src in recorder.stages], 1) for m in masks]


@torch.no_grad()
def token_relevance(model, tokenizer, dataset, device, make_reducer, n=500, batch_size=100) -> dict:
    """Mean object coverage after each stage, guided by each image's first caption.
    make_reducer(text_guidance) -> Reducer. Returns {"coverage": [...], "kept": [...]} per stage,
    "kept" being the share of patches held by un-fused tokens (what random pruning would cover)."""
    model.eval()
    coverage, kept = [], []
    for start in range(0, min(n, len(dataset)), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, n, len(dataset)))]
        masks = torch.stack([it["patch_mask"] for it in items])
        c, k = stage_coverage(model, tokenizer, torch.stack([it["image"] for it in items]),
                              [it["captions"][0] for it in items], make_reducer, (masks, torch.ones_like(masks)), device)
        coverage.append(c)
        kept.append(k)
    return dict(coverage=torch.cat(coverage).mean(0).tolist(), kept=torch.cat(kept).mean(0).tolist())


def one_object_captions(dataset, n: int) -> list:
    """(image index, a, b, caption naming object a alone) for the first two objects of every
    scene of two or more among the first n, each object named once: the caption of a scene
    made of that object alone, so it names its size, colour, shape and cell."""
    out = []
    for i in range(min(n, len(dataset))):
        scene = dataset[i]["attributes"]
        if len(scene) >= 2:
            for a, b in ((0, 1), (1, 0)):
                rng = np.random.default_rng([i, a])  # the cell's wording: fixed per image and object
                out.append((i, a, b, shapes.caption_scene([scene[a]], rng, 1)[0]))
    return out


@torch.no_grad()
def text_steering(model, tokenizer, dataset, device, make_reducer, n=500, batch_size=100) -> dict:
    """Does the text choose WHICH object is kept? Each scene of two or more objects is pruned twice,
    guided once by a caption naming its first object alone and once by one naming its second. Per
    stage: the coverage of an object's patches when the caption names it ("named") and when it
    names the other ("unnamed"). Reducers that ignore the text keep the same tokens both times, so
    the two are equal; the gap is how far the text steers."""
    model.eval()
    named, unnamed = [], []
    pairs = one_object_captions(dataset, n)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        items = [dataset[i] for i, _, _, _ in chunk]
        mask_of = lambda k: torch.stack([it["object_patches"][pair[k]] for it, pair in zip(items, chunk)])
        a, b = stage_coverage(model, tokenizer, torch.stack([it["image"] for it in items]), [c for *_, c in chunk],
                              make_reducer, (mask_of(1), mask_of(2)), device)  # the named object, the other
        named.append(a)
        unnamed.append(b)
    # each object appears once in each list (named in one pass, unnamed in the other): the same objects
    return dict(named=torch.cat(named).mean(0).tolist(), unnamed=torch.cat(unnamed).mean(0).tolist(),
                pairs=len(pairs))


class ObjectPrune(ELIP):
    """The control that knows the answer: ELIP's schedule and fusion, each token scored by the share
    of its patches the objects cover (the ground truth `patch_mask` (B, P)), ties broken at random.
    Needs the forward's source tracking."""

    def __init__(self, schedule, num_patches, patch_mask, prop_attn=True, generator=None):
        super().__init__(schedule, num_patches, prop_attn=prop_attn)
        self.patch_mask, self.generator = patch_mask.float(), generator

    def before_block(self, i, tokens, vit):
        if i not in self.stages:
            return tokens
        held = tokens.source[:, 1:, 1:]  # (B, N-1, P)
        score = (held * self.patch_mask[:, None]).sum(-1) / held.sum(-1).clamp(min=1)
        score = score + 1e-3 * torch.rand(score.shape, generator=self.generator).to(score.device)
        self.scores[i] = score
        return self.prune(tokens, score, self.stages[i][1])


def relevance_table(model, tokenizer, dataset, device, n=500, lam=0.8, schedule=None, prop_attn=True,
                    rollout=True) -> dict:
    """Token relevance at one ELIP schedule (default: the authors' scaled to the model's depth) for
    ELIP, ELIP without its text, ELIP scored by the last block's row alone (the papers', when
    `rollout`), ELIP without look-ahead, EViT's scoring (no text, previous block's [CLS]
    attention) and random scores; the fused token's attention as `prop_attn`."""
    reducers = relevance_reducers(model, lam, schedule, prop_attn, rollout)
    return {name: token_relevance(model, tokenizer, dataset, device, make, n) for name, make in reducers.items()}


def steering_table(model, tokenizer, dataset, device, n=500, lam=0.8, schedule=None, prop_attn=True,
                   rollout=True) -> dict:
    """`text_steering` for ELIP and, as the control that must show no gap, ELIP without its text."""
    reducers = relevance_reducers(model, lam, schedule, prop_attn, rollout)
    return {name: text_steering(model, tokenizer, dataset, device, reducers[name], n) for name in ("elip", "elip_no_text")}


def relevance_reducers(model, lam, schedule, prop_attn, rollout) -> dict:
    """name -> make_reducer(text_guidance) for every scoring the relevance tables compare."""
    v = model.cfg.vision
    schedule, P = schedule or scaled_schedule(v.depth), v.num_patches
    generator = torch.Generator().manual_seed(0)
    return {
        "elip": lambda t: ELIP(schedule, P, t, lam, prop_attn=prop_attn, rollout=rollout),
        "elip_no_text": lambda t: ELIP(schedule, P, None, prop_attn=prop_attn, rollout=rollout),  # lambda = 1
        **({"elip_no_rollout": lambda t: ELIP(schedule, P, t, lam, prop_attn=prop_attn)} if rollout else {}),
        "elip_no_lookahead": lambda t: ELIP(schedule, P, t, lam, lookahead=False, prop_attn=prop_attn),
        "evit_scoring": lambda t: ELIP(schedule, P, None, lookahead=False, prop_attn=prop_attn),
        "random": lambda t: RandomPrune(schedule, P, generator, prop_attn=prop_attn),
    }


def shown_scale(key: str) -> int:
    """Metrics are fractions, printed as percentages; perplexities are printed as they are."""
    return 1 if key.startswith("perplexity") else 100


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
    sets = eval_sets(v.image_size, v.patch_size, trained["scene_seed"], args.n_test, args.val_data, args.image_root,
                     args.zeroshot_dir, frames=frames, marker=trained["marker"])
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


def read_curve(path: str, metric: str = "cider_d") -> list:
    """(step, training seconds, metric) of every --eval-every line of a train.py log."""
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"log {path} cannot be read: {e}") from None
    curve = [(r["step"], r["time"], r["curve"][metric]) for r in rows if metric in r.get("curve", {})]
    if not curve:
        raise DataError(f"log {path} has no {metric} curve: train with --eval-every N")
    return curve


def time_to_reach(curve: list, target: float):
    """Training seconds at the first point of the curve at or above target, or None."""
    return next((t for _, t, v in curve if v >= target), None)


def curves_table(paths: list, metric: str = "cider_d") -> str:
    """Markdown: each run's metric along its curve, its final value, and when each run first
    reached the final value of the LAST run given (the reference, e.g. the two-stage baseline)."""
    curves = {p: read_curve(p, metric) for p in paths}
    target = curves[paths[-1]][-1][2]
    lines = [f"| run (log) | {metric} along the curve (step: value) | final | training s | "
             f"s to reach {100 * target:.1f} (last run's final) |", "|---|---|---|---|---|"]
    for p, c in curves.items():
        points = " ".join(f"{s}: {100 * v:.0f}" for s, _, v in c)
        reach = time_to_reach(c, target)
        lines.append(f"| {p} | {points} | {100 * c[-1][2]:.1f} | {c[-1][1]:.0f} | "
                     f"{'never' if reach is None else f'{reach:.0f}'} |")
    return "\n".join(lines)


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
    p.add_argument("--val-data", default="", help="caption file for retrieval (default: the shapes test split)")
    p.add_argument("--image-root", default="", help="folder the caption file's image paths are relative to")
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
