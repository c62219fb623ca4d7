"""
The checkpoint format, and building a model and its token reducer from a config: what train.py
writes and eval.py, viz.py, bench.py and the experiments read.

A checkpoint (`OUT/ckpt.pt`) is one dict: `kind` (clip, lm, captioner, ranking), `config` (the
train.py flags of the run), `model_config` (the model's dataclass, as a dict), `model`, `optimizer`,
`scaler`, `step`, `tokenizer` and `train_seconds`. It is written atomically and read with
`weights_only=True`, onto the device asked for.

Read first: `ReducerConfig` and `make_reducer` (how `--method elip|evit|tome` becomes a reducer:
the whole dispatch), then `load_checkpoint`.
"""
import os
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch

from captioner import Captioner, CaptionerConfig, LanguageModel
from data import DataError
from elip import ELIP, Schedule, evit, scaled_schedule
from merge import ToMe, merge_schedule
from model import CLIP, CLIPConfig, RankingCLIP, RankingConfig
from text import LMConfig, Tokenizer
from vit import ViTConfig, load_exactly


@dataclass
class ReducerConfig:
    """How a CLIP's vision tokens are reduced; train.py's flags of the same names."""
    # the method, and how ELIP, EViT and ToMe reduce tokens
    method: str = "none"  # token reduction method: none, elip, evit, tome (train.py adds lm, evlgen, ranking)
    elip_lambda: float = 0.8  # weight of the vision [CLS] when the text [CLS] is mixed in (ELIP)
    lookahead: bool = True  # ELIP scores with a look-ahead through each stage (off: previous block's attention)
    fused_prop_attn: bool = False  # ours (ELIP/EViT): the fused token attends with log(its size); the papers: off
    rollout: bool = False  # ours (ELIP): the look-ahead's [CLS] row rolled back to the stage's input tokens; the paper: off
    elip_schedule: str = ""  # ELIP's stages as begin:blocks:keep, e.g. 2:2:0.9,4:6:0.65,10:2:0.4 (keep: share of the ORIGINAL patches); empty: the authors' scaled to depth
    tome_r: str = "auto"  # ToMe (size-weighted merging, proportional attention): tokens merged per block, one number or one per block; auto: ViT-B/16's r=13 share


def elip_schedule(rc: ReducerConfig, depth: int) -> Schedule:
    """The schedule --elip-schedule gives, or the authors' scaled to `depth`."""
    if not rc.elip_schedule:
        return scaled_schedule(depth)
    try:
        stages = [stage.split(":") for stage in rc.elip_schedule.split(",")]
        b, n, r = zip(*((int(begin), int(blocks), float(keep)) for begin, blocks, keep in stages))
    except ValueError:
        raise ValueError(f"--elip-schedule {rc.elip_schedule!r}: give begin:blocks:keep per stage, comma-separated "
                         f"(e.g. 2:2:0.9,4:6:0.65,10:2:0.4)") from None
    return Schedule(b, n, r)


TOME_B16_SHARE = 12 * 13 / 197  # the share of ViT-B/16's 197 tokens that ToMe's r = 13 merges away


def tome_schedule(rc: ReducerConfig, depth: int, num_tokens: int):
    """(r per block, capped, and a note on the caps) from --tome-r."""
    spec = rc.tome_r.strip()
    try:
        if spec == "auto":
            r = int(TOME_B16_SHARE * num_tokens / depth)
        elif "," in spec:
            r = [int(v) for v in spec.split(",")]
        else:
            r = int(spec)
    except ValueError:
        raise ValueError(f"--tome-r takes auto, a whole number or one per block (comma-separated), not {spec!r}") from None
    return merge_schedule(r, depth, num_tokens)


def make_reducer(rc: ReducerConfig, vision: ViTConfig, keep_scale: float = 1.0,
                 guided: bool = True) -> Optional[Callable]:
    """The method's reducer as a function of the text guidance (None: no text), or None for a
    method that reduces nothing. `keep_scale` (0..1) scales the pruned share (EViT's keep-rate
    warm-up); `guided=False` prunes without text (evaluation). A new method adds one branch."""
    P, depth = (vision.num_patches, vision.depth) if vision is not None else (0, 0)  # the LM has no ViT
    if rc.method == "elip":
        schedule = elip_schedule(rc, depth)
        return lambda text: ELIP(schedule, P, text if guided else None, rc.elip_lambda, rc.lookahead, keep_scale,
                                 rc.fused_prop_attn, rc.rollout)
    if rc.method == "evit":
        return lambda text: evit(depth, P, keep_scale=keep_scale, prop_attn=rc.fused_prop_attn)
    if rc.method == "tome":
        r = tome_schedule(rc, depth, 1 + P)[0]
        return lambda text: ToMe(r)  # as published: size-weighted means, proportional attention
    return None


