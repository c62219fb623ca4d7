"""
The one training loop: `python train.py` on a CPU or one GPU, `torchrun --nproc_per_node=N
train.py` for DDP (NCCL on CUDA, gloo on CPU) — the same code.

Read first: `TrainConfig` (every field is a command-line flag), then `micro_batch_keys` (the
seeded, rank-aware data order that makes resumes and DDP runs reproducible), then `train`.

What happens in a step: `accum` micro-batches of `batch_size` pairs per process; under DDP the
contrastive loss of each micro-batch is computed over the global micro-batch (model.py), and
gradients are averaged over processes (DDP) and summed over micro-batches (divided by `accum`);
then gradient clipping, AdamW, and the warm-up + cosine learning rate of the next step.
Note: with accum > 1 a micro-batch's contrastive negatives are its own global micro-batch only.

What a run trains (`--method`): a CLIP, with no reduction or with ELIP / EViT / ToMe reducing its
vision tokens; `lm`, the small language model on caption text alone; `evlgen`, the captioner on
that FROZEN language model (model.py), whose bridge merges tokens (EVLGen) or uses learned queries
(BLIP-2; `--stage1-steps` first trains them BLIP-2's way, ITC + ITM, before the LM loss);
`ranking`, Patch Ranking on the frozen CLIP of `--init`: `start_ranking` searches the golden
rankings and fits the predictor, then the loop trains the learnable tokens alone.

Everything random derives from (seed, stream position) or (seed, step): the data order, the
caption picked for an image, the crop. So a resumed run continues exactly where it stopped.
"""
import argparse
import dataclasses
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

import data
import shapes
import eval as evaluation
import captioning
import ranking
from captioner import Captioner, CaptionerConfig, LanguageModel, check_vocabularies, lm_unchanged, start_captioner
from checkpoint import (BEFORE_FIELD, ReducerConfig, build_model, elip_schedule, kind_of, load_state, make_reducer,
                        read_checkpoint, save_checkpoint, tome_schedule)
from data import DataError
from elip import EVIT_KEEP_WARMUP
from merge import MERGE_MODES, merge_schedule
from model import CLIPConfig, RankingCLIP, RankingConfig
from text import LMConfig, TextConfig, Tokenizer
from vit import vit_config

METHODS = ("none", "elip", "evit", "tome", "lm", "evlgen", "ranking")  # CLIP with a reducer; the LM; the captioner; Patch Ranking


# Patch Ranking trains only its learnable tokens: prompt tuning wants a rate far above a whole
# model's. At 1e-3 the tokens barely leave their random start in 300 steps and cost accuracy;
# 1e-1 overshoots.
RANKING_LR = 3e-2
PREDICTOR_LR = 1e-3  # the ranking predictor's peak rate (a cosine to zero over --predictor-steps)


