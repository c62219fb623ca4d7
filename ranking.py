"""
Patch Ranking: prune a trained, FROZEN CLIP's patch tokens once, at one layer, by a learned ranking.

Paper: "Patch Ranking: Token Pruning as Ranking Prediction for Efficient CLIP" (Wu, Lin, Hu,
Morgado, WACV 2025, arXiv 2409.14607). Three steps, each below:
  1. `golden_ranking`: the best tokens to keep, found by greedy backward elimination — remove the
     candidate (a patch, or a k x k block of patches) whose removal changes the final embedding
     least, a chunk at a time, and read the ranking backwards (last removed = most important).
     Expensive (a partial forward per candidate), so it runs once per training image, offline.
  2. `Predictor`: ~50K parameters that imitate the golden ranking from the tokens entering the
     pruning layer (the CLIP's own early features: inference needs nothing else), trained with a
     listwise KL loss (`listwise_loss`) or a pairwise margin loss.
  3. `RankPrune` (and model.py's `RankingCLIP`): the CLIP with the predictor wired in through the seam (`RankPrune`: run the
     blocks before the pruning layer, score, keep the top 60% of patches in original order, run
     the rest) and a few learnable tokens appended to the pruned sequence, trained with the
     contrastive loss while everything else stays frozen, to win back what pruning lost.

Ours, by flag (`fuse`, train.py's `--rank-fuse`; the paper drops): the patches not kept are
averaged into one token that attends with log(their count) — ELIP's fused token with proportional
attention — in the search as in pruning, so the ranking is found for the pruning it will serve.

Read first: `embed_subsets` (how one image's candidates become one batch), `golden_ranking`, then
`Predictor` and `RankPrune` (model.py's `RankingCLIP` holds them). `train.py --method ranking`
runs the three phases (the first two in start.start_ranking); `search_cached` keeps the
rankings on disk with the identity of the checkpoint they came from.
"""
import hashlib
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from elip import fused_token, prune_and_fuse
from vit import Mlp, Reducer, Tokens, size_bias

SCORE_MODES = ("similarity", "label", "max")


def pruning_layer(depth: int, layer: int = -1) -> int:
    """The block whose INPUT is pruned: the authors' block 3 of 12, scaled to depth (-1), or as given."""
    layer = round(3 * depth / 12) if layer < 0 else layer
    if not 0 <= layer < depth:
        raise ValueError(f"pruning layer {layer} is outside the ViT's blocks 0..{depth - 1}")
    return layer


def keep_count(keep: float, num_patches: int) -> int:
    if not 0 < keep <= 1:
        raise ValueError(f"keep fraction {keep} is outside (0, 1]")
    return max(1, math.floor(keep * num_patches + 0.5))


# ----------------------------------------------------------------------------------------------
# 1. The golden ranking

def candidate_groups(grid: tuple, k: int) -> torch.Tensor:
    """(G, P) bool: which patches each candidate holds — k x k blocks of the patch grid (k = 1:
    single patches; blocks at the right / bottom edge are smaller when k does not divide the grid)."""
    h, w = grid
    rows, cols = torch.arange(h) // k, torch.arange(w) // k
    group = (rows[:, None] * math.ceil(w / k) + cols[None, :]).flatten()  # (P,)
    return F.one_hot(group).T.bool()


@torch.no_grad()
def embed_from(clip: nn.Module, layer: int, x: torch.Tensor, attn_bias=None) -> torch.Tensor:
    """The normalised image embedding after blocks layer.. of the ViT on tokens x (B, N, D)."""
    for block in clip.visual.blocks[layer:]:
        x = block(x, attn_bias)
    return F.normalize(clip.visual_proj(clip.visual.norm(x[:, 0])), dim=-1)


