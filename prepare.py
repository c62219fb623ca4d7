"""
Everything a training run is built from, checked before its first step: the flags, the output
folder, the data (the same list on every rank), the tokenizer, the model's config (from the flags,
or from the checkpoints the run starts from) and the evaluation sets. The weights it starts from
are start.py's.

Read first: `prepare`. Functions take train.py's TrainConfig as `cfg`.
"""
import dataclasses
import json
import os

import torch.distributed as dist

import data
import eval as evaluation
import ranking
import shapes
from bpe import CLIPTokenizer
from captioner import CaptionerConfig, check_vocabularies
from checkpoint import elip_schedule, read_checkpoint, tome_schedule, trained_on
from data import DataError, lm_texts
from merge import MERGE_MODES, merge_schedule
from model import CLIPConfig, RankingConfig
from text import LMConfig, TextConfig, Tokenizer
from pretrained import read_weights
from vit import vit_config

CLIP_METHODS = ("none", "elip", "evit", "tome")  # a CLIP with or without a token reducer
METHODS = (*CLIP_METHODS, "lm", "evlgen", "ranking")  # CLIP with a reducer; the LM; the captioner; Patch Ranking

# --model-kwargs: the sizes a run's models are built with, and their defaults (the small CPU models)
SIZES = dict(image_size=0, patch_size=0, width=0, depth=0, heads=0,  # the ViT; 0: the --vit preset's
             text_width=128, text_depth=2, text_heads=2, context_length=40,  # the text encoder; caption tokens
             embed_dim=128,  # the joint image-text embedding
             lm_width=128, lm_depth=2, lm_heads=2, lm_context=128)  # --method lm: the language model; its positions

# --recipe: what a real-scale run needs; a flag given on the command line wins over its recipe.
# clip_b16: open_clip's ViT-B-16 (a 512-wide, 12-block text tower, embeddings of 512) with its
# optimiser settings for that size, ITC alone (the BPE tokenizer has no [MASK] for ITM and MLM).
RECIPES = {"clip_b16": dict(vit="vit_b16", objectives="itc", lr=5e-4, weight_decay=0.2, warmup=10000,
                            model_kwargs="text_width=512,text_depth=12,text_heads=8,context_length=77,embed_dim=512")}


def apply_recipe(flags: dict, given: set) -> dict:
    """The parsed flags with --recipe's settings for every flag not given on the command line;
    sizes given with --model-kwargs change the recipe's one by one."""
    if flags["recipe"] and flags["recipe"] not in RECIPES:
        raise ValueError(f"--recipe {flags['recipe']} is unknown (choose {', '.join(RECIPES)})")
    recipe = RECIPES.get(flags["recipe"], {})
    out = {**flags, **{k: v for k, v in recipe.items() if k not in given}}
    if "model_kwargs" in given and "model_kwargs" in recipe:  # later sizes win (model_sizes)
        out["model_kwargs"] = recipe["model_kwargs"] + "," + flags["model_kwargs"]
    return out


def model_sizes(cfg) -> dict:
    """SIZES with --model-kwargs (e.g. "width=256,depth=6,text_width=256") applied."""
    sizes = dict(SIZES)
    for item in filter(None, (s.strip() for s in cfg.model_kwargs.split(","))):
        key, _, value = item.partition("=")
        if key.strip() not in SIZES or not value.strip().isdigit():
            raise ValueError(f"--model-kwargs {item!r}: give name=whole number, the names being {', '.join(SIZES)}")
        sizes[key.strip()] = int(value)
    return sizes