@dataclass
class TrainConfig(ReducerConfig):
    """Every field is a flag; the method's reduction settings come first (checkpoint.ReducerConfig)."""
    # the CLIP's objectives, and when it prunes
    objectives: str = "auto"  # comma-separated itc,itm,mlm; auto: itc for none, all three otherwise
    keep_warmup: float = -1.0  # share of the steps over which the pruned share grows from 0; -1: as published (evit 0.1, elip 0)
    prune_until: float = 1.0  # share of the steps trained pruned; the rest see all tokens (the authors' fine-tuning)
    # Patch Ranking (--method ranking --init CLIP): golden-ranking search -> predictor -> learnable tokens (--steps)
    phase: str = "all"  # all, or stop after search / predictor; each phase reuses what is cached in --out
    rank_layer: int = -1  # the block whose input is pruned; -1: the authors' 3 of 12, scaled to depth
    rank_keep: float = 0.6  # share of the patch tokens kept
    rank_block: int = 1  # the search's candidates: k x k blocks of patches
    rank_chunk: int = 1  # candidates the search removes per iteration: 1 is the exact greedy rule; more is faster and coarser
    rank_score: str = "similarity"  # the search's score: similarity (cosine to the unpruned embedding) or max (the predicted class's logit)
    rank_images: int = 500  # training images searched; the last 10% measure the predictor's top-n match
    rank_cache: str = ""  # the golden rankings' file; default --out/rankings.pt (runs of one CLIP can share it)
    predictor_steps: int = 400  # training steps of the ranking predictor
    predictor_loss: str = "listwise"  # listwise (KL) or pairwise (margin)
    num_tokens: int = 4  # learnable tokens appended after pruning, trained for --steps (0: none)
    rank_fuse: bool = False  # ours: fuse the pruned patches into one token (proportional attention); the paper drops them
    # captioning (EVLGen): --method lm makes the frozen language model, --method evlgen trains on it
    lm: str = ""  # checkpoint of --method lm: the frozen language model (and the vocabulary)
    clip: str = ""  # checkpoint of a CLIP (--method none): its ViT, frozen, and its text blocks start the bridge
    bridge: str = "merge"  # merge: EVLGen's merging encoder; query: BLIP-2's learned queries
    bridge_r: int = 16  # tokens merged in each bridge layer (capped); 0: every visual token reaches the LM
    bridge_merge: str = "mean"  # mean: the plain mean, as published; wavg (ours): ToMe's size-weighted mean with proportional attention
    bridge_depth: int = 0  # 0: the text encoder's depth
    bridge_pos: bool = False  # ours: a learned position embedding on the merging bridge's visual tokens (video: docs/RESULTS.md)
    num_queries: int = 32  # --bridge query: learned queries (= tokens into the LM)
    stage1_steps: int = 0  # --bridge query: BLIP-2's first stage (ITC + ITM) for this many steps before --steps of LM loss
    lm_width: int = 128  # --method lm: the language model's width
    lm_depth: int = 2  # its blocks
    lm_heads: int = 2  # its attention heads
    lm_context: int = 128  # positions of the LM: soft prompt + caption
    lm_in_context: bool = True  # ours: each LM text follows another caption of its scene; off: one text alone
    beams: int = 1  # beam size of caption generation at evaluation
    # video (--method lm / evlgen): clips of --frames frames, shapes videos or clip folders with --data
    video: bool = False  # caption video clips instead of images
    frames: int = 4  # frames per clip
    temporal: bool = True  # EVLGen's temporal contextualizer in the ViT; off: frames averaged only
    temporal_dim: int = 0  # its query/key width; 0: half the ViT width
    frame_embed: bool = True  # its frame-index embedding; off: the module as published (blind to frame order)
    temporal_causal: bool = False  # ours: each frame attends to itself and earlier frames only (order from step 1)
    motion_marker: bool = False  # a diagnostic: the direction of a clip's one moving object painted in a corner
    temporal_lr_scale: float = 1.0  # the contextualizer's learning rate = this x --lr (its gradients start at zero)
    motion_word_weight: float = 1.0  # ours: the caption loss counts each motion word (left, right, up, down, still) this many times
    eval_every: int = 0  # captioners: CIDEr-D on --eval-size test images every N steps (the learning curve)
    eval_size: int = 200  # test images of each --eval-every evaluation
    eval_prune: bool = False  # also prune at evaluation (without text); default: all tokens, the authors' protocol
    out: str = "out"  # folder for ckpt.pt and log.jsonl
    overwrite: bool = False  # replace an existing checkpoint in --out
    resume: bool = False  # continue from --out/ckpt.pt
    init: str = ""  # start from the weights (and vocabulary) of this train.py checkpoint; fresh optimizer and step 0
    # data: the embedded shapes by default, else a caption file (json / csv / tsv)
    data: str = ""  # caption file (ALBEF/BLIP json, COCO captions json, csv, tsv); empty: the shapes
    image_root: str = ""  # folder the caption file's image paths are relative to
    val_data: str = ""  # caption file for retrieval at the end (real data); shapes use their test split
    zeroshot_dir: str = ""  # class-per-folder tree for zero-shot at the end
    skip_bad: bool = False  # skip missing / unreadable images (and count them) instead of stopping
    train_size: int = 20000  # shapes scenes in the training set
    partial_captions: float = 0.0  # shapes: share of a multi-object scene's training captions that name one object
    test_size: int = 1000  # images in the retrieval gallery
    workers: int = 0  # DataLoader worker processes
    # model
    vit: str = "tiny64"  # preset: tiny64, vit_ti16, vit_s16, vit_b16
    image_size: int = 0  # 0: the preset's
    patch_size: int = 0  # 0: the preset's
    width: int = 0  # 0: the preset's
    depth: int = 0  # 0: the preset's
    heads: int = 0  # 0: the preset's
    text_width: int = 128  # the text encoder's width
    text_depth: int = 2  # its blocks
    text_heads: int = 2  # its attention heads
    context_length: int = 40  # caption tokens
    embed_dim: int = 128  # the joint image-text embedding
    # optimisation
    steps: int = 450  # optimizer steps
    batch_size: int = 128  # per process and micro-batch (as open_clip and nanoGPT count it)
    accum: int = 1  # micro-batches per optimizer step
    lr: float = 0.0  # peak learning rate; 0: the method's, 1e-3, or RANKING_LR for --method ranking
    min_lr: float = 1e-5  # the cosine schedule's end
    warmup: int = 50  # steps of linear warm-up
    weight_decay: float = 0.1  # AdamW's, on the linear layers' weight matrices only
    beta2: float = 0.98  # AdamW's second-moment decay (CLIP's 0.98)
    grad_clip: float = 1.0  # 0: off
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU), bf16, fp16 (with a GradScaler), off
    seed: int = 0  # the initialisation, the data order and the shapes scenes
    data_seed: int = -1  # the shapes scenes' seed; -1: --seed (Patch Ranking's seeds share one CLIP's data)
    device: str = "auto"  # auto (cuda if there is one), cuda, cpu
    # bookkeeping
    ckpt_every: int = 0  # 0: only at the end
    stop_after: int = 0  # end this run after N steps, as a job time limit would (the schedule still follows --steps)
    log_every: int = 10  # steps between log lines (and the losses' read-back)
    eval: bool = True  # evaluate at the end

    def __post_init__(self):
        if self.lr == 0:
            self.lr = RANKING_LR if self.method == "ranking" else 1e-3

    def scene_seed(self) -> int:
        """The seed of the shapes scenes (train and test split): --data-seed, else --seed."""
        return self.seed if self.data_seed < 0 else self.data_seed


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
    return TrainConfig(**vars(p.parse_args(argv)))