@torch.no_grad()
def embed_subsets(clip: nn.Module, layer: int, x: torch.Tensor, keep: torch.Tensor, max_rows: int = 256,
                  fuse: bool = False) -> torch.Tensor:
    """The embedding of every subset of patches of every image in one batch: x (B, 1+P, D) the
    tokens entering `layer`, keep (B, n, P) bool, n subsets per image. Subsets of different sizes
    are padded and the padding masked out of attention, which equals removing it. With `fuse`
    the removed patches are not dropped but averaged into one token appended at the end, attended
    with log(their count) (as `RankPrune(fuse=True)` prunes). -> (B, n, E)."""
    B, n, P = keep.shape
    keep = keep.reshape(B * n, P)
    counts = keep.sum(1)
    L = int(counts.max())
    idx = (~keep).to(torch.uint8).argsort(dim=1, stable=True)[:, :L]  # (B*n, L): kept patches first, in order
    image = torch.arange(B, device=x.device).repeat_interleave(n)
    out = []
    for s in range(0, B * n, max_rows):
        rows = slice(s, s + max_rows)
        patches = x[:, 1:][image[rows, None], idx[rows]]  # (r, L, D)
        seq = torch.cat([x[image[rows], :1], patches], 1)  # (r, 1+L, D)
        valid = torch.arange(L, device=x.device) < counts[rows, None]  # (r, L)
        logits = torch.zeros(valid.shape[0], 1 + L, dtype=x.dtype, device=x.device)
        logits[:, 1:].masked_fill_(~valid, float("-inf"))  # no query attends to padding
        if fuse:
            removed = (~keep[rows]).to(x.dtype)  # (r, P)
            size = removed.sum(1, keepdim=True)  # (r, 1); 0 (nothing removed): log 0 masks the token out
            fused = fused_token(x[image[rows], 1:], removed)  # (r, 1, D): the plain mean, as RankPrune fuses
            seq, logits = torch.cat([seq, fused], 1), torch.cat([logits, size.log()], 1)  # (r, 2+L, D), (r, 2+L)
        bias = logits[:, None, None, :] if fuse or (counts[rows] < L).any() else None
        out.append(embed_from(clip, layer, seq, bias))
    return torch.cat(out).view(B, n, -1)


def removal_scores(emb, ref, mode="similarity", classes=None, labels=None) -> torch.Tensor:
    """How well each candidate's removal preserves the image (higher = less harmful).
    emb (B, n, E) embeddings without each candidate, ref (B, E) the unpruned embedding;
    classes (C, E) normalised class-text embeddings and labels (B,) for `label`."""
    if mode == "similarity":
        return (emb * ref[:, None]).sum(-1)
    if classes is None or (mode == "label" and labels is None):
        raise ValueError(f"score mode {mode!r} needs the class embeddings" + (" and labels" if mode == "label" else ""))
    target = labels if mode == "label" else (ref @ classes.T).argmax(-1)  # max: the class predicted unpruned
    return (emb * classes[target][:, None]).sum(-1)  # the target class's logit, up to CLIP's scale


@torch.no_grad()
def golden_ranking(clip: nn.Module, x: torch.Tensor, layer: int, grid=None, k: int = 1, chunk: int = 1,
                   mode: str = "similarity", classes=None, labels=None, max_rows: int = 256,
                   fuse: bool = False) -> torch.Tensor:
    """Greedy backward elimination on tokens x (B, 1+P, D) entering block `layer` of a frozen CLIP.
    Each iteration scores every remaining candidate of every image (one batch: `embed_subsets`)
    and removes the `chunk` least harmful, best first. Returns (B, P) patch indices, most
    important first (the reverse of removal; a block's patches in index order)."""
    if mode not in SCORE_MODES:
        raise ValueError(f"score mode {mode!r} is not one of {', '.join(SCORE_MODES)}")
    B, N, _ = x.shape
    P = N - 1
    if grid is None:
        side = math.isqrt(P)
        grid = (side, side) if side * side == P else (1, P)
    if grid[0] * grid[1] != P or (k > 1 and grid[0] == 1):
        raise ValueError(f"{k}x{k} blocks need the patch grid; {P} patches do not make {grid}")
    member = candidate_groups(grid, k).to(x.device)  # (G, P)
    ref = embed_from(clip, layer, x)
    alive = torch.ones(B, member.shape[0], dtype=torch.bool, device=x.device)
    removed = []
    while alive.any():
        cand = alive.nonzero()[:, 1].view(B, -1)  # (B, n): every image has the same number left
        alive_patches = (alive.float() @ member.float()) > 0  # (B, P)
        keep = alive_patches[:, None, :] & ~member[cand]  # (B, n, P): all that is left but candidate j
        scores = removal_scores(embed_subsets(clip, layer, x, keep, max_rows, fuse), ref, mode, classes, labels)
        out = cand.gather(1, scores.topk(min(chunk, cand.shape[1]), dim=1).indices)  # least harmful first
        alive.scatter_(1, out, False)
        removed.append(out)
    order = torch.cat(removed, 1).flip(1)  # (B, G) groups, most important first
    position = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=x.device).expand_as(order))
    group_of_patch = member.float().argmax(0)  # (P,)
    key = position[:, group_of_patch] * P + torch.arange(P, device=x.device)
    return key.argsort(1)


def positions(ranking: torch.Tensor) -> torch.Tensor:
    """(B, P): each patch's place in the ranking (0 = most important)."""
    pos = torch.empty_like(ranking)
    return pos.scatter_(1, ranking, torch.arange(ranking.shape[1], device=ranking.device).expand_as(ranking))