def check_flags(cfg):
    """Flag combinations that make no sense stop here, before anything is built."""
    if cfg.method not in METHODS:
        raise ValueError(f"--method {cfg.method} is unknown (choose from {', '.join(METHODS)})")
    if cfg.lr < 0:
        raise ValueError("--lr must not be negative")
    for name in ("steps", "batch_size", "accum", "train_size", "test_size", "log_every", "rank_images"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.amp not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"--amp {cfg.amp} is unknown (choose auto, bf16, fp16 or off)")
    captioning = cfg.method in ("lm", "evlgen")
    if cfg.init and cfg.bpe:
        raise ValueError("--init brings its tokenizer (and model): drop --bpe")
    if cfg.recipe and not (cfg.bpe or cfg.init):
        raise ValueError(f"--recipe {cfg.recipe} tokenizes with CLIP's BPE: give its vocabulary file with --bpe "
                         f"(bpe_simple_vocab_16e6.txt.gz, from OpenAI's CLIP repository)")
    if cfg.bpe and (cfg.method not in ("none", "elip", "evit", "tome") or set(objectives(cfg)) - {"itc"}):
        raise ValueError("--bpe is a CLIP's tokenizer for ITC alone (--objectives itc; --method none, elip, evit or "
                         "tome): ITM and MLM need the word tokenizer's [PAD] and [MASK]")
    if captioning and cfg.objectives != "auto":
        raise ValueError(f"--objectives is for CLIP; --method {cfg.method} has one loss, the LM's")
    if cfg.method == "evlgen" and not cfg.lm:
        raise ValueError("--method evlgen trains on a frozen language model: make one with "
                         "`python train.py --method lm --out lm` and pass --lm lm/ckpt.pt")
    evlgen_only = dict(lm=cfg.lm, clip=cfg.clip, stage1_steps=cfg.stage1_steps, bridge_pos=cfg.bridge_pos,
                       eval_every=cfg.eval_every, bridge_merge=cfg.bridge_merge != "mean")
    if cfg.method != "evlgen" and any(evlgen_only.values()):
        raise ValueError(f"--{next(k for k, v in evlgen_only.items() if v).replace('_', '-')} applies to the "
                         f"captioner, --method evlgen")
    if cfg.video and not captioning:
        raise ValueError("--video is for the captioner: --method lm (its language model) and --method evlgen")
    if not cfg.video and (cfg.frames != 4 or not cfg.temporal or cfg.frame_embed or cfg.temporal_lr_scale != 1.0):
        raise ValueError("--frames, --no-temporal, --frame-embed and --temporal-lr-scale apply with --video only")
    if cfg.video and cfg.zeroshot_dir:
        raise ValueError("--zeroshot-dir classifies images; a --video run is evaluated by captioning its clips")
    if cfg.video and data.is_shards(cfg.data):
        raise ValueError("--video reads clip folders listed in a caption file; shards hold images")
    if cfg.video and cfg.frames < 2:
        raise ValueError(f"--frames {cfg.frames}: a clip needs at least 2 frames")
    if cfg.bridge not in ("merge", "query"):
        raise ValueError(f"--bridge {cfg.bridge} is unknown (choose merge or query)")
    if cfg.bridge_pos and cfg.bridge != "merge":
        raise ValueError("--bridge-pos is a position embedding for the merging bridge: --bridge merge")
    if cfg.stage1_steps and cfg.bridge != "query":
        raise ValueError("--stage1-steps is BLIP-2's first stage for the learned queries: it needs --bridge query")
    if cfg.stage1_steps < 0 or cfg.bridge_r < 0 or cfg.eval_every < 0:
        raise ValueError("--stage1-steps, --bridge-r and --eval-every must not be negative")
    if cfg.bridge_merge not in MERGE_MODES:
        raise ValueError(f"--bridge-merge {cfg.bridge_merge} is unknown (choose {' or '.join(MERGE_MODES)})")
    if cfg.method != "elip" and (cfg.elip_lambda != 0.8 or not cfg.lookahead or cfg.rollout):
        raise ValueError("--elip-lambda, --no-lookahead and --rollout apply to --method elip only")
    if cfg.method != "elip" and cfg.elip_schedule:
        raise ValueError("--elip-schedule applies to --method elip only")
    if cfg.fused_prop_attn and cfg.method not in ("elip", "evit"):
        raise ValueError("--fused-prop-attn is for the fused token of --method elip or evit")
    if cfg.method == "ranking" and not (cfg.init or cfg.resume):
        raise ValueError("--method ranking prunes a trained CLIP: pass --init CKPT (from `python train.py`)")
    if cfg.init and cfg.resume:
        raise ValueError("--init starts a new run from a checkpoint's weights; --resume continues one: choose one")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: choose one")
    if cfg.val_data and not cfg.data:
        raise ValueError("--val-data is for real data: give the training captions with --data too")
    if cfg.data and not cfg.val_data and not cfg.zeroshot_dir and cfg.eval:
        raise ValueError("with --data, give --val-data and/or --zeroshot-dir to evaluate on, or pass --no-eval")