def check_flags(cfg: TrainConfig):
    """Flag combinations that make no sense stop here, before anything is built."""
    if cfg.method not in METHODS:
        raise ValueError(f"--method {cfg.method} is unknown (choose from {', '.join(METHODS)})")
    if not 0 <= cfg.partial_captions <= 1:
        raise ValueError(f"--partial-captions is a share between 0 and 1, not {cfg.partial_captions}")
    if cfg.partial_captions and (cfg.data or cfg.video or cfg.method not in ("none", "elip", "evit", "tome")):
        raise ValueError("--partial-captions applies to CLIPs (--method none, elip, evit, tome) on the shapes images")
    if cfg.lr < 0 or cfg.min_lr < 0:
        raise ValueError("--lr and --min-lr must not be negative")
    for name in ("steps", "batch_size", "accum", "train_size", "test_size", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.amp not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"--amp {cfg.amp} is unknown (choose auto, bf16, fp16 or off)")
    captioning = cfg.method in ("lm", "evlgen")
    if captioning and cfg.objectives != "auto":
        raise ValueError(f"--objectives is for CLIP; --method {cfg.method} has one loss, the LM's")
    if cfg.method == "evlgen" and not cfg.lm:
        raise ValueError("--method evlgen trains on a frozen language model: make one with "
                         "`python train.py --method lm --out lm` and pass --lm lm/ckpt.pt")
    if cfg.method != "evlgen" and (cfg.lm or cfg.clip or cfg.stage1_steps):
        raise ValueError("--lm, --clip and --stage1-steps apply to --method evlgen only")
    if cfg.video and not captioning:
        raise ValueError("--video is for the captioner: --method lm (its language model) and --method evlgen")
    if not cfg.video and (cfg.frames != 4 or not cfg.temporal or cfg.temporal_dim or not cfg.frame_embed
                          or cfg.temporal_lr_scale != 1.0 or cfg.temporal_causal):
        raise ValueError("--frames, --no-temporal, --temporal-dim, --no-frame-embed, --temporal-lr-scale and "
                         "--temporal-causal apply with --video only")
    if cfg.motion_word_weight != 1.0 and (cfg.method != "evlgen" or not cfg.video or cfg.data):
        raise ValueError("--motion-word-weight weighs the motion words of the shapes videos' captions: "
                         "--method evlgen --video, without --data")
    if cfg.motion_word_weight <= 0:
        raise ValueError(f"--motion-word-weight must be positive, not {cfg.motion_word_weight}")
    if cfg.temporal_causal and not cfg.temporal:
        raise ValueError("--temporal-causal masks the temporal contextualizer, which --no-temporal turns off")
    if cfg.motion_marker and (cfg.method != "evlgen" or not cfg.video or cfg.data or cfg.val_data):
        raise ValueError("--motion-marker paints the shapes videos of a video captioner: --method evlgen --video, "
                         "without --data or --val-data")
    if cfg.video and cfg.zeroshot_dir:
        raise ValueError("--zeroshot-dir classifies images; a --video run is evaluated by captioning its clips")
    if cfg.video and cfg.frames < 2:
        raise ValueError(f"--frames {cfg.frames}: a clip needs at least 2 frames")
    if cfg.bridge not in ("merge", "query"):
        raise ValueError(f"--bridge {cfg.bridge} is unknown (choose merge or query)")
    if cfg.bridge_pos and (cfg.method != "evlgen" or cfg.bridge != "merge"):
        raise ValueError("--bridge-pos is a position embedding for the merging bridge: --method evlgen --bridge merge")
    if cfg.stage1_steps and cfg.bridge != "query":
        raise ValueError("--stage1-steps is BLIP-2's first stage for the learned queries: it needs --bridge query")
    if cfg.stage1_steps < 0 or cfg.bridge_r < 0 or cfg.eval_every < 0:
        raise ValueError("--stage1-steps, --bridge-r and --eval-every must not be negative")
    if cfg.eval_every and cfg.method != "evlgen":
        raise ValueError("--eval-every is for the captioner (--method evlgen)")
    if not 0 < cfg.prune_until <= 1:
        raise ValueError(f"--prune-until is the share of the steps trained with pruning, in (0, 1], not {cfg.prune_until}")
    if cfg.prune_until < 1 and cfg.method not in ("elip", "evit", "tome"):
        raise ValueError("--prune-until needs a reducing --method (elip, evit or tome)")
    if cfg.method == "none" and cfg.eval_prune:
        raise ValueError("--eval-prune needs a reducing --method (elip, evit or tome)")
    for flag, mode in (("--merge-mode", cfg.merge_mode), ("--bridge-merge", cfg.bridge_merge)):
        if mode not in MERGE_MODES:
            raise ValueError(f"{flag} {mode} is unknown (choose {' or '.join(MERGE_MODES)})")
    if cfg.method != "elip" and (cfg.elip_lambda != 0.8 or not cfg.lookahead or cfg.rollout):
        raise ValueError("--elip-lambda, --no-lookahead and --rollout apply to --method elip only")
    if cfg.fused_prop_attn and cfg.method not in ("elip", "evit"):
        raise ValueError("--fused-prop-attn is for the fused token of --method elip or evit")
    if (cfg.merge_mode != "wavg" or not cfg.prop_attn) and cfg.method != "tome":
        raise ValueError("--merge-mode and --no-prop-attn apply to --method tome (the captioner's bridge: --bridge-merge)")
    if cfg.bridge_merge != "mean" and cfg.method != "evlgen":
        raise ValueError("--bridge-merge applies to the captioner's bridge, --method evlgen")
    if not (0 <= cfg.keep_warmup <= 1 or cfg.keep_warmup == -1):
        raise ValueError(f"--keep-warmup is a share of the steps in [0, 1] (or -1, as published), not {cfg.keep_warmup}")
    if cfg.method == "ranking" and not (cfg.init or cfg.resume):
        raise ValueError("--method ranking prunes a trained CLIP: pass --init CKPT (from `python train.py`)")
    if cfg.phase not in ("all", "search", "predictor"):
        raise ValueError(f"--phase {cfg.phase} is unknown (choose all, search or predictor)")
    if cfg.method != "ranking" and cfg.phase != "all":
        raise ValueError("--phase applies to --method ranking only")
    if cfg.predictor_loss not in ("listwise", "pairwise"):
        raise ValueError(f"--predictor-loss {cfg.predictor_loss} is unknown (choose listwise or pairwise)")
    if cfg.rank_score not in ("similarity", "max"):
        raise ValueError(f"--rank-score {cfg.rank_score} is unknown (choose similarity or max; ranking.py's `label` "
                         f"mode needs a class for every training image, which captions do not give)")
    if cfg.rank_score == "max" and cfg.data and not cfg.zeroshot_dir:
        raise ValueError("--rank-score max scores by the zero-shot classes: with --data, name them with --zeroshot-dir")
    if min(cfg.rank_block, cfg.rank_chunk, cfg.rank_images) < 1 or cfg.num_tokens < 0:
        raise ValueError("--rank-block, --rank-chunk and --rank-images must be at least 1, --num-tokens at least 0")
    if cfg.init and cfg.resume:
        raise ValueError("--init starts a new run from a checkpoint's weights; --resume continues one: choose one")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: choose one")
    if cfg.val_data and not cfg.data:
        raise ValueError("--val-data is for real data: give the training captions with --data too")
    if cfg.data and not cfg.val_data and not cfg.zeroshot_dir and cfg.eval:
        raise ValueError("with --data, give --val-data and/or --zeroshot-dir to evaluate on, or pass --no-eval")


