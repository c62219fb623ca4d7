"""
Token relevance: does a reducer keep the patches the caption talks about? For any reducer, after
each stage that changes the token count, the share of the patches covered by the captioned objects
that are still held by kept (un-fused, size-1) tokens (`token_relevance`). Random pruning keeps
that share equal to the share of patches kept; a reducer that keeps what the caption talks about
does better. Text steering (`text_steering`): the same, with a caption that names one object of a
scene of several, against one that names another: whether the text chooses WHICH object is kept.
Measured on the shapes data, whose scenes know which patches each object covers.

Read first: `object_coverage`, then `token_relevance`.
"""
import numpy as np
import torch

import shapes
from elip import ELIP, RandomPrune, scaled_schedule
from vit import Observed, Reducer

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