def objectives(cfg) -> tuple:
    if cfg.objectives == "auto":
        return ("itc",) if cfg.method == "none" else ("itc", "itm", "mlm")
    return tuple(o.strip() for o in cfg.objectives.split(",") if o.strip())


def model_config(cfg, vocab_size: int) -> CLIPConfig:
    s = model_sizes(cfg)
    vision = vit_config(cfg.vit, **{k: s[k] for k in ("image_size", "patch_size", "width", "depth", "heads") if s[k]})
    text = TextConfig(vocab_size=vocab_size, context_length=s["context_length"], width=s["text_width"],
                      depth=s["text_depth"], heads=s["text_heads"], causal=bool(cfg.bpe), pool="eot" if cfg.bpe else "cls")
    return CLIPConfig(vision=vision, text=text, embed_dim=s["embed_dim"], objectives=objectives(cfg))


def lm_config(cfg, vocab_size: int) -> LMConfig:
    s = model_sizes(cfg)
    return LMConfig(vocab_size=vocab_size, context_length=s["lm_context"], width=s["lm_width"], depth=s["lm_depth"],
                    heads=s["lm_heads"])


def captioner_config(cfg, sources: dict, vocab_size: int) -> CaptionerConfig:
    """The captioner: the LM's config from its checkpoint; the ViT and the bridge's blocks from the
    CLIP checkpoint when one is given (the ViT then frozen), else from the flags (the ViT trained)."""
    lm = LMConfig(**sources["lm"]["model_config"])
    if "clip" in sources:
        clip = CLIPConfig.from_dict(sources["clip"]["model_config"])
    else:
        clip = model_config(cfg, vocab_size)
    text = dataclasses.replace(clip.text, vocab_size=vocab_size, context_length=lm.context_length)  # the LM's words
    r, _ = merge_schedule(cfg.bridge_r, text.depth, 1 + clip.vision.num_patches)
    return CaptionerConfig(vision=clip.vision, lm=lm, text=text, bridge=cfg.bridge, bridge_depth=text.depth, r=tuple(r),
                           merge_mode=cfg.bridge_merge, prop_attn=cfg.bridge_merge == "wavg", bridge_pos=cfg.bridge_pos,
                           freeze_vit="clip" in sources, stage1=cfg.stage1_steps > 0, embed_dim=model_sizes(cfg)["embed_dim"],
                           frames=cfg.frames if cfg.video else 1, temporal=cfg.video and cfg.temporal,
                           frame_embed=cfg.frame_embed)


def init_config(cfg, ckpt: dict, path: str, say) -> CLIPConfig:
    """A CLIP that starts from --init (this project's, or one pretrained.py converted): the
    checkpoint's model, text tower and tokenizer, trained on this run's objectives, ITC alone
    where the tokenizer is CLIP's BPE (it has no [MASK] or [PAD] for ITM and MLM)."""
    expect_kind(ckpt, "clip", path, "--init", "a CLIP from `python train.py` or `python pretrained.py --openai`")
    bpe = ckpt["tokenizer"].get("kind") == "clip_bpe"
    wanted = ("itc",) if bpe and cfg.objectives == "auto" else objectives(cfg)
    if bpe and set(wanted) - {"itc"}:
        raise ValueError(f"--init {path} tokenizes with CLIP's BPE: train ITC alone (--objectives itc); ITM and "
                         f"MLM need the word tokenizer's [PAD] and [MASK]")
    if cfg.vit != "tiny64" or cfg.model_kwargs:
        say(f"--init {path} brings its model: --vit and --model-kwargs are not used")
    return dataclasses.replace(CLIPConfig.from_dict(ckpt["model_config"]), objectives=wanted)


