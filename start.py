"""
The weights a run starts from, and the check at its end that what was frozen stayed so: the
checkpoint it resumes, --init's model (or a ViT's weights for the image tower), the captioner's
frozen parts, or Patch Ranking's frozen CLIP with the predictor fitted to its golden rankings
(the method's first two phases, run before the loop: ranking.py).

train.py calls `start_model` once prepare.py has read and checked everything and the model is
built, and `check_frozen` when training ends. Read first: `start_model`, then `start_ranking`.
"""
import math
import os
import time

import torch

import ranking
from captioner import Captioner, lm_unchanged, start_captioner
from checkpoint import load_state, save_checkpoint
from model import RankingCLIP
from prepare import scene_seed
from vit import from_timm, resize_pos_embed

PREDICTOR_LR = 1e-3  # the ranking predictor's peak rate (a cosine to zero over --predictor-steps)
SEARCH = dict(k=1, chunk=1, mode="similarity")  # the golden-ranking search as published: one patch at a time


def start_model(cfg, model, ckpt, sources, dataset, rank: int, cosine_lr):
    """The weights a run starts from: its checkpoint to resume, --init's, the captioner's frozen
    parts, or Patch Ranking's frozen CLIP with the predictor fitted to its golden rankings."""
    if isinstance(model, RankingCLIP):
        if not cfg.resume:
            start_ranking(cfg, model, ckpt, dataset, rank, cosine_lr, say=print if rank == 0 else lambda m: None)
        model.freeze_all_but_tokens()
    if ckpt is not None and cfg.resume:
        model.load_state_dict(ckpt["model"])
    elif ckpt is not None and not isinstance(model, RankingCLIP):  # --init: what this model has of it
        mine = model.state_dict()  # objectives it lacks start fresh, those it had and this run drops go
        load_state(model, {**mine, **{k: v for k, v in ckpt["model"].items() if k in mine}}, cfg.init)
    elif isinstance(model, Captioner):
        start_captioner(model, sources)
    elif "vit" in sources:
        start_image_tower(model.visual, sources["vit"], cfg.init)


def start_image_tower(vit, state: dict, path: str):
    """The image tower from a timm ViT's weights (as ALBEF and ELIP start from an ImageNet ViT): its
    position embeddings resized to this run's patch grid, its classifier head left out; a width,
    depth or patch size that does not fit stops with the keys that differ."""
    state = from_timm(state)
    if "pos_embed" in state:
        side = math.isqrt(vit.cfg.num_patches)
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], (side, side))
    load_state(vit, state, path)


def start_ranking(cfg, model: RankingCLIP, init: dict, dataset, rank: int, cosine_lr, say):
    """Load the frozen CLIP, search the golden rankings, fit the predictor; both results are
    cached in --out with what they were made from, so a rerun reuses them. Rank 0 does the work,
    the others read its files (--out must be on a filesystem every node sees)."""
    load_state(model, {**model.state_dict(), **init["model"]}, cfg.init)  # the CLIP; predictor and tokens fresh
    layer = model.rcfg.layer
    images_of = lambda i: dataset[i]["image"]  # the centre crop, normalised
    identity = dict(checkpoint=ranking.file_identity(cfg.init), layer=layer, block=SEARCH["k"], chunk=SEARCH["chunk"],
                    score=SEARCH["mode"], data=cfg.data or "shapes", train_size=cfg.train_size, scenes=scene_seed(cfg, init),
                    **(dict(fuse=True) if model.rcfg.fuse else {}))  # caches of dropping searches predate the key
    n = min(cfg.rank_images, len(dataset))
    cache, pred_path = os.path.join(cfg.out, "rankings.pt"), os.path.join(cfg.out, "predictor.pt")
    pred_identity = dict(identity, images=n, steps=cfg.predictor_steps, loss="listwise", seed=cfg.seed)
    if rank != 0:  # rank 0's files, waited for without a collective (whose timeout the search would outlast)
        wait_for(pred_path, pred_identity)
    else:
        os.makedirs(cfg.out, exist_ok=True)
        golden = ranking.search_cached(model, images_of, n, cache, identity, layer, say=say, fuse=model.rcfg.fuse,
                                       **SEARCH)
        saved = torch.load(pred_path, map_location="cpu", weights_only=True) if os.path.exists(pred_path) else {}
        if saved.get("identity") != pred_identity:
            n_fit = max(1, n - n // 10)  # the last 10% are held out
            torch.manual_seed(cfg.seed)
            ranking.train_predictor(model, model.predictor, images_of, golden[:n_fit], layer, cfg.predictor_steps,
                                    lambda step: cosine_lr(step, cfg.predictor_steps, PREDICTOR_LR), "listwise",
                                    seed=cfg.seed, say=say)
            held = torch.stack([images_of(i) for i in range(n_fit, n)]) if n > n_fit else None
            pruned = model.cfg.vision.num_patches - ranking.keep_count(model.rcfg.keep, model.cfg.vision.num_patches)
            match = ranking.predictor_match(model, model.predictor, held.to(model.learned_tokens.device), golden[n_fit:],
                                            layer, pruned) if held is not None and pruned else float("nan")
            saved = dict(identity=pred_identity, state=model.predictor.state_dict(), top_n_match=match, held_out=n - n_fit)
            save_checkpoint(pred_path, saved)
        say(f"predictor: top-n match with the golden ranking on {saved['held_out']} held-out images "
            f"{100 * saved['top_n_match']:.1f}% (n = the pruned patches)")
    model.predictor.load_state_dict(torch.load(pred_path, map_location="cpu", weights_only=True)["state"])


def wait_for(path: str, identity: dict, poll: float = 5.0):
    """Until `path` holds a file (written atomically) of this identity. If rank 0 fails instead,
    torchrun ends this process."""
    while not (os.path.exists(path) and
               torch.load(path, map_location="cpu", weights_only=True).get("identity") == identity):
        time.sleep(poll)


def clip_unchanged(model: RankingCLIP, init: dict) -> bool:
    """The frozen CLIP inside a Patch Ranking model is bit-identical to its --init checkpoint."""
    state = model.state_dict()
    return all(torch.equal(state[k].cpu(), v.cpu()) for k, v in init["model"].items())


def check_frozen(cfg, model, ckpt, sources):
    """What was meant to stay frozen did (the LM of a captioner, the CLIP of Patch Ranking)."""
    if isinstance(model, Captioner):
        print(f"frozen language model unchanged by training: {'yes' if lm_unchanged(model, sources) else 'NO'}")
        if model.temporal is not None:
            print("temporal gates (alpha per ViT block, 0 at the start): "
                  + " ".join(f"{a:+.3f}" for a in model.temporal.gates()))
    if isinstance(model, RankingCLIP) and cfg.init:
        print(f"frozen CLIP unchanged by training: {'yes' if clip_unchanged(model, ckpt) else 'NO'}", flush=True)