def model_config(cfg: TrainConfig, vocab_size: int) -> CLIPConfig:
    overrides = {k: getattr(cfg, k) for k in ("image_size", "patch_size", "width", "depth", "heads") if getattr(cfg, k)}
    vision = vit_config(cfg.vit, **overrides)
    text = TextConfig(vocab_size=vocab_size, context_length=cfg.context_length, width=cfg.text_width,
                      depth=cfg.text_depth, heads=cfg.text_heads)
    return CLIPConfig(vision=vision, text=text, embed_dim=cfg.embed_dim, objectives=objectives(cfg))


def captioner_config(cfg: TrainConfig, sources: dict, vocab_size: int) -> CaptionerConfig:
    """The captioner: the LM's config from its checkpoint; the ViT and the bridge's blocks from the
    CLIP checkpoint when one is given (the ViT then frozen), else from the flags (the ViT trained)."""
    lm = LMConfig(**sources["lm"]["model_config"])
    if "clip" in sources:
        clip = CLIPConfig.from_dict(sources["clip"]["model_config"])
        vision, text = clip.vision, clip.text
    else:
        vision = model_config(cfg, vocab_size).vision
        text = TextConfig(width=cfg.text_width, depth=cfg.text_depth, heads=cfg.text_heads)
    text = dataclasses.replace(text, vocab_size=vocab_size, context_length=lm.context_length)  # the LM's words
    depth = cfg.bridge_depth or text.depth
    r, _ = merge_schedule(cfg.bridge_r, depth, 1 + vision.num_patches)
    return CaptionerConfig(vision=vision, lm=lm, text=text, bridge=cfg.bridge, bridge_depth=depth, r=tuple(r),
                           merge_mode=cfg.bridge_merge, prop_attn=cfg.bridge_merge == "wavg", bridge_pos=cfg.bridge_pos,
                           num_queries=cfg.num_queries,
                           freeze_vit="clip" in sources, stage1=cfg.stage1_steps > 0, embed_dim=cfg.embed_dim,
                           frames=cfg.frames if cfg.video else 1, temporal=cfg.video and cfg.temporal,
                           temporal_dim=cfg.temporal_dim, frame_embed=cfg.frame_embed,
                           temporal_causal=cfg.temporal_causal)


def objectives(cfg: TrainConfig) -> tuple:
    if cfg.objectives == "auto":
        return ("itc",) if cfg.method == "none" else ("itc", "itm", "mlm")
    return tuple(o.strip() for o in cfg.objectives.split(",") if o.strip())


def reducer_fn(cfg: TrainConfig, vision, step: int, training: bool = True):
    """The method's reducer for one step, as a function of the text guidance (None: no text):
    checkpoint.make_reducer with the keep-rate warm-up and the all-token tail of this step.
    A step of cfg.steps or later asks for the reduction as trained once the warm-up is over."""
    if training and cfg.prune_until * cfg.steps <= step < cfg.steps:
        return None  # the all-token tail: the model meets the full sequence it will be evaluated on
    warm = (cfg.keep_warmup if cfg.keep_warmup >= 0 else EVIT_KEEP_WARMUP if cfg.method == "evit" else 0.0) * cfg.steps
    keep_scale = min(1.0, (step + 1) / warm) if training and warm > 0 else 1.0
    return make_reducer(cfg, vision, keep_scale, guided=training)


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
    def __init__(self, stream, first_micro, last_micro, batch_size, rank, world):
        self.args = stream, batch_size, rank, world
        self.first, self.last = first_micro, last_micro

    def __iter__(self):
        stream, B, rank, world = self.args
        return (micro_batch_keys(stream, m, B, rank, world) for m in range(self.first, self.last))

    def __len__(self):
        return self.last - self.first


def lm_texts(dataset, i: int) -> list:
    """What the language model trains on for item i: its captions, plus the shapes' Q&A text."""
    return dataset.texts(i) if hasattr(dataset, "texts") else dataset.captions(i)


class Pairs(torch.utils.data.Dataset):
    """(image, one caption) for a (dataset index, stream position) key; the caption choice and
    any augmentation are seeded by the position, so they are the same on every rerun. Without
    images (the LM): one text, or with `context` one text after another caption of its scene."""

    def __init__(self, dataset, tokenizer, seed, images=True, context=False):
        self.dataset, self.tokenizer, self.seed, self.images, self.context = dataset, tokenizer, seed, images, context

    def __getitem__(self, key):
        i, pos = key
        rng = np.random.default_rng([self.seed, pos, 1])
        if not self.images:  # the language model reads text alone: captions (and, on shapes, Q&A)
            texts = lm_texts(self.dataset, i)
            text = texts[int(rng.integers(len(texts)))]
            if self.context:  # another reference when there is one (a lone caption is its own context)
                caps = self.dataset.captions(i)
                others = [c for c in caps if not text.startswith(c)] or caps
                text = shapes.in_context(others[int(rng.integers(len(others)))], text)
            return torch.zeros(0), text, 0
        item = self.dataset.get(i, rng)
        caps = item["captions"]
        return item["image"], caps[int(rng.integers(len(caps)))], item.get("skipped", 0)

    def collate(self, batch):
        images, captions, skipped = zip(*batch)
        return torch.stack(images), self.tokenizer(list(captions)), sum(skipped)


# ----------------------------------------------------------------------------------------------
# Optimisation