def ranking_config(cfg, ckpt: dict, path: str) -> RankingConfig:
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
    return RankingConfig(clip=clip, layer=layer, keep=cfg.rank_keep, fuse=cfg.rank_fuse)


def expect_kind(ckpt: dict, kind: str, path: str, flag: str, how: str):
    got = ckpt.get("kind", "clip")
    if got != kind:
        raise DataError(f"{flag} {path} is a {got} checkpoint, not a {kind} one ({how})")


def config_differences(saved: dict, current: dict, prefix="") -> list:
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, prefix + k + ".")
        elif json.dumps(a) != json.dumps(b):  # tuples and lists alike
            out.append(f"{prefix}{k}: checkpoint {a!r}, flags {b!r}")
    return out


# the flags that decide what a run trains on, and in what order: a resumed run must keep them
DATA_FLAGS = ("data", "image_root", "train_size", "video", "frames", "seed")


def check_same_run(cfg, ckpt: dict, path: str):
    """A resumed run continues on the data it started with, never silently on other data."""
    saved = type(cfg).from_checkpoint(ckpt)
    pairs = [(f"--{name.replace('_', '-')}", getattr(saved, name), getattr(cfg, name)) for name in DATA_FLAGS]
    for flag, then, now in pairs:
        if then != now:
            raise ValueError(f"--resume: {path} was trained with {flag} {then!r}, this run has {now!r}; "
                             f"resume with the flags it started with")


def csv_keys(cfg) -> tuple:
    """(image column, caption column) of a CSV/TSV with a header, or () for its first two columns."""
    if bool(cfg.csv_img_key) != bool(cfg.csv_caption_key):
        raise ValueError("give both --csv-img-key and --csv-caption-key (the header's names), or neither")
    return (cfg.csv_img_key, cfg.csv_caption_key) if cfg.csv_img_key else ()


def scene_seed(cfg, ckpt) -> int:
    """The shapes scenes' seed: --seed's, but Patch Ranking's runs train and test on the scenes of
    the CLIP they prune (so its seeds share that CLIP's data), and a resumed run on its own."""
    if ckpt is not None and (cfg.resume or cfg.method == "ranking"):
        return trained_on(ckpt)["scene_seed"]
    return cfg.seed


def build_data(cfg, image_size: int, patch_size: int, scenes: int):
    if cfg.video:
        if cfg.data:
            return data.VideoCaptionDataset(cfg.data, cfg.image_root, image_size, cfg.frames, cfg.skip_bad)
        return shapes.ShapesVideoDataset("train", cfg.train_size, image_size, patch_size, scenes, cfg.frames,
                                         cache=True)
    if cfg.data:
        return data.image_text_pairs(cfg.data, cfg.image_root, image_size, cfg.skip_bad, csv_keys(cfg))
    return shapes.ShapesDataset("train", cfg.train_size, image_size, patch_size, scenes, cache=True)


def read_bpe(path: str, context_length: int) -> CLIPTokenizer:
    try:
        return CLIPTokenizer.from_file(path, context_length=context_length)
    except (OSError, EOFError, ValueError, KeyError) as e:
        raise DataError(f"--bpe {path} cannot be read as CLIP's BPE vocabulary: {e}") from None


def check_output(cfg):
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    for name in ("ckpt.pt", "log.jsonl"):
        path = os.path.join(cfg.out, name)
        if os.path.exists(path) and not (cfg.resume or cfg.overwrite):
            raise ValueError(f"{path} exists: pass --resume to continue it or --overwrite to replace it")
    if cfg.resume and not os.path.exists(ckpt_path):
        raise ValueError(f"--resume: there is no checkpoint at {ckpt_path}")


