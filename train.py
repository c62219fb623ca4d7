"""
The one training loop: `python train.py` on a CPU or one GPU, `torchrun --nproc_per_node=N
train.py` for DDP (NCCL on CUDA, gloo on CPU) — the same code.

Read first: `TrainConfig` (every field is a flag), `micro_batch_keys` (the seeded, rank-aware
data order that makes resumes and DDP runs reproducible), `train_step`, then the loop in `train`.
What a run is built from (data, tokenizer, model config) is prepare.py's; its starting weights start.py's.

A step: `accum` micro-batches of `batch_size` pairs per process; the losses are those of the
global micro-batch (model.py gathers features across processes), gradients are averaged over
processes (DDP) and summed over micro-batches (divided by `accum`); then gradient clipping, AdamW
and the warm-up + cosine learning rate. Everything random derives from (seed, stream position)
or (seed, step): the data order, the caption picked, the crop, the masks. So a resumed run, or
one on another number of processes with the same global batch, trains the same.
"""
import argparse
import inspect
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import eval as evaluation
from checkpoint import BEFORE_FIELD, ReducerConfig, build_model, kind_of, make_reducer, save_checkpoint, saved_flags
from data import DataError, Pairs, loader_workers, normalize, pixel_stats
from elip import EVIT_KEEP_WARMUP
from vit import set_grad_checkpointing
from prepare import apply_recipe, describe, prepare, same_data_everywhere
from start import check_frozen, start_model

RANKING_LR = 3e-2  # Patch Ranking's tokens alone train: at 1e-3 they barely move in 300 steps; 1e-1 overshoots
BETAS = (0.9, 0.98)  # AdamW's; CLIP's second-moment decay
MIN_LR = 1e-5  # where the cosine ends
CURVE_IMAGES = 500  # test images of each --eval-every point (at most --test-size)