def cosine_lr(step: int, steps: int, lr: float, min_lr: float = 0.0, warmup: int = 0) -> float:
    """Linear warm-up to lr over `warmup` steps, then cosine decay to min_lr at step `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The run's schedule. With --stage1-steps each stage has its own warm-up and decay (BLIP-2
    trains its stages as two runs)."""
    steps = cfg.steps
    if cfg.stage1_steps:
        steps = cfg.stage1_steps if step < cfg.stage1_steps else cfg.steps
        step = step if step < cfg.stage1_steps else step - cfg.stage1_steps
    return cosine_lr(step, steps, cfg.lr, cfg.min_lr, cfg.warmup)


def param_groups(model, weight_decay: float, temporal_lr_scale: float = 1.0) -> list:
    """Weight decay on the weight matrices of linear layers only. Our rule: exempt are tensors of
    fewer than 2 dims (norms, biases, the temperature, gates) and every parameter named "*embed*"
    or "*token*" (position, patch and frame embeddings, the class token, the word table, learnable
    tokens). timm exempts the 1-dim tensors, pos_embed and cls_token; open_clip the 1-dim tensors.
    The video contextualizer's parameters get groups of their own whose learning rate is scaled."""
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
    """The mean over processes of each logged value: under DDP, rank 0 alone would log the loss
    of its own rows only."""
    if world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / world).tolist()))


# ----------------------------------------------------------------------------------------------
# Checkpoints

def saved_config(ckpt: dict, **overrides) -> "TrainConfig":
    """The TrainConfig a checkpoint was trained with (fields added since then keep their defaults,
    or what the code did before them: BEFORE_FIELD)."""
    saved = {k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__}
    return TrainConfig(**{**BEFORE_FIELD, **saved, **overrides})


def config_differences(saved: dict, current: dict, prefix="") -> list:
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, prefix + k + ".")
        elif json.dumps(a) != json.dumps(b):  # tuples and lists alike
            out.append(f"{prefix}{k}: checkpoint {a!r}, flags {b!r}")
    return out


# ----------------------------------------------------------------------------------------------
# The run

def build_data(cfg: TrainConfig, image_size: int, patch_size: int):
    if cfg.video:
        if cfg.data:
            return data.VideoCaptionDataset(cfg.data, cfg.image_root, image_size, cfg.frames, cfg.skip_bad)
        return shapes.ShapesVideoDataset("train", cfg.train_size, image_size, patch_size, cfg.scene_seed(), cfg.frames,
                                       cache=True, marker=cfg.motion_marker)
    if cfg.data:
        return data.CaptionDataset(cfg.data, cfg.image_root, image_size, skip_bad=cfg.skip_bad)
    return shapes.ShapesDataset("train", cfg.train_size, image_size, patch_size, cfg.scene_seed(), cache=True,
                              partial=cfg.partial_captions)


def prepare(cfg: TrainConfig, rank: int):
    """Everything a user can get wrong is checked here, before training: flags, output folder,
    data, checkpoints, evaluation sets. Returns (dataset, tokenizer, model config, checkpoint to
    resume or start from or None, evaluation sets or None, {"lm": ..., "clip": ...} checkpoints
    the captioner starts from)."""
    check_flags(cfg)
    say = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    for name in ("ckpt.pt", "log.jsonl"):
        path = os.path.join(cfg.out, name)
        if os.path.exists(path) and not (cfg.resume or cfg.overwrite):
            raise ValueError(f"{path} exists: pass --resume to continue it or --overwrite to replace it")
    if cfg.resume and not os.path.exists(ckpt_path):
        raise ValueError(f"--resume: there is no checkpoint at {ckpt_path}")
    probe = model_config(cfg, vocab_size=1)  # validates the ViT flags and objectives before data is read
    if cfg.method == "elip":
        schedule = elip_schedule(cfg, probe.vision.depth)
        schedule.validate(probe.vision.depth, probe.vision.num_patches)
        if not cfg.lookahead and schedule.begin_layers[0] < 1:
            raise ValueError("--no-lookahead needs the first pruning stage at block 1 or later")
    elif cfg.method == "tome":
        r, note = tome_schedule(cfg, probe.vision.depth, 1 + probe.vision.num_patches)
        say(f"ToMe merges {sum(r)} tokens: r per block {r}" + (f" ({note})" if note else ""))
    if cfg.method != "elip" and (cfg.begin_layers or cfg.num_layers or cfg.keep_ratios):
        raise ValueError("--begin-layers, --num-layers and --keep-ratios apply to --method elip only")
    sources = {}
    if cfg.method == "evlgen":
        sources["lm"] = read_checkpoint(cfg.lm)
        expect_kind(sources["lm"], "lm", cfg.lm, "--lm", "make one with `python train.py --method lm`")
        if saved_config(sources["lm"]).video != cfg.video:
            kind = "video" if cfg.video else "image"
            raise ValueError(f"--lm {cfg.lm} was trained on {'image' if cfg.video else 'video'} captions; a {kind} "
                             f"captioner needs a language model of {kind} captions: `python train.py --method lm"
                             f"{' --video' if cfg.video else ''}`")
        if cfg.clip:
            sources["clip"] = read_checkpoint(cfg.clip)
            expect_kind(sources["clip"], "clip", cfg.clip, "--clip", "train one with `python train.py --method none`")
        probe = captioner_config(cfg, sources, vocab_size=1)
    source = ckpt_path if cfg.resume else cfg.init
    ckpt = read_checkpoint(source) if source else None
    if cfg.resume:
        check_same_run(cfg, ckpt, ckpt_path)
    if cfg.method == "ranking":  # the images are the size the CLIP of --init was trained at
        probe = ranking_config(cfg, ckpt, source).clip
    dataset = build_data(cfg, probe.vision.image_size, probe.vision.patch_size)
    if ckpt is not None:
        tokenizer = Tokenizer.from_state_dict(ckpt["tokenizer"])
    elif "lm" in sources:  # the frozen LM decides the vocabulary
        tokenizer = Tokenizer.from_state_dict(sources["lm"]["tokenizer"])
    elif cfg.method == "lm":  # all the text it trains on, at the LM's context
        tokenizer = Tokenizer.build((t for i in range(len(dataset)) for t in lm_texts(dataset, i)), cfg.lm_context)
    else:
        captions = (c for i in range(len(dataset)) for c in dataset.captions(i))
        tokenizer = Tokenizer.build(captions, cfg.context_length)
    if "lm" in sources:
        check_vocabularies(tokenizer, sources, source)
        mcfg = captioner_config(cfg, sources, len(tokenizer))
        if cfg.motion_word_weight != 1.0:
            mcfg = dataclasses.replace(mcfg, weighted_words=tuple(tokenizer.stoi[w] for w in shapes.MOTIONS),
                                       word_weight=cfg.motion_word_weight)
        if cfg.bridge == "merge":
            N = 1 + mcfg.vision.num_patches
            note = merge_schedule(cfg.bridge_r, mcfg.bridge_depth, N)[1]
            say(f"bridge: {N} visual tokens, r per layer {list(mcfg.r)} -> {N - sum(mcfg.r)} tokens into the LM"
                + (f" ({note})" if note else ""))
    elif cfg.method == "ranking":
        mcfg = ranking_config(cfg, ckpt, source)
    elif cfg.method == "lm":
        mcfg = LMConfig(vocab_size=len(tokenizer), context_length=cfg.lm_context, width=cfg.lm_width,
                        depth=cfg.lm_depth, heads=cfg.lm_heads)
    else:
        mcfg = model_config(cfg, len(tokenizer))
    if ckpt is not None and not (cfg.method == "ranking" and cfg.init):  # the CLIP it prunes has its own config
        diffs = config_differences(ckpt["model_config"], asdict(mcfg))
        if diffs:
            raise ValueError(f"{source} is from another model config ({'; '.join(diffs)})")
    sets = None
    if cfg.eval and rank == 0:
        sets = evaluation.eval_sets(probe.vision.image_size, probe.vision.patch_size, cfg.scene_seed(), cfg.test_size,
                                    cfg.val_data, cfg.image_root, cfg.zeroshot_dir, cfg.skip_bad,
                                    cfg.frames if cfg.video else 0, cfg.motion_marker)
    return dataset, tokenizer, mcfg, ckpt, sets, sources