@torch.no_grad()
def layer_input(clip: nn.Module, images: torch.Tensor, layer: int) -> torch.Tensor:
    """The tokens entering block `layer`: (B, 1+P, D)."""
    x = clip.visual.embed(images).x
    for block in clip.visual.blocks[:layer]:
        x = block(x)
    return x


# ----------------------------------------------------------------------------------------------
# The ranking cache: computed once per (checkpoint, settings), resumable, never reused stale

def file_identity(path: str) -> str:
    """sha256 of a file's bytes: which checkpoint a cache was made from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def search_cached(clip: nn.Module, images_of, n: int, cache: str, identity: dict, layer: int, batch_size: int = 16,
                  labels_of=None, say=print, **search) -> torch.Tensor:
    """Golden rankings (n, P) of images_of(i) for i < n (labels_of(i) for the `label` mode),
    cached at `cache` with `identity` (the checkpoint's sha256 and every setting of the search).
    A cache with another identity stops with a message; a partial one (an interrupted search) is
    continued."""
    done = torch.zeros(0, clip.cfg.vision.num_patches, dtype=torch.long)
    if os.path.exists(cache):
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if saved.get("identity") != identity:
            old = saved.get("identity", {})
            diff = [k for k in {**old, **identity} if old.get(k) != identity.get(k)]
            raise ValueError(f"ranking cache {cache} was made with another {', '.join(diff) or 'identity'}: "
                             f"delete it (or point the search elsewhere) to search again")
        done = saved["rankings"]
    if len(done) >= n:
        say(f"golden ranking: all {n} images cached in {cache}")
        return done[:n]
    device = next(clip.parameters()).device
    t0, start, shown = time.time(), len(done), 0.0
    say(f"golden ranking: {start} of {n} images cached, searching the rest")
    while len(done) < n:
        idx = range(len(done), min(n, len(done) + batch_size))
        images = torch.stack([images_of(i) for i in idx]).to(device)
        labels = torch.tensor([labels_of(i) for i in idx], device=device) if labels_of else None
        rank = golden_ranking(clip, layer_input(clip, images, layer), layer, labels=labels, **search)
        done = torch.cat([done, rank.cpu()])
        tmp = cache + ".tmp"
        torch.save(dict(identity=identity, rankings=done), tmp)
        os.replace(tmp, cache)  # a crash leaves the previous batch's cache, never a torn file
        if time.time() - shown > 30 or len(done) >= n:  # a line every half minute, and the last
            shown = time.time()
            say(f"golden ranking: {len(done)}/{n} images, {(len(done) - start) / (shown - t0):.2f} images/s")
    return done


# ----------------------------------------------------------------------------------------------
# 2. The predictor and its losses

class MixerBlock(nn.Module):
    """One MLP-Mixer block: an MLP across the tokens, then one across the channels, pre-norm."""

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = Mlp(tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = Mlp(dim, channel_hidden)

    def forward(self, x):  # (B, P, dim)
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Predictor(nn.Module):
    """Per-patch importance from the patch tokens entering the pruning layer (B, P, width):
    channels average-pooled to `dim`, one Mixer block, a Linear to one score per patch."""

    def __init__(self, width: int, num_patches: int, dim: int = 64):
        super().__init__()
        self.dim = min(dim, width)
        self.mixer = MixerBlock(num_patches, self.dim, max(1, num_patches // 2), 2 * self.dim)
        self.norm = nn.LayerNorm(self.dim)
        self.head = nn.Linear(self.dim, 1)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool1d(patches.float(), self.dim)  # (B, P, dim): the channel pooling
        return self.head(self.norm(self.mixer(x))).squeeze(-1)  # (B, P)


def listwise_loss(scores: torch.Tensor, ranking: torch.Tensor, temperature: float = 0.3) -> torch.Tensor:
    """KL(target || softmax(scores)) with the target a softmax over the golden places: the most
    important patch gets logit 0, the least -1/temperature, linearly in between. KL weighs each
    patch by its target probability, so a sharp target (small temperature) all but ignores the
    order among the least important — the very patches pruning removes; 0.3 keeps them weighed."""
    P = ranking.shape[1]
    target = F.softmax(-positions(ranking).float() / max(P - 1, 1) / temperature, dim=1)
    return F.kl_div(F.log_softmax(scores.float(), dim=1), target, reduction="batchmean")


def pairwise_loss(scores: torch.Tensor, ranking: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Margin ranking loss over every ordered pair: a more important patch must score `margin` higher."""
    pos = positions(ranking)
    above = pos[:, :, None] < pos[:, None, :]  # (B, P, P): i ranks above j
    gap = scores[:, :, None] - scores[:, None, :]
    return F.relu(margin - gap)[above].mean()


def top_n_match(scores: torch.Tensor, ranking: torch.Tensor, n: int) -> float:
    """The share of the golden n least important patches that the scores also put in their bottom n."""
    predicted = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(n, 1, largest=False).indices, True)
    golden = torch.zeros_like(predicted).scatter_(1, ranking[:, -n:], True)
    return (predicted & golden).sum().item() / (n * len(scores))