@dataclass
class TrainConfig(ReducerConfig):
    """Every field is a flag; the method's reduction settings come first (checkpoint.ReducerConfig)."""
    # CLIP's objectives
    objectives: str = "auto"  # comma-separated itc,itm,mlm; auto: itc for none, all three otherwise
    # Patch Ranking (--method ranking --init CLIP): golden-ranking search -> predictor -> learnable tokens (--steps)
    rank_layer: int = -1  # the block whose input is pruned; -1: the authors' 3 of 12, scaled to depth
    rank_keep: float = 0.6  # share of the patch tokens kept
    rank_images: int = 500  # training images searched (cached in --out); the last 10% measure the predictor's top-n match
    predictor_steps: int = 400  # training steps of the ranking predictor
    rank_fuse: bool = False  # ours: fuse the pruned patches into one token (proportional attention); the paper drops them
    # captioning (EVLGen): --method lm makes the frozen language model, --method evlgen trains on it
    lm: str = ""  # checkpoint of --method lm: the frozen language model (and the vocabulary)
    clip: str = ""  # checkpoint of a CLIP (--method none): its ViT, frozen, and its text blocks start the bridge
    bridge: str = "merge"  # merge: EVLGen's merging encoder; query: BLIP-2's learned queries
    bridge_r: int = 16  # tokens merged in each bridge layer (capped); 0: every visual token reaches the LM
    bridge_merge: str = "mean"  # mean: the plain mean, as published; wavg (ours): ToMe's size-weighted mean with proportional attention
    bridge_pos: bool = False  # ours: a learned position embedding on the merging bridge's visual tokens
    stage1_steps: int = 0  # --bridge query: BLIP-2's first stage (ITC + ITM) for this many steps before --steps of LM loss
    eval_every: int = 0  # CIDEr-D on the first CURVE_IMAGES test images every N steps (the learning curve)
    # video (--method lm / evlgen): clips of --frames frames, shapes videos or clip folders with --data
    video: bool = False  # caption video clips instead of images
    frames: int = 4  # frames per clip
    temporal: bool = True  # EVLGen's temporal contextualizer in the ViT; off: frames averaged only
    frame_embed: bool = False  # ours: a frame-index embedding in the contextualizer (as published it is blind to frame order)
    temporal_lr_scale: float = 1.0  # ours: the contextualizer's learning rate = this x --lr (its gradients start at zero)
    # run
    out: str = "out"  # folder for ckpt.pt and log.jsonl
    overwrite: bool = False  # replace an existing checkpoint in --out
    resume: bool = False  # continue from --out/ckpt.pt
    init: str = ""  # start from this checkpoint's model, weights and vocabulary (fresh optimizer, step 0), or from a timm ViT's weights for the image tower
    # data: the embedded shapes by default, else a caption file (json / csv / tsv) or WebDataset shards
    data: str = ""  # caption file (ALBEF/BLIP json, COCO captions json, csv, tsv) or WebDataset shards ('dir/{00000..00099}.tar'); empty: the shapes
    image_root: str = ""  # folder the caption file's image paths are relative to
    csv_img_key: str = ""  # a CSV/TSV with a header: the image column's name (open_clip's flag); empty: the first column
    csv_caption_key: str = ""  # ...and the caption column's; empty: the second
    val_data: str = ""  # caption file for retrieval at the end (real data); shapes use their test split
    zeroshot_dir: str = ""  # class-per-folder tree for zero-shot at the end
    skip_bad: bool = False  # skip missing / unreadable images (and count them) instead of stopping
    train_size: int = 20000  # shapes scenes in the training set
    test_size: int = 1000  # images in the retrieval gallery
    workers: int = -1  # DataLoader worker processes; -1: on CUDA a share of the CPUs per GPU (up to 8), on the CPU none
    # model
    recipe: str = ""  # clip_b16: the sizes, objective and optimiser settings of a ViT-B/16 CLIP (prepare.RECIPES); flags given win
    bpe: str = ""  # CLIP's BPE vocabulary file (bpe_simple_vocab_16e6.txt.gz): its tokenizer and text tower (causal, pooled at end-of-text); empty: words of the captions
    vit: str = "tiny64"  # the ViT's preset: tiny64, vit_ti16, vit_s16, vit_b16
    model_kwargs: str = ""  # sizes as name=value, comma-separated (prepare.SIZES): width, depth, heads, image_size, patch_size, text_width, text_depth, text_heads, context_length, embed_dim, lm_width, lm_depth, lm_heads, lm_context
    # optimisation
    steps: int = 450  # optimizer steps
    batch_size: int = 128  # per process and micro-batch (as open_clip and nanoGPT count it)
    accum: int = 1  # micro-batches per optimizer step
    lr: float = 0.0  # peak learning rate; 0: 1e-3, or RANKING_LR for --method ranking
    warmup: int = 50  # steps of linear warm-up
    weight_decay: float = 0.1  # AdamW's, on the linear layers' weight matrices only
    grad_clip: float = 1.0  # 0: off
    grad_checkpointing: bool = False  # recompute each block's MLP half in the backward pass (less memory, ~1/4 more compute)
    compile: bool = False  # torch.compile the model (fastest where shapes repeat: fixed caption length, a reducer's fixed counts)
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU), bf16, fp16 (with a GradScaler), off
    seed: int = 0  # the initialisation, the data order and the shapes scenes (Patch Ranking: its CLIP's scenes)
    # bookkeeping
    device: str = "auto"  # auto (cuda if there is one), cuda, cpu
    ckpt_every: int = 0  # 0: only at the end
    stop_after: int = 0  # end this run after N steps, as a job time limit would (the schedule still follows --steps)
    log_every: int = 10  # steps between log lines (and the losses' read-back)
    eval: bool = True  # evaluate at the end

    def __post_init__(self):
        if self.lr == 0:
            self.lr = RANKING_LR if self.method == "ranking" else 1e-3

    @classmethod
    def from_checkpoint(cls, ckpt: dict, **overrides) -> "TrainConfig":
        """The config a checkpoint was trained with (flags added since keep their defaults, or what
        the code did before them: BEFORE_FIELD; flags since removed are dropped)."""
        saved = {k: v for k, v in saved_flags(ckpt["config"]).items() if k in cls.__dataclass_fields__}
        return cls(**{**BEFORE_FIELD, **saved, **overrides})