# the flags that decide what a run trains on: a resumed run must keep them
DATA_FLAGS = ("data", "image_root", "train_size", "video", "frames", "partial_captions", "motion_marker")
LOSS_FLAGS = ("motion_word_weight", "temporal_causal")  # change what is learned, but no weight's shape


def check_same_run(cfg: TrainConfig, ckpt: dict, path: str):
    """A resumed run continues on the data and the loss it started with, never silently on others."""
    saved = saved_config(ckpt)
    pairs = [(f"--{name.replace('_', '-')}", getattr(saved, name), getattr(cfg, name))
             for name in DATA_FLAGS + LOSS_FLAGS]
    pairs.append(("--seed / --data-seed (the shapes scenes)", saved.scene_seed(), cfg.scene_seed()))
    for flag, then, now in pairs:
        if then != now:
            raise ValueError(f"--resume: {path} was trained with {flag} {then!r}, this run has {now!r}; "
                             f"resume with the flags it started with")


def ranking_config(cfg: TrainConfig, ckpt: dict, path: str) -> RankingConfig:
    """Patch Ranking's model: the CLIP of --init (its config, not the ViT flags), pruned at --rank-layer."""
    if cfg.resume:
        return RankingConfig.from_dict(ckpt["model_config"])
    expect_kind(ckpt, "clip", path, "--init", "train one with `python train.py`")
    clip = CLIPConfig.from_dict(ckpt["model_config"])
    try:
        layer = ranking.pruning_layer(clip.vision.depth, cfg.rank_layer)
        ranking.keep_count(cfg.rank_keep, clip.vision.num_patches)
    except ValueError as e:
        raise ValueError(f"--rank-layer / --rank-keep: {e}") from None
    return RankingConfig(clip=clip, layer=layer, keep=cfg.rank_keep, num_tokens=cfg.num_tokens, fuse=cfg.rank_fuse)


def search_settings(cfg: TrainConfig, model: RankingCLIP, tokenizer: Tokenizer) -> tuple:
    """(keyword arguments of `ranking.golden_ranking`, what of them the cache's identity records).
    With --rank-score max the search scores by the zero-shot classes (--zeroshot-dir's folders,
    else the shapes classes), embedded by the frozen CLIP's text tower."""
    search = dict(k=cfg.rank_block, chunk=cfg.rank_chunk, fuse=model.rcfg.fuse, mode=cfg.rank_score)
    recorded = dict(block=cfg.rank_block, chunk=cfg.rank_chunk, score=cfg.rank_score)
    if cfg.rank_score == "max":
        folder = data.ImageFolder(cfg.zeroshot_dir) if cfg.zeroshot_dir else None
        names, templates = (folder.classes, folder.templates) if folder else (shapes.SHAPES_CLASSES, shapes.SHAPES_TEMPLATES)
        device = next(model.parameters()).device
        search["classes"] = evaluation.zeroshot_classifier(model, tokenizer, names, templates, device)
        recorded.update(classes=list(names), templates=list(templates))
    return search, recorded