def train_predictor(clip: nn.Module, predictor: Predictor, images_of, rankings: torch.Tensor, layer: int, steps: int,
                    lr_at, loss: str = "listwise", batch_size: int = 64, seed: int = 0, say=print):
    """Fit the predictor to the golden rankings of images_of(i), i < len(rankings), from the frozen
    CLIP's tokens entering `layer` (computed once: the CLIP never changes), at rate lr_at(step)."""
    if loss not in ("listwise", "pairwise"):
        raise ValueError(f"predictor loss {loss!r} is not listwise or pairwise")
    device = next(predictor.parameters()).device
    feats = torch.cat([layer_input(clip, torch.stack([images_of(i) for i in range(s, min(s + 64, len(rankings)))])
                                   .to(device), layer)[:, 1:].float() for s in range(0, len(rankings), 64)])
    rankings = rankings.to(device)
    objective = listwise_loss if loss == "listwise" else pairwise_loss
    opt = torch.optim.AdamW(predictor.parameters(), lr=lr_at(0), weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    predictor.train()
    for step in range(steps):
        idx = torch.randint(len(rankings), (min(batch_size, len(rankings)),), generator=gen).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        value = objective(predictor(feats[idx]), rankings[idx])
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if (step + 1) % max(1, steps // 5) == 0:
            say(f"predictor step {step + 1}/{steps}: {loss} loss {value.item():.4f}")
    return predictor.eval()


@torch.no_grad()
def predictor_match(clip: nn.Module, predictor: Predictor, images: torch.Tensor, rankings: torch.Tensor, layer: int,
                    n: int) -> float:
    """Top-n match of the predictor with the golden rankings of these images."""
    return top_n_match(predictor(layer_input(clip, images, layer)[:, 1:]), rankings.to(images.device), n)


# ----------------------------------------------------------------------------------------------
# 3. Pruning through the seam, and the learnable tokens

class RankPrune(Reducer):
    """At the input of block `layer`: score the patches (`scorer(x, vit)` -> (B, P), higher =
    keep), keep [CLS] and the top `keep` patches in original order, append `extra` tokens (the
    learnable ones: they hold no patch). `fuse` (ours; the paper drops): the other patches are
    averaged into one token that attends with log(their count), as ELIP's fused token does here."""

    def __init__(self, layer: int, keep: int, scorer, extra=None, fuse: bool = False):
        self.layer, self.keep, self.scorer, self.extra, self.fuse = layer, keep, scorer, extra, fuse

    def attn_bias(self, tokens):
        # from the pruning layer on (the sequence has its pruned length); before it all sizes are 1
        pruned_length = 1 + self.keep + 1 + (0 if self.extra is None else self.extra.shape[0])
        return size_bias(tokens.size) if self.fuse and tokens.size.shape[1] == pruned_length else None

    def before_block(self, i, tokens, vit):
        if i != self.layer:
            return tokens
        B = tokens.x.shape[0]
        top = self.scorer(tokens.x, vit).topk(self.keep, dim=1).indices.sort(1).values  # (B, K)
        if self.fuse:  # scores 2 for the kept, 1 for the rest: the same top-K, a plain mean for the fused one
            kept = prune_and_fuse(tokens, torch.ones(B, tokens.x.shape[1] - 1, device=top.device).scatter(1, top, 2.0),
                                  self.keep)
        else:
            kept = tokens.gather(torch.cat([top.new_zeros(B, 1), top + 1], 1))
        if self.extra is None:
            return kept
        n = self.extra.shape[0]
        source = None if kept.source is None else torch.cat([kept.source, kept.source.new_zeros(B, n, kept.source.shape[2])], 1)
        return Tokens(torch.cat([kept.x, self.extra.to(kept.x.dtype).expand(B, -1, -1)], 1),
                      torch.cat([kept.size, kept.size.new_ones(B, n)], 1), source)


def random_scorer(generator=None):
    return lambda x, vit: torch.rand(x.shape[0], x.shape[1] - 1, generator=generator).to(x.device)


def cls_attention_scorer(layer: int):
    """EViT's criterion at the pruning layer: the [CLS] attention of the pruning block on its input."""
    return lambda x, vit: vit.blocks[layer].cls_attention(x)[:, 1:]


def golden_scorer(clip: nn.Module, layer: int, **search):
    """The oracle: the golden ranking of each image, searched on the spot."""
    return lambda x, vit: -positions(golden_ranking(clip, x, layer, **search)).float()