def field_docs(*classes) -> dict:
    """{field: (group, help)} read from the config classes' source: a `# heading` line opens a group
    of flags, the comment after a field is its help. The comments stay the one place they are written."""
    docs = {}
    for cls in classes:
        group = (cls.__doc__ or cls.__name__).split(";")[0].strip()
        for line in inspect.getsource(cls).splitlines():
            heading = re.match(r"    # (.+)", line)
            field_line = re.match(r"    (\w+): \w+ = [^#]*(?:#\s*(.*))?$", line)
            if heading:
                group = heading.group(1)
            elif field_line:
                docs[field_line.group(1)] = (group, field_line.group(2) or "")
    return docs


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description="Train a CLIP (with a token-reduction --method), the language model or "
                                            "the captioner, on the shapes data or your own captions.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups, docs = {}, field_docs(ReducerConfig, TrainConfig)
    for f in fields(TrainConfig):
        group_name, help_text = docs[f.name][0], docs[f.name][1].replace("%", "%%")  # argparse formats help with %
        group = groups.setdefault(group_name, p.add_argument_group(group_name))
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            group.add_argument(flag, type=kind, default=f.default, help=help_text)
    argv = sys.argv[1:] if argv is None else argv
    given = {a[2:].split("=")[0].replace("-", "_").removeprefix("no_") for a in argv if a.startswith("--")}
    try:
        return TrainConfig(**apply_recipe(vars(p.parse_args(argv)), given))
    except ValueError as e:
        p.error(str(e))


# ----------------------------------------------------------------------------------------------
# Distributed setup

def setup_distributed(device_flag: str):
    """(rank, world size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python does not."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and device_flag in ("auto", "cuda")
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu") if device_flag == "auto" or cuda else torch.device(device_flag)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":  # share the cores instead of every process taking all of them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return rank, world, device


# ----------------------------------------------------------------------------------------------
# Data order

class EpochPermutations:
    """An endless stream of dataset indices: epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.cache = n, seed, {}

    def __getitem__(self, pos: int) -> int:
        epoch = pos // self.n
        if epoch not in self.cache:
            self.cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self.cache[epoch][pos % self.n])


def micro_batch_keys(stream: EpochPermutations, micro: int, batch_size: int, rank: int, world: int) -> list:
    """The (index, stream position) pairs this rank trains on at global micro-step `micro`.
    The global micro-batch is a contiguous run of the stream and rank r takes its r-th slice, so
    one process with the same global batch sees exactly the same pairs, in the same order."""
    start = (micro * world + rank) * batch_size
    return [(stream[p], p) for p in range(start, start + batch_size)]


class MicroBatches(torch.utils.data.Sampler):
    """This rank's keys of the global micro-steps first..last - 1, one list per micro-batch."""
    def __init__(self, stream, first_micro, last_micro, batch_size, rank, world):
        self.stream, self.args, self.micros = stream, (batch_size, rank, world), range(first_micro, last_micro)

    def __iter__(self):
        return (micro_batch_keys(self.stream, m, *self.args) for m in self.micros)

    def __len__(self):
        return len(self.micros)


# ----------------------------------------------------------------------------------------------
# Optimisation

def cosine_lr(step: int, steps: int, lr: float, min_lr: float = 0.0, warmup: int = 0) -> float:
    """Linear warm-up to lr over `warmup` steps, then cosine decay to min_lr at step `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_at(step: int, cfg: "TrainConfig") -> float:
    """The run's schedule. With --stage1-steps each stage has its own warm-up and decay (BLIP-2
    trains its stages as two runs)."""
    steps = cfg.steps
    if cfg.stage1_steps:
        steps = cfg.stage1_steps if step < cfg.stage1_steps else cfg.steps
        step = step if step < cfg.stage1_steps else step - cfg.stage1_steps
    return cosine_lr(step, steps, cfg.lr, MIN_LR, cfg.warmup)


def param_groups(model, weight_decay: float, temporal_lr_scale: float = 1.0) -> list:
    """Weight decay on linear layers' weight matrices only. Our rule exempts tensors of < 2 dims and
    every "*embed*" / "*token*" (timm exempts 1-dim tensors, pos_embed, cls_token; open_clip 1-dim
    tensors). The video contextualizer gets groups of its own, their learning rate scaled."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embed" in name or "token" in name or "logit_scale" in name
        scale = temporal_lr_scale if name.startswith("temporal.") else 1.0
        groups.setdefault((exempt, scale), []).append(p)
    return [dict(params=ps, weight_decay=0.0 if exempt else weight_decay, lr_scale=scale)
            for (exempt, scale), ps in sorted(groups.items())]