def start_ranking(cfg: TrainConfig, model: RankingCLIP, init: dict, dataset, tokenizer, rank: int, world: int,
                  say) -> bool:
    """Patch Ranking's first two phases, before the loop trains the learnable tokens: load the
    frozen CLIP, search the golden rankings (cached), train the predictor (cached). Rank 0 does
    the work, the others read its files. Returns False if --phase stops here."""
    load_state(model, {**model.state_dict(), **init["model"]}, cfg.init)  # the CLIP; predictor and tokens fresh
    layer = model.rcfg.layer
    images_of = lambda i: dataset.get(i)["image"]
    search, recorded = search_settings(cfg, model, tokenizer)
    identity = dict(checkpoint=ranking.file_identity(cfg.init), layer=layer, **recorded,
                    data=cfg.data or "shapes", train_size=cfg.train_size, scenes=cfg.scene_seed(),
                    **(dict(fuse=True) if model.rcfg.fuse else {}))  # caches of dropping searches predate the key
    n = min(cfg.rank_images, len(dataset))
    cache, pred_path = cfg.rank_cache or os.path.join(cfg.out, "rankings.pt"), os.path.join(cfg.out, "predictor.pt")
    pred_identity = dict(identity, images=n, steps=cfg.predictor_steps, loss=cfg.predictor_loss, seed=cfg.seed)
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        golden = ranking.search_cached(model, images_of, n, cache, identity, layer, say=say, **search)
        saved = torch.load(pred_path, map_location="cpu", weights_only=True) if os.path.exists(pred_path) else {}
        if cfg.phase != "search" and saved.get("identity") != pred_identity:
            n_fit = max(1, n - n // 10)  # the last 10% are held out
            torch.manual_seed(cfg.seed)
            ranking.train_predictor(model, model.predictor, images_of, golden[:n_fit], layer, cfg.predictor_steps,
                                    lambda step: cosine_lr(step, cfg.predictor_steps, PREDICTOR_LR),
                                    cfg.predictor_loss, seed=cfg.seed, say=say)
            held = torch.stack([images_of(i) for i in range(n_fit, n)]) if n > n_fit else None
            pruned = model.cfg.vision.num_patches - ranking.keep_count(model.rcfg.keep, model.cfg.vision.num_patches)
            match = ranking.predictor_match(model, model.predictor, held.to(model.learned_tokens.device), golden[n_fit:],
                                            layer, pruned) if held is not None and pruned else float("nan")
            saved = dict(identity=pred_identity, state=model.predictor.state_dict(), top_n_match=match, held_out=n - n_fit)
            save_checkpoint(pred_path, saved)
        if saved:
            say(f"predictor: top-n match with the golden ranking on {saved['held_out']} held-out images "
                f"{100 * saved['top_n_match']:.1f}% (n = the pruned patches)")
    if world > 1:
        dist.barrier()
    if cfg.phase == "search":
        return False
    model.predictor.load_state_dict(torch.load(pred_path, map_location="cpu", weights_only=True)["state"])
    return cfg.phase == "all"


def clip_unchanged(model: RankingCLIP, init: dict) -> bool:
    """The frozen CLIP inside a Patch Ranking model is bit-identical to its --init checkpoint."""
    state = model.state_dict()
    return all(torch.equal(state[k].cpu(), v.cpu()) for k, v in init["model"].items())


def expect_kind(ckpt: dict, kind: str, path: str, flag: str, how: str):
    got = ckpt.get("kind", "clip")
    if got != kind:
        raise DataError(f"{flag} {path} is a {got} checkpoint, not a {kind} one ({how})")


def train_step(cfg, step, ddp_model, model, optimizer, scaler, autocast, batches, device, rank, world, make_reducer):
    """One optimizer step over `accum` micro-batches; returns (mean losses, images skipped)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg) * group.get("lr_scale", 1.0)  # checkpoints before the scale: 1
    losses, skipped = {}, 0
    for micro in range(cfg.accum):
        images, ids, bad = next(batches)
        skipped += bad
        images, ids = images.to(device, non_blocking=True), ids.to(device, non_blocking=True)
        # MLM masks and ITM negatives: seeded by (seed, micro-step, rank), so resumes replay them
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + (step * cfg.accum + micro) * world + rank)
        sync = micro == cfg.accum - 1 or world == 1  # DDP all-reduces gradients on the last micro-batch only
        with (nullcontext() if sync else ddp_model.no_sync()), autocast():
            out = ddp_model(images, ids, make_reducer, generator)
        loss = out["loss"] / cfg.accum
        (scaler.scale(loss) if scaler else loss).backward()
        for k, v in out.items():
            losses[k] = losses.get(k, 0.0) + v.item() / cfg.accum
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


def run_eval(cfg, model, tokenizer, device, eval_sets, mcfg, step, n=None) -> dict:
    """The end-of-run (or --eval-every) metrics of whatever this run trains."""
    if isinstance(model, Captioner):
        return captioning.evaluate_captioner(model, tokenizer, device, eval_sets, n or cfg.test_size, cfg.beams,
                                             vqa=n is None)
    if isinstance(model, LanguageModel):
        return captioning.evaluate_lm(model.lm, tokenizer, device, eval_sets, cfg.test_size)
    if isinstance(model, RankingCLIP):  # what it was made for: pruned by the predictor, with the learned tokens
        return evaluation.evaluate(model, tokenizer, device, eval_sets, cfg.test_size, model.reducer())
    make = reducer_fn(cfg, mcfg.vision, step, training=False) if cfg.eval_prune else None
    if cfg.method != "none" and not cfg.eval_prune:
        print(f"evaluating with all tokens (the authors' protocol); --eval-prune evaluates with {cfg.method}'s "
              f"reduction (pruning scored without text)", flush=True)
    return evaluation.evaluate(model, tokenizer, device, eval_sets, cfg.test_size, make(None) if make else None)


HEADLINE = ("image_to_text_R@1", "text_to_image_R@1", "zeroshot_top1", "bleu4", "cider_d", "vqa_accuracy",
            "motion_accuracy", "direction_accuracy", "direction_accuracy_one_object", "perplexity", "perplexity_in_context",
            "perplexity_other_context")


def train(cfg: TrainConfig) -> dict:
    rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    try:
        dataset, tokenizer, mcfg, ckpt, eval_sets, sources = prepare(cfg, rank)
    except (DataError, ValueError) as e:
        sys.exit(f"error: {e}" if master else 2)  # every rank stops; one says why
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(device)
    step = 0
    if isinstance(model, RankingCLIP) and not cfg.resume:
        try:
            go_on = start_ranking(cfg, model, ckpt, dataset, tokenizer, rank, world, say=print if master else lambda m: None)
        except (DataError, ValueError) as e:  # a stale ranking cache
            sys.exit(f"error: {e}" if master else 2)
        if not go_on:
            return {}
    elif ckpt is not None:
        model.load_state_dict(ckpt["model"])
    elif isinstance(model, Captioner):
        start_captioner(model, sources)
    if isinstance(model, RankingCLIP):
        model.freeze_all_but_tokens()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.temporal_lr_scale), lr=cfg.lr, betas=(0.9, cfg.beta2),
                                  fused=device.type == "cuda")
    autocast, scaler = amp_settings(cfg.amp, device)
    if ckpt is not None and cfg.resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
    two_stage = getattr(mcfg, "stage1", False)  # each stage leaves the other's heads without gradients
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=two_stage) if world > 1 else model

    total = cfg.stage1_steps + cfg.steps
    pairs = Pairs(dataset, tokenizer, cfg.seed, images=cfg.method != "lm", context=cfg.lm_in_context)
    sampler = MicroBatches(EpochPermutations(len(dataset), cfg.seed), step * cfg.accum, total * cfg.accum,
                           cfg.batch_size, rank, world)
    loader = torch.utils.data.DataLoader(pairs, batch_sampler=sampler, collate_fn=pairs.collate,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda")
    if master:
        os.makedirs(cfg.out, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained) | {len(dataset)} training "
              f"{'captions' if cfg.method == 'lm' else 'clips' if cfg.video else 'images'} | global batch "
              f"{cfg.batch_size * world * cfg.accum} = {cfg.batch_size} x {world} process(es) x {cfg.accum} "
              f"accumulation | {device} | amp {cfg.amp}", flush=True)
        if getattr(dataset, "missing", 0):
            print(f"--skip-bad: {dataset.missing} image(s) listed in {cfg.data} do not exist and were skipped", flush=True)
    log = open_log(os.path.join(cfg.out, "log.jsonl"), step) if master else None

    def checkpoint():
        if master:
            save_checkpoint(os.path.join(cfg.out, "ckpt.pt"), dict(
                kind=kind_of(mcfg), config=asdict(cfg), model_config=asdict(mcfg), model=model.state_dict(),
                optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler else None,
                step=step, tokenizer=tokenizer.state_dict(), train_seconds=train_seconds))

    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, disable=not master, dynamic_ncols=True)
    # train_seconds: wall-clock of training alone (evaluations excluded), carried across resumes
    train_seconds = ckpt.get("train_seconds", 0.0) if ckpt is not None and cfg.resume else 0.0
    batches, skipped, t_log, n_log = iter(loader), 0, time.time(), 0
    model.train()
    last = min(total, step + cfg.stop_after) if cfg.stop_after else total
    while step < last:
        if two_stage:
            model.stage = 1 if step < cfg.stage1_steps else 2
        t0 = time.time()
        losses, bad = train_step(cfg, step, ddp_model, model, optimizer, scaler, autocast, batches, device,
                                 rank, world, reducer_fn(cfg, getattr(mcfg, "vision", None), step))
        train_seconds += time.time() - t0
        skipped += bad
        step += 1
        n_log += cfg.batch_size * cfg.accum * world
        bar.update(1)
        if step % cfg.log_every == 0 or step == last:
            losses = global_mean(losses, world)  # a collective: every rank takes part
            if master:
                speed = n_log / (time.time() - t_log)
                bar.set_postfix(loss=f"{losses['loss']:.3f}", img_s=f"{speed:.0f}")
                log.write(json.dumps(dict(step=step, lr=lr_at(step - 1, cfg), img_per_s=speed,
                                          time=train_seconds, **losses)) + "\n")
                log.flush()
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == total) and master:
            curve = run_eval(cfg, model, tokenizer, device, eval_sets, mcfg, step, n=cfg.eval_size)
            log.write(json.dumps(dict(step=step, time=train_seconds, curve=curve)) + "\n")
            log.flush()
        if step % cfg.log_every == 0 or step == last or (cfg.eval_every and step % cfg.eval_every == 0):
            t_log, n_log = time.time(), 0
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < last:
            checkpoint()
    bar.close()
    checkpoint()
    metrics = {}
    if master and isinstance(model, Captioner):
        print(f"frozen language model unchanged by training: {'yes' if lm_unchanged(model, sources) else 'NO'}",
              flush=True)
        if model.temporal is not None:
            print("temporal gates (alpha per ViT block, 0 at the start): "
                  + " ".join(f"{a:+.3f}" for a in model.temporal.gates()), flush=True)
    if master and isinstance(model, RankingCLIP) and cfg.init:
        print(f"frozen CLIP unchanged by training: {'yes' if clip_unchanged(model, ckpt) else 'NO'}", flush=True)
    if master and cfg.eval and step == total:
        metrics = run_eval(cfg, model, tokenizer, device, eval_sets, mcfg, step)
        log.write(json.dumps(dict(step=step, time=train_seconds, eval=metrics)) + "\n")
    if master:
        log.close()
        shown = " | ".join(f"{k} {v:.2f}" if evaluation.shown_scale(k) == 1 else f"{k} {100 * v:.1f}"
                           for k, v in metrics.items() if k in HEADLINE)
        note = f" | {skipped} unreadable image(s) skipped" if skipped else ""
        if step < total:
            note += f" | stopped before step {total}: continue with --resume"
        print(f"results: method {cfg.method} | step {step} | {train_seconds / 60:.1f} min training | {shown}{note}",
              flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def leave_without_teardown():
    """End a torchrun process once everything is written, skipping the interpreter's and C++'s
    teardown: two-process CPU runs now and then abort there (SIGABRT, "terminate called without an
    active exception", after destroy_process_group and after the checkpoint), and torchrun would
    report a finished run as failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv=None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        leave_without_teardown()