# ----------------------------------------------------------------------------------------------
# Reading and writing

def save_checkpoint(path: str, state: dict):
    """Atomic: a reader sees the old checkpoint or the new one, never a partial file."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str, device="cpu") -> dict:
    if not os.path.isfile(path):
        raise DataError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise DataError(f"checkpoint {path} cannot be read: {e}") from None


# What a checkpoint holds ("kind"): its model class and how its saved config is read back
KINDS = {"clip": (CLIP, CLIPConfig, CLIPConfig.from_dict), "lm": (LanguageModel, LMConfig, lambda d: LMConfig(**d)),
         "captioner": (Captioner, CaptionerConfig, CaptionerConfig.from_dict),
         "ranking": (RankingCLIP, RankingConfig, RankingConfig.from_dict)}


def kind_of(mcfg) -> str:
    return next(kind for kind, (_, config, _) in KINDS.items() if isinstance(mcfg, config))


def build_model(mcfg) -> torch.nn.Module:
    return KINDS[kind_of(mcfg)][0](mcfg)


def load_checkpoint(path: str, device="cpu"):
    """(model in eval mode, tokenizer, raw checkpoint) from a train.py checkpoint of any kind."""
    ckpt = read_checkpoint(path, device)
    if not {"model", "model_config", "tokenizer", "config"} <= set(ckpt):
        raise DataError(f"checkpoint {path} was not written by train.py (keys: {', '.join(sorted(ckpt))})")
    model = build_model(KINDS[ckpt.get("kind", "clip")][2](ckpt["model_config"])).to(device)
    load_state(model, ckpt["model"], path)
    return model.eval(), Tokenizer.from_state_dict(ckpt["tokenizer"]), ckpt


def load_state(model, state: dict, path: str):
    """load_state_dict that stops with one sentence listing what does not fit."""
    try:
        load_exactly(model, state, f"checkpoint {path}", show=5)
    except ValueError as e:
        raise DataError(str(e)) from None


# flags added after checkpoints existed, whose default differs from what those checkpoints did
BEFORE_FIELD = {"fused_prop_attn": False, "rank_fuse": False, "rollout": False,
                "bridge_merge": "wavg"}


def reducer_config(ckpt: dict, **overrides) -> ReducerConfig:
    """The reducer a checkpoint was trained with (flags added since: what the code did before them)."""
    names = {f.name for f in fields(ReducerConfig)}
    saved = {k: v for k, v in {**BEFORE_FIELD, **saved_flags(ckpt["config"])}.items() if k in names}
    return ReducerConfig(**{**saved, **overrides})


def saved_flags(config: dict) -> dict:
    """A checkpoint's flags in today's names: ELIP's schedule was three lists (begin, blocks, keep)."""
    lists = [config.get(k) for k in ("begin_layers", "num_layers", "keep_ratios")]
    if all(lists):
        config = dict(config, elip_schedule=",".join(":".join(stage) for stage in zip(*(v.split(",") for v in lists))))
    return config


def trained_on(ckpt: dict) -> dict:
    """What a checkpoint's run trained on, as evaluation needs it: the shapes scenes' seed and the
    frames of a video clip (0: images)."""
    c = ckpt["config"]
    if c.get("motion_marker"):  # its test clips would need the painted marker the code no longer draws
        raise DataError("this run trained on shapes videos with --motion-marker, a study since removed from the "
                        "code: evaluate it with the commit that made it (git log -Smotion_marker)")
    seed = ckpt.get("scenes")  # recorded since runs of Patch Ranking take their CLIP's; before: a flag
    seed = seed if seed is not None else c.get("data_seed", -1) if c.get("data_seed", -1) >= 0 else c.get("seed", 0)
    return dict(scene_seed=seed, frames=c.get("frames", 4) if c.get("video") else 0)