def check_reducer(cfg, vision, say):
    """The method's schedule fits the ViT (said for ToMe, whose r may be capped)."""
    if cfg.method == "elip":
        schedule = elip_schedule(cfg, vision.depth)
        schedule.validate(vision.depth, vision.num_patches)
        if not cfg.lookahead and schedule.begin_layers[0] < 1:
            raise ValueError("--no-lookahead needs the first pruning stage at block 1 or later")
    elif cfg.method == "tome":
        r, note = tome_schedule(cfg, vision.depth, 1 + vision.num_patches)
        say(f"ToMe merges {sum(r)} tokens: r per block {r}" + (f" ({note})" if note else ""))


def read_sources(cfg) -> dict:
    """The checkpoints the captioner starts from: {"lm": ..., "clip": ...}."""
    sources = {"lm": read_checkpoint(cfg.lm)}
    expect_kind(sources["lm"], "lm", cfg.lm, "--lm", "make one with `python train.py --method lm`")
    if type(cfg).from_checkpoint(sources["lm"]).video != cfg.video:
        kind = "video" if cfg.video else "image"
        raise ValueError(f"--lm {cfg.lm} was trained on {'image' if cfg.video else 'video'} captions; a {kind} "
                         f"captioner needs a language model of {kind} captions: `python train.py --method lm"
                         f"{' --video' if cfg.video else ''}`")
    if cfg.clip:
        sources["clip"] = read_checkpoint(cfg.clip)
        expect_kind(sources["clip"], "clip", cfg.clip, "--clip", "train one with `python train.py --method none`")
    return sources


def prepare(cfg, rank: int):
    """Everything a user can get wrong is checked here, before training: flags, output folder,
    data, checkpoints, evaluation sets. Returns (dataset, tokenizer, model config, checkpoint to
    resume or start from or None, evaluation sets or None, {"lm": ..., "clip": ...} checkpoints
    the captioner starts from)."""
    check_flags(cfg)
    check_output(cfg)
    say = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    probe = model_config(cfg, vocab_size=1)  # validates the sizes and objectives before data is read
    lm_config(cfg, vocab_size=1)
    sources = read_sources(cfg) if cfg.method == "evlgen" else {}
    if sources:
        probe = captioner_config(cfg, sources, vocab_size=1)
    source = os.path.join(cfg.out, "ckpt.pt") if cfg.resume else cfg.init
    ckpt, vit_state = read_init(cfg, source) if source else (None, None)
    if vit_state is not None:  # a ViT's weights: the image tower starts from them, the rest fresh
        sources["vit"] = vit_state
    if not (cfg.init and ckpt is not None and cfg.method in CLIP_METHODS):  # else against --init's ViT below
        check_reducer(cfg, probe.vision, say)
    if cfg.resume:
        check_same_run(cfg, ckpt, source)
    if cfg.method == "ranking":  # the images are the size the CLIP of --init was trained at
        probe = ranking_config(cfg, ckpt, source).clip
    elif cfg.init and cfg.method in CLIP_METHODS and ckpt is not None:
        probe = init_config(cfg, ckpt, source, say)
        check_reducer(cfg, probe.vision, say)  # against --init's ViT
    dataset = build_data(cfg, probe.vision.image_size, probe.vision.patch_size, scene_seed(cfg, ckpt))
    if ckpt is not None:
        tokenizer = Tokenizer.from_state_dict(ckpt["tokenizer"])
    elif "lm" in sources:  # the frozen LM decides the vocabulary
        tokenizer = Tokenizer.from_state_dict(sources["lm"]["tokenizer"])
    elif cfg.bpe:
        tokenizer = read_bpe(cfg.bpe, model_sizes(cfg)["context_length"])
    elif cfg.method == "lm":  # all the text it trains on, at the LM's context
        texts = (t for i in range(len(dataset)) for t in lm_texts(dataset, i))
        tokenizer = Tokenizer.build(texts, model_sizes(cfg)["lm_context"])
    else:
        captions = (c for i in range(len(dataset)) for c in dataset.captions(i))
        tokenizer = Tokenizer.build(captions, model_sizes(cfg)["context_length"])
    if "lm" in sources:
        check_vocabularies(tokenizer, sources, source)
        mcfg = captioner_config(cfg, sources, len(tokenizer))
        if cfg.bridge == "merge":
            N = 1 + mcfg.vision.num_patches
            note = merge_schedule(cfg.bridge_r, mcfg.bridge_depth, N)[1]
            say(f"bridge: {N} visual tokens, r per layer {list(mcfg.r)} -> {N - sum(mcfg.r)} tokens into the LM"
                + (f" ({note})" if note else ""))
    elif cfg.method == "ranking":
        mcfg = ranking_config(cfg, ckpt, source)
    elif cfg.init and cfg.method in CLIP_METHODS and ckpt is not None:
        mcfg = probe
    elif cfg.method == "lm":
        mcfg = lm_config(cfg, len(tokenizer))
    else:
        mcfg = model_config(cfg, len(tokenizer))
    if ckpt is not None and not (cfg.init and cfg.method in ("ranking", *CLIP_METHODS)):  # the model is --init's
        diffs = config_differences(ckpt["model_config"], dataclasses.asdict(mcfg))
        if diffs:
            raise ValueError(f"{source} is from another model config ({'; '.join(diffs)})")
    sets = None
    if cfg.eval and (rank == 0 or cfg.eval_every):  # every rank computes a learning curve's points
        sets = evaluation.eval_sets(probe.vision.image_size, probe.vision.patch_size, scene_seed(cfg, ckpt), cfg.test_size,
                                    cfg.val_data, cfg.image_root, cfg.zeroshot_dir, cfg.skip_bad,
                                    cfg.frames if cfg.video else 0, csv_keys(cfg))
    return dataset, tokenizer, mcfg, ckpt, sets, sources


