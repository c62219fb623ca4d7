"""
Captioning metrics: BLEU-4 and CIDEr-D as the COCO caption evaluation defines them (`bleu`,
`cider_d`: read these two for the exact formulas), question answering by prompting the captioner,
the video captioner's motion measures, the language model's perplexity alone and in context, and
(`eval.py --curves`) CIDEr-D learning curves from training logs.

Read first: `bleu`, `cider_d_scores`, then `captioning`.
"""
import json
import math
from collections import Counter

import torch
import torch.nn.functional as F

import shapes
from data import DataError, in_context, load_gallery
from shapes import qa_text
from text import normalize

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
    after its first text: `in_context(first, second)` scored on the second's tokens only."""
    ids = tokenizer([in_context(a, b) for a, b in zip(firsts, seconds)]).to(device)
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


# ----------------------------------------------------------------------------------------------
# Learning curves: CIDEr-D against training time, from the --eval-every lines of train.py logs

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