def amp_settings(amp: str, device: torch.device):
    """(autocast context factory, GradScaler or None)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return nullcontext, None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def open_log(path: str, step: int):
    """The JSONL log, for appending after `step`: lines a crashed run wrote past its last
    checkpoint are dropped, so a resumed log has each step once."""
    kept = []
    if step and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    log = open(path, "w")
    log.writelines(kept)
    return log


def global_mean(values: dict, world: int) -> dict:
    """The mean over processes of each value, tensors on the model's device (a NCCL group's) -> floats."""
    t = torch.stack([v.float() for v in values.values()])
    if world > 1:
        dist.all_reduce(t)
        t = t / world
    return dict(zip(values, t.tolist()))


def reducer_fn(cfg: TrainConfig, vision, step: int, training: bool = True):
    """The method's reducer for one step, as a function of the text guidance (None: no text):
    checkpoint.make_reducer, with EViT's pruned share growing from 0 over its first
    EVIT_KEEP_WARMUP of the steps, as published. Past cfg.steps: the reduction as trained."""
    warm = EVIT_KEEP_WARMUP * cfg.steps if cfg.method == "evit" else 0
    keep_scale = min(1.0, (step + 1) / warm) if training and warm > 0 else 1.0
    return make_reducer(cfg, vision, keep_scale, guided=training)


def train_step(cfg, step, ddp_model, model, optimizer, scaler, autocast, batches, device, stats, world, make_reducer):
    """One optimizer step over `accum` micro-batches; returns (mean losses, images skipped)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg) * group.get("lr_scale", 1.0)  # checkpoints before the scale: 1
    losses, skipped = {}, 0
    for micro in range(cfg.accum):
        images, ids, bad = next(batches)
        skipped += bad
        images, ids = images.to(device, non_blocking=True), ids.to(device, non_blocking=True)
        if images.dtype == torch.uint8:  # normalised here, on the device: a quarter of the bytes travel
            images = normalize(images, stats)
        # MLM masks and ITM negatives: drawn on the device for the global micro-batch (each rank
        # keeps its rows'), seeded by (seed, micro-step), so resumes and any number of ranks replay them
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step * cfg.accum + micro)
        sync = micro == cfg.accum - 1 or world == 1  # DDP all-reduces gradients on the last micro-batch only
        with (nullcontext() if sync else ddp_model.no_sync()), autocast():
            out = ddp_model(images, ids, make_reducer, generator)
        loss = out["loss"] / cfg.accum
        (scaler.scale(loss) if scaler else loss).backward()
        for k, v in out.items():  # kept on the device: read back on logging steps only
            losses[k] = losses.get(k, 0.0) + v.detach() / cfg.accum
    if scaler:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses, skipped