def describe(cfg, model, dataset, world: int, device):
    """The run in one line: what is trained, on how much data, in what batch, where."""
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained) | {len(dataset)} training "
          f"{'captions' if cfg.method == 'lm' else 'clips' if cfg.video else 'images'} | global batch "
          f"{cfg.batch_size * world * cfg.accum} = {cfg.batch_size} x {world} process(es) x {cfg.accum} "
          f"accumulation | {device} | amp {cfg.amp}", flush=True)
    if getattr(dataset, "missing", 0):
        print(f"--skip-bad: {dataset.missing} image(s) listed in {cfg.data} do not exist and were skipped", flush=True)


def read_init(cfg, path: str) -> tuple:
    """(checkpoint, None) for a train.py checkpoint; (None, state dict) for a ViT's weights in
    timm's layout (a state dict or .safetensors), which start the image tower of a CLIP."""
    ckpt = None if path.endswith(".safetensors") else read_checkpoint(path)
    if ckpt is not None and ("model_config" in ckpt or cfg.resume):
        return ckpt, None
    if cfg.method not in CLIP_METHODS:
        raise ValueError(f"--init {path} is not a train.py checkpoint: a ViT's weights start the image tower of a "
                         f"CLIP (--method none, elip, evit or tome)")
    weights = read_weights(path)
    if "patch_embed.proj.weight" not in weights:
        raise ValueError(f"--init {path} is neither a train.py checkpoint nor a ViT's weights in timm's layout "
                         f"(no patch_embed.proj.weight)")
    return None, weights


def same_data_everywhere(dataset, world: int):
    """Every rank trains on rank 0's list of samples (after --skip-bad dropped the missing ones):
    ranks that filtered on their own could train on different images without a word."""
    if world > 1 and hasattr(dataset, "items"):
        shared = [(dataset.items, dataset.missing)]
        dist.broadcast_object_list(shared, src=0)  # on the group's device (NCCL: this rank's GPU)
        dataset.items, dataset.missing = shared[0]