def train(cfg: TrainConfig) -> dict:
    rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    try:
        dataset, tokenizer, mcfg, ckpt, eval_sets, sources = prepare(cfg, rank)
        same_data_everywhere(dataset, world)
        torch.manual_seed(cfg.seed)
        model = build_model(mcfg).to(device)
        start_model(cfg, model, ckpt, sources, dataset, rank, cosine_lr)
    except (DataError, ValueError) as e:  # bad flags, data or checkpoints; a stale ranking cache
        sys.exit(f"error: {e}" if master else 2)  # every rank stops; one says why
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.temporal_lr_scale), lr=cfg.lr,
                                  betas=BETAS, fused=device.type == "cuda")
    autocast, scaler = amp_settings(cfg.amp, device)
    step = 0
    if cfg.resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
    two_stage = getattr(mcfg, "stage1", False)  # each stage leaves the other's heads without gradients
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=two_stage) if world > 1 else model
    set_grad_checkpointing(model, cfg.grad_checkpointing)
    ddp_model = torch.compile(ddp_model) if cfg.compile else ddp_model

    # the data: global micro-step m is the m-th contiguous run of the seeded stream, split over ranks
    total = cfg.stage1_steps + cfg.steps
    pairs = Pairs(dataset, tokenizer, cfg.seed, images=cfg.method != "lm", context=True)
    sampler = MicroBatches(EpochPermutations(len(dataset), cfg.seed), step * cfg.accum, total * cfg.accum,
                           cfg.batch_size, rank, world)
    workers = cfg.workers if cfg.workers >= 0 else loader_workers(device)
    loader = torch.utils.data.DataLoader(pairs, batch_sampler=sampler, collate_fn=pairs.collate, num_workers=workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    if master:
        os.makedirs(cfg.out, exist_ok=True)
        describe(cfg, model, dataset, world, device)
    log = open_log(os.path.join(cfg.out, "log.jsonl"), step) if master else None

    def checkpoint():
        if master:
            save_checkpoint(os.path.join(cfg.out, "ckpt.pt"), dict(
                kind=kind_of(mcfg), config=asdict(cfg), model_config=asdict(mcfg), model=model.state_dict(),
                optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler else None,
                step=step, tokenizer=tokenizer.state_dict(), train_seconds=train_seconds,
                scenes=getattr(dataset, "seed", None)))  # the shapes scenes' seed

    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, disable=not master, dynamic_ncols=True)
    # train_seconds: wall-clock of training alone (evaluations excluded), carried across resumes
    train_seconds = ckpt.get("train_seconds", 0.0) if cfg.resume else 0.0
    batches, skipped, t_log, n_log = iter(loader), 0, time.time(), 0
    stats = pixel_stats(device)
    model.train()
    last = min(total, step + cfg.stop_after) if cfg.stop_after else total
    while step < last:
        if two_stage:
            model.stage = 1 if step < cfg.stage1_steps else 2
        t0 = time.time()
        losses, bad = train_step(cfg, step, ddp_model, model, optimizer, scaler, autocast, batches, device,
                                 stats, world, reducer_fn(cfg, getattr(mcfg, "vision", None), step))
        train_seconds += time.time() - t0
        skipped += bad
        step += 1
        n_log += cfg.batch_size * cfg.accum * world
        bar.update(1)
        # log: the losses averaged over ranks (a collective: every rank takes part), speed since the last line
        if step % cfg.log_every == 0 or step == last:
            losses = global_mean(losses, world)
            if master:
                speed = n_log / (time.time() - t_log)
                bar.set_postfix(loss=f"{losses['loss']:.3f}", img_s=f"{speed:.0f}")
                log.write(json.dumps(dict(step=step, lr=lr_at(step - 1, cfg), img_per_s=speed,
                                          time=train_seconds, **losses)) + "\n")
                log.flush()
        # the captioner's learning curve, outside the timed training: every rank computes the point
        # (the same one), so none waits in a collective while rank 0 evaluates
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
            curve = evaluation.evaluate_model(model, tokenizer, device, eval_sets, min(cfg.test_size, CURVE_IMAGES), curve=True)
            if master:
                log.write(json.dumps(dict(step=step, time=train_seconds, curve=curve)) + "\n")
                log.flush()
        if step % cfg.log_every == 0 or step == last or (cfg.eval_every and step % cfg.eval_every == 0):
            t_log, n_log = time.time(), 0
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < last:
            checkpoint()
    bar.close()
    checkpoint()
    if world > 1:  # the last collective: from here rank 0 evaluates alone and no rank waits on it
        skipped = int(global_mean(dict(n=torch.tensor(float(skipped), device=device)), world)["n"] * world)
        dist.destroy_process_group()
    metrics = {}
    if master:
        check_frozen(cfg, model, ckpt, sources)
        if cfg.eval and step == total:
            metrics = evaluation.evaluate_model(model, tokenizer, device, eval_sets, cfg.test_size)
            log.write(json.dumps(dict(step=step, time=train_seconds, eval=metrics)) + "\n")
        log.close()
        note = f" | {skipped} unreadable image(s) skipped" if skipped else ""
        if step < total:
            note += f" | stopped before step {total}: continue with --resume"
        print(f"results: method {cfg.method} | step {step} | {train_seconds / 60:.1f} min training | "
              f"{evaluation.headline(metrics)}{note}", flush=True)
    return metrics


def leave_without_teardown():
    """End a torchrun process, skipping the C++ teardown where gloo now and then aborts (SIGABRT)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv=None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        leave_without_teardown()
