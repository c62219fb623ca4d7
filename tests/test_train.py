import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import prepare
import train
from model import CLIP, CLIPConfig
from train import EpochPermutations, TrainConfig, micro_batch_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --device cpu: the same test on a GPU machine too (two processes on one GPU would fail, and bf16
# autocast, the default on CUDA, would break the tolerances of the comparisons)
SIZES = dict(width=32, depth=2, heads=2, text_width=32, text_depth=1, embed_dim=16, lm_width=32, lm_depth=1)


def tiny(**sizes) -> list:
    """The flags of a tiny run, its model sizes (--model-kwargs) SIZES with `sizes` changed."""
    kwargs = ",".join(f"{k}={v}" for k, v in {**SIZES, **sizes}.items())
    return ["--model-kwargs", kwargs, "--train-size", "64", "--test-size", "20", "--warmup", "2", "--log-every", "1",
            "--device", "cpu"]


TINY = tiny()


def run(args, **kw):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, **kw)


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_rank_slices_concatenate_to_the_single_process_batch():
    stream = EpochPermutations(10, seed=0)
    one = micro_batch_keys(stream, 1, 4, rank=0, world=1)
    two = micro_batch_keys(stream, 1, 2, rank=0, world=2) + micro_batch_keys(stream, 1, 2, rank=1, world=2)
    assert one == two and [pos for _, pos in one] == [4, 5, 6, 7]
    epoch = [stream[p] for p in range(10)]
    assert sorted(epoch) == list(range(10)) and epoch != [stream[p] for p in range(10, 20)]


def test_learning_rate_schedule():
    assert train.cosine_lr(0, 100, 1.0, 0.1, 10) == pytest.approx(0.1)
    assert train.cosine_lr(9, 100, 1.0, 0.1, 10) == pytest.approx(1.0)
    assert train.cosine_lr(55, 100, 1.0, 0.1, 10) == pytest.approx(0.55)  # half-way through the cosine
    assert train.cosine_lr(100, 100, 1.0, 0.1, 10) == pytest.approx(0.1)
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0)
    assert train.lr_at(55, cfg) == pytest.approx(train.cosine_lr(55, 100, 1.0, train.MIN_LR, 10))


def test_learning_rate_default_depends_on_the_method_and_a_flag_overrides_it():
    assert train.parse_args([]).lr == 1e-3
    assert train.parse_args(["--method", "ranking"]).lr == train.RANKING_LR  # only its tokens train
    assert train.parse_args(["--method", "ranking", "--lr", "5e-4"]).lr == 5e-4
    with pytest.raises(ValueError, match="--lr"):
        prepare.check_flags(train.parse_args(["--lr", "-1"]))


def test_model_kwargs_set_the_sizes_and_a_bad_one_names_the_flag():
    cfg = train.parse_args(["--model-kwargs", "width=48, depth=3,text_depth=1,lm_width=64"])
    clip = prepare.model_config(cfg, 20)
    assert (clip.vision.width, clip.vision.depth, clip.vision.heads) == (48, 3, 4)  # heads: tiny64's
    assert (clip.text.width, clip.text.depth, clip.embed_dim) == (128, 1, 128)  # the defaults where not given
    assert prepare.lm_config(cfg, 20).width == 64
    for bad in ("widht=32", "width=3.5", "width"):
        with pytest.raises(ValueError, match=f"--model-kwargs '{bad}': give name=whole number"):
            prepare.model_config(train.parse_args(["--model-kwargs", bad]), 20)


def test_weight_decay_groups_match_the_names_written_out():
    """Catches a weight-decay rule that decays a norm, a bias, an embedding or the temperature, or
    exempts a linear layer's weight, checked against the list of names written out by hand."""
    from model import CLIP
    model = CLIP(prepare.model_config(TrainConfig(model_kwargs="width=32,depth=1,heads=2,text_width=32,text_depth=1"), 20))
    groups = train.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    linear = [f"{tower}.blocks.0.{layer}.weight" for tower in ("visual", "text")
              for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert decayed == {*linear, "visual_proj.weight", "text_proj.weight"}
    exempt = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert exempt == set(names.values()) - decayed and {"logit_scale", "visual.pos_embed", "visual.cls_token",
        "visual.patch_embed.proj.weight", "text.token_embedding.weight", "visual.blocks.0.norm1.weight"} <= exempt


def test_micro_run_end_to_end_and_eval_cli(tmp_path):
    out = str(tmp_path / "run")
    r = run([*TINY, "--steps", "4", "--batch-size", "8", "--out", out])
    assert r.returncode == 0, r.stderr
    assert "results: method none | step 4" in r.stdout and "image_to_text_R@1" in r.stdout
    assert os.path.exists(os.path.join(out, "ckpt.pt")) and not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert {"config", "model_config", "model", "optimizer", "scaler", "step", "tokenizer"} <= set(ckpt)
    e = subprocess.run([sys.executable, "eval.py", "--ckpt", os.path.join(out, "ckpt.pt"), "--json", "--n-test", "20"],
                       cwd=ROOT, capture_output=True, text=True)
    assert e.returncode == 0, e.stderr
    metrics = json.loads(e.stdout)
    assert {"image_to_text_R@1", "text_to_image_R@5", "image_to_text_R@10", "zeroshot_top1"} <= set(metrics)
    assert all(0 <= v <= 1 for v in metrics.values())


def test_elip_and_evit_train_and_evaluate_pruned(tmp_path):
    for method in ("elip", "evit"):
        r = run([*tiny(depth=6), "--method", method, "--steps", "3", "--batch-size", "8",
                 "--out", str(tmp_path / method)])
        assert r.returncode == 0, r.stderr
        assert f"results: method {method} | step 3" in r.stdout
        assert set(losses(str(tmp_path / method))) == {1, 2, 3}
    e = subprocess.run([sys.executable, "eval.py", "--ckpt", str(tmp_path / "elip" / "ckpt.pt"), "--prune", "--json",
                        "--relevance", "--itm-rerank", "4", "--n-test", "20"], cwd=ROOT, capture_output=True, text=True)
    assert e.returncode == 0, e.stderr
    metrics = json.loads(e.stdout)
    assert set(metrics["token_relevance"]) == {"elip", "elip_no_text", "elip_no_lookahead", "evit_scoring",
                                               "random"}  # trained as published: no rollout to leave out
    assert len(metrics["token_relevance"]["elip"]["coverage"]) == 3 and "itm_image_to_text_R@1" in metrics
    for flag in ("--no-lookahead", "--rollout"):
        r = run([*TINY, "--method", "evit", flag, "--out", str(tmp_path / "x")])
        assert r.returncode != 0 and "apply to --method elip only" in r.stderr
    six = [*tiny(depth=6), "--method", "elip", "--out", str(tmp_path / "y")]
    r = run([*six, "--elip-schedule", "1:2:0.9,2:1:0.5"])
    assert r.returncode != 0 and "schedule stage 1 (begin 2) overlaps stage 0 (blocks 1..2)" in r.stderr
    r = run([*six, "--elip-schedule", "1:9:0.5"])
    assert r.returncode != 0 and "schedule stage 0: blocks 1..9 run past the depth 6" in r.stderr
    r = run([*six, "--elip-schedule", "1:1:0.1,3:1:0.5"])
    assert r.returncode != 0 and "schedule stage 1: keeps 32 tokens but only 7 exist there" in r.stderr
    r = run([*six, "--elip-schedule", "1:1:0.9,3-1-0.5"])
    assert r.returncode != 0 and "give begin:blocks:keep per stage" in r.stderr
    r = run([*six, "--elip-schedule", "1:1:0.9,3:1:0.5", "--steps", "2", "--batch-size", "4", "--no-eval"])
    assert r.returncode == 0, r.stderr
    from checkpoint import elip_schedule, reducer_config  # a checkpoint of the three lists it replaced
    old = reducer_config({"config": dict(method="elip", begin_layers="1,3", num_layers="1,1", keep_ratios="0.9,0.5")})
    assert elip_schedule(old, 6) == elip_schedule(reducer_config(torch.load(
        tmp_path / "y" / "ckpt.pt", weights_only=True)), 6) == elip_schedule(train.parse_args(
        ["--elip-schedule", "1:1:0.9,3:1:0.5"]), 6)


def test_the_defaults_are_the_papers_and_each_addition_of_ours_is_a_flag():
    """Catches a default that is not the published method, or a CLI default that differs from the
    class it configures: ELIP's fused token with proportional attention or rollout, ELIP pruning
    only after a warm-up (EViT's has one), Patch Ranking fusing, EVLGen merging size-weighted."""
    from captioner import CaptionerConfig
    from elip import ELIP, scaled_schedule
    from merge import MergingBridge
    from model import RankingConfig
    from text import LMConfig
    vision = prepare.model_config(TrainConfig(), 30).vision
    elip = train.reducer_fn(TrainConfig(method="elip", steps=100), vision, 0)(torch.zeros(2, vision.width))
    paper = ELIP(scaled_schedule(vision.depth), vision.num_patches)
    assert (elip.prop_attn, elip.rollout, elip.lam, elip.stages) == (False, False, 0.8, paper.stages)
    assert (paper.prop_attn, paper.rollout) == (False, False)
    evit_first = train.reducer_fn(TrainConfig(method="evit", steps=100), vision, 0)(None)
    evit_done = train.reducer_fn(TrainConfig(method="evit", steps=100), vision, 10)(None)
    assert not evit_first.prop_attn and evit_first.stages != evit_done.stages  # EViT's keep rate warms up
    ours = train.reducer_fn(TrainConfig(method="elip", fused_prop_attn=True, rollout=True), vision, 0)(None)
    assert ours.prop_attn and ours.rollout
    assert TrainConfig().rank_fuse is RankingConfig().fuse is False
    lm = dict(model_config=vars(LMConfig(vocab_size=30, context_length=64)))
    bridge = prepare.captioner_config(TrainConfig(method="evlgen", lm="x"), dict(lm=lm), 30)
    default = MergingBridge(8, 8, 1, 2, [0])
    assert (bridge.merge_mode, bridge.prop_attn) == (CaptionerConfig.merge_mode, CaptionerConfig.prop_attn) \
        == (default.merger.mode, default.merger.prop_attn) == ("mean", False)
    wavg = prepare.captioner_config(TrainConfig(method="evlgen", lm="x", bridge_merge="wavg"), dict(lm=lm), 30)
    assert (wavg.merge_mode, wavg.prop_attn) == ("wavg", True)
    before = {"config": {"method": "elip", "steps": 300}}  # a checkpoint written before the flags existed
    assert not train.TrainConfig.from_checkpoint(before).fused_prop_attn and not train.TrainConfig.from_checkpoint(before).rollout
    assert train.TrainConfig.from_checkpoint({"config": {"method": "elip", "fused_prop_attn": True}}).fused_prop_attn
    from merge import TemporalContext
    assert TrainConfig().frame_embed is CaptionerConfig.frame_embed is False  # the contextualizer as published
    assert TemporalContext(1, 8, 2, 4).layers[0].frame_embed is None
    for flags, message in ((["--method", "tome", "--fused-prop-attn"], "--fused-prop-attn is for the fused token"),
                           (["--method", "elip", "--bridge-pos"], "--bridge-pos applies to the captioner"),
                           (["--method", "elip", "--bridge-merge", "wavg"], "--bridge-merge applies to the captioner")):
        with pytest.raises(ValueError, match=re.escape(message)):  # never silently ignored
            prepare.check_flags(train.parse_args(flags))


def test_checkpoints_of_removed_studies_are_refused_where_they_would_be_misread():
    from captioner import CaptionerConfig
    from checkpoint import trained_on
    from data import DataError
    saved = {"config": {"method": "elip", "prune_until": 0.9, "seed": 2}}  # a removed flag that evaluation ignores
    assert TrainConfig.from_checkpoint(saved).seed == 2 and trained_on(saved)["scene_seed"] == 2
    with pytest.raises(DataError, match="--motion-marker, a study since removed"):
        trained_on({"config": {"method": "evlgen", "video": True, "motion_marker": True}})
    captioner = dataclasses.asdict(CaptionerConfig())
    assert CaptionerConfig.from_dict({**captioner, "temporal_causal": False, "weighted_words": []}) == CaptionerConfig()
    for key, value in (("temporal_causal", True), ("weighted_words", [3, 4]), ("word_weight", 5.0)):
        with pytest.raises(DataError, match=f"trained with {key}="):
            CaptionerConfig.from_dict({**captioner, key: value})


def test_init_starts_from_a_checkpoints_weights(tmp_path):
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    common = [*tiny(depth=6), "--batch-size", "8", "--no-eval"]
    assert run([*common, "--steps", "3", "--out", first]).returncode == 0
    r = run([*common, "--steps", "2", "--method", "elip", "--objectives", "itc", "--init", f"{first}/ckpt.pt",
             "--out", second, "--stop-after", "1"])
    assert r.returncode == 0, r.stderr
    a = torch.load(f"{first}/ckpt.pt", weights_only=True)
    b = torch.load(f"{second}/ckpt.pt", weights_only=True)
    assert b["step"] == 1 and b["tokenizer"] == a["tokenizer"]
    moved = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert moved and all((a["model"][k] - b["model"][k]).abs().max() < 0.05 for k in moved)  # one small step away
    # the model is --init's whatever the size flags say; ITM and MLM heads it lacks start fresh
    r = run([*TINY, "--batch-size", "8", "--no-eval", "--steps", "1", "--method", "elip", "--init", f"{first}/ckpt.pt",
             "--out", str(tmp_path / "c")])
    assert r.returncode == 0 and "brings its model: --vit and --model-kwargs are not used" in r.stdout, r.stderr
    c = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)
    assert c["model_config"]["vision"]["depth"] == 6 and list(c["model_config"]["objectives"]) == ["itc", "itm", "mlm"]
    assert {"itm_head.weight", "mlm_head.weight"} <= set(c["model"]) - set(a["model"])


@pytest.mark.parametrize("method", ["none", "elip"])
def test_resume_ends_with_the_same_weights_to_the_bit(tmp_path, method):
    """Catches a resumed run that drifts from the uninterrupted one: MLM masks, ITM negatives or the
    data order not replayed, or an op whose result depends on thread timing (the ITM negatives'
    x[idx] backward did): two runs with ITC+ITM+MLM, one stopped and resumed, end bit-identical."""
    common = [*tiny(depth=6), "--method", method, "--objectives", "itc,itm,mlm",
              "--steps", "6", "--batch-size", "8", "--amp", "off", "--no-eval"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.train(train.parse_args([*common, "--out", full]))
    train.train(train.parse_args([*common, "--out", part, "--stop-after", "3"]))
    assert torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)["step"] == 3
    train.train(train.parse_args([*common, "--out", part, "--resume"]))
    a, b = losses(full), losses(part)
    assert sorted(a) == list(range(1, 7)) and sorted(b) == list(range(1, 7))
    assert all(a[step] == b[step] for step in a)
    wa = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)["model"]
    wb = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    if method == "elip":
        for other in (["--train-size", "32"], ["--seed", "5"]):  # other data or order: refused, not continued silently
            with pytest.raises(SystemExit, match="--resume: .* was trained with"):
                train.train(train.parse_args([*common, "--out", part, "--resume", "--steps", "8", *other]))


def test_itm_gradients_do_not_depend_on_thread_timing():
    """Catches gathering the ITM negatives with x[idx], whose CPU backward adds repeated rows in a
    thread-dependent order (runs then differ by ~1e-6 after a few steps): the same backward,
    repeated with several threads, must give the same gradient to the bit."""
    from model import matching_loss
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        torch.manual_seed(0)
        image_tokens = torch.randn(16, 65, 128, requires_grad=True)
        text_tokens = torch.randn(16, 65, 128, requires_grad=True)
        ids = torch.zeros(16, 65, dtype=torch.long)
        sim = torch.zeros(16, 16)
        sim[:, :2] = 30.0  # every row draws its negative from two columns: many repeated rows
        # a stand-in head where an image's gradient depends on the text it is paired with, so the
        # repeated rows' contributions differ and their order of addition shows
        head = lambda images, texts, ids: torch.stack([images.mean(1) @ texts.mean(1).T[:, 0],
                                                       (images.mean(1) * texts.mean(1)).sum(1)], 1)

        def grads():
            image_tokens.grad = text_tokens.grad = None
            matching_loss(head, image_tokens, text_tokens, ids, sim, torch.Generator().manual_seed(0)).backward()
            return image_tokens.grad.clone(), text_tokens.grad.clone()

        first = grads()
        for _ in range(40):
            assert all(torch.equal(a, b) for a, b in zip(first, grads()))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("method", ["none", "elip"])
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, method):
    """2 processes x batch 4 train as 1 x 8: ITC over the gathered batch, and (elip) ITM's hard
    negatives and MLM's masks drawn over the global batch. Every collective's tensor is checked to
    be on the model's device (tests/collectives_on_the_model_device.py)."""
    common = [*tiny(depth=6), "--method", method, "--objectives", "itc" if method == "none" else "itc,itm,mlm",
              "--steps", "3", "--no-eval", "--lr", "3e-3", "--amp", "off"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r = run([*common, "--batch-size", "8", "--out", one])
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "tests/collectives_on_the_model_device.py", "cpu", *common, "--batch-size", "4", "--out", two],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "collectives checked:" in r.stdout and "all_gather" in r.stdout and "all_reduce" in r.stdout
    p1 = torch.load(os.path.join(one, "ckpt.pt"), weights_only=True)["model"]
    p2 = torch.load(os.path.join(two, "ckpt.pt"), weights_only=True)["model"]
    start = CLIP(CLIPConfig.from_dict(torch.load(os.path.join(one, "ckpt.pt"), weights_only=True)["model_config"]))
    moved = max((p1[k] - v).abs().max().item() for k, v in start.state_dict().items())
    assert moved > 1e-3  # training really changed the weights...
    # ...and both runs changed them the same way, up to float32 sums in another order that AdamW's
    # normalised steps carry into the weights (per-rank masks and negatives were 5e-3 apart for elip)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], atol=2e-5 if method == "none" else 1e-4, rtol=1e-4, msg=k)
    l1, l2 = losses(one), losses(two)
    for step in l1:
        assert abs(l1[step] - l2[step]) < 1e-4  # the logged loss is the global batch's


def test_bad_flags_stop_with_one_sentence(tmp_path):
    out = str(tmp_path / "run")
    assert run([*TINY, "--steps", "1", "--batch-size", "4", "--out", out, "--no-eval"]).returncode == 0
    r = run([*TINY, "--steps", "1", "--out", out])
    assert r.returncode != 0 and "exists: pass --resume to continue it or --overwrite" in r.stderr
    r = run([*tiny(width=48), "--steps", "2", "--out", out, "--resume"])
    assert r.returncode != 0 and "from another model config (vision.width: checkpoint 32, flags 48)" in r.stderr
    r = run([*tiny(image_size=60), "--out", str(tmp_path / "x")])
    assert r.returncode != 0 and "image size 60 is not divisible by patch size 8" in r.stderr
    r = run(["--method", "magic", "--out", str(tmp_path / "y")])
    assert r.returncode != 0 and "--method magic is unknown" in r.stderr
    r = run(["--data", str(tmp_path / "nope.json"), "--no-eval", "--out", str(tmp_path / "z")])
    assert r.returncode != 0 and "nope.json does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_own_data_with_augmentation_accumulation_and_amp(tmp_path):
    """A caption CSV with a missing image (skipped and reported), class folders for zero-shot,
    gradient accumulation, and the bf16 and fp16 (GradScaler) paths, on the CPU."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    lines = ["image,caption"]
    for c, colour in enumerate(("red", "blue")):
        (tmp_path / "classes" / colour).mkdir(parents=True)
        for i in range(6):
            img = Image.fromarray(np.clip(rng.normal(60 + 120 * c, 20, (40, 48, 3)), 0, 255).astype(np.uint8))
            img.save(tmp_path / f"{colour}{i}.png")
            img.save(tmp_path / "classes" / colour / f"{i}.png")
            lines.append(f"{colour}{i}.png,a {colour} picture")
    lines.append("gone.png,a lost picture")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    common = [*tiny(image_size=32)[:2], "--data", str(tmp_path / "train.csv"),
              "--image-root", str(tmp_path), "--steps", "2", "--batch-size", "4", "--warmup", "1", "--device", "cpu"]
    r = run([*common, "--skip-bad", "--accum", "2", "--val-data", str(tmp_path / "train.csv"),
             "--zeroshot-dir", str(tmp_path / "classes"), "--out", str(tmp_path / "a")])
    assert r.returncode == 0, r.stderr
    assert "1 image(s) listed in" in r.stdout and "zeroshot_top1" in r.stdout
    for amp in ("bf16", "fp16"):
        r = run([*common, "--skip-bad", "--amp", amp, "--no-eval", "--out", str(tmp_path / amp)])
        assert r.returncode == 0, r.stderr
        assert all(np.isfinite(v) for v in losses(str(tmp_path / amp)).values())
    r = run([*common, "--no-eval", "--out", str(tmp_path / "c")])
    assert r.returncode != 0 and "gone.png" in r.stderr and "line 14) does not exist" in r.stderr


def test_every_flag_has_a_group_and_a_one_line_help():
    """Catches a flag added without the comment that documents it (its help is read from there)."""
    docs = train.field_docs(train.ReducerConfig, TrainConfig)
    assert set(docs) == {f.name for f in train.fields(TrainConfig)}
    assert all(help_text for _, help_text in docs.values()), [k for k, (_, h) in docs.items() if not h]
    assert len({group for group, _ in docs.values()}) >= 8


def rank_with_its_own_files(rank, world, init_file, folder, out_file):
    """One rank of the test below: rank 1 cannot see one of the images rank 0 sees."""
    import torch.distributed as dist
    import data
    from prepare import same_data_everywhere
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    if rank == 1:  # as a node whose view of the shared filesystem lacks the file
        data.CaptionDataset.exists = lambda self, path: os.path.isfile(path) and not path.endswith("b.png")
    dataset = data.CaptionDataset(os.path.join(folder, "caps.csv"), folder, 16, skip_bad=True)
    own = [g["path"] for g in dataset.items]
    same_data_everywhere(dataset, world)
    torch.save(dict(own=own, shared=[g["path"] for g in dataset.items], missing=dataset.missing), f"{out_file}{rank}")
    dist.destroy_process_group()


def test_every_rank_trains_on_rank_0s_list_of_samples(tmp_path):
    """Catches ranks that filter missing images (--skip-bad) each on their own: on nodes that see
    different files they would train on different datasets without a word."""
    import torch.multiprocessing as mp
    from PIL import Image
    for name in ("a", "b", "c"):
        Image.new("RGB", (20, 20), (40, 90, 200)).save(tmp_path / f"{name}.png")
    (tmp_path / "caps.csv").write_text("a.png,one\nb.png,two\nc.png,three\n")
    mp.spawn(rank_with_its_own_files, args=(2, str(tmp_path / "init"), str(tmp_path), str(tmp_path / "out")), nprocs=2)
    zero, one = (torch.load(tmp_path / f"out{r}", weights_only=False) for r in (0, 1))
    assert len(zero["own"]) == 3 and len(one["own"]) == 2  # each rank saw its own files...
    assert zero["shared"] == one["shared"] == zero["own"] and one["missing"] == 0  # ...and trains on rank 0's


def test_training_on_webdataset_shards_alone_and_under_torchrun(tmp_path):
    from test_data import jpeg_bytes, write_shard
    for s in range(2):
        write_shard(tmp_path / f"{s:05d}.tar", [(f"{s}{k:03d}", jpeg_bytes(10 * s + k), f"a picture of {k % 3} things")
                                               for k in range(8)])
    shards = str(tmp_path / "{00000..00001}.tar")
    common = [*tiny(image_size=32), "--data", shards, "--steps", "2", "--batch-size", "4", "--warmup", "1"]
    r = run([*common, "--val-data", shards, "--test-size", "8", "--out", str(tmp_path / "one")])
    assert r.returncode == 0, r.stderr
    assert "16 training images" in r.stdout and "image_to_text_R@1" in r.stdout
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *common, "--batch-size", "2", "--no-eval", "--out", str(tmp_path / "two")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = run([*common, "--data", str(tmp_path / "{00000..00002}.tar"), "--no-eval", "--out", str(tmp_path / "x")])
    assert r.returncode != 0 and "00002.tar does not exist" in r.stderr and "Traceback" not in r.stderr


def write_clip_bpe(path, merges=("r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>")):
    import gzip
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\"bpe_simple_vocab_16e6.txt#version: 0.2\n" + "\n".join(merges) + "\n")


def test_the_recipe_fills_the_flags_not_given_and_trains_with_clips_bpe(tmp_path):
    cfg = train.parse_args(["--recipe", "clip_b16", "--bpe", "v.gz", "--lr", "1e-4"])
    assert (cfg.vit, cfg.objectives, cfg.weight_decay, cfg.warmup, cfg.lr) == ("vit_b16", "itc", 0.2, 10000, 1e-4)
    clip = prepare.model_config(cfg, 49408)
    assert (clip.text.width, clip.text.depth, clip.text.heads, clip.text.context_length, clip.embed_dim) == (512, 12, 8, 77, 512)
    assert clip.text.causal and clip.text.pool == "eot" and (clip.vision.width, clip.vision.depth) == (768, 12)
    sized = prepare.model_config(train.parse_args(["--recipe", "clip_b16", "--model-kwargs", "image_size=256"]), 9)
    assert (sized.vision.image_size, sized.text.width, sized.embed_dim) == (256, 512, 512)  # the recipe's, one changed
    r = run(["--recipe", "clip_b99", "--out", str(tmp_path / "a")])
    assert r.returncode != 0 and "--recipe clip_b99 is unknown (choose clip_b16)" in r.stderr
    r = run(["--recipe", "clip_b16", "--out", str(tmp_path / "a")])
    assert r.returncode != 0 and "give its vocabulary file with --bpe" in r.stderr and "Traceback" not in r.stderr
    write_clip_bpe(tmp_path / "bpe.txt.gz")
    bpe = ["--bpe", str(tmp_path / "bpe.txt.gz")]
    r = run([*TINY, *bpe, "--method", "elip", "--out", str(tmp_path / "b")])
    assert r.returncode != 0 and "--bpe is a CLIP's tokenizer for ITC alone" in r.stderr
    r = run([*TINY, *bpe, "--steps", "2", "--batch-size", "8", "--out", str(tmp_path / "c")])
    assert r.returncode == 0 and "image_to_text_R@1" in r.stdout, r.stderr
    from checkpoint import load_checkpoint
    model, tokenizer, ckpt = load_checkpoint(str(tmp_path / "c" / "ckpt.pt"))
    assert ckpt["tokenizer"]["kind"] == "clip_bpe" and len(tokenizer) == 512 + 7 + 2 and model.text.cfg.causal
    assert tokenizer.encode("red circle") == [512 + 1, 512 + 6]  # the merges above: "red</w>", "circle</w>"
    e = subprocess.run([sys.executable, "eval.py", "--ckpt", str(tmp_path / "c" / "ckpt.pt"), "--n-test", "20"],
                       cwd=ROOT, capture_output=True, text=True)
    assert e.returncode == 0 and "zeroshot_top1" in e.stdout, e.stderr


def test_grad_checkpointing_gives_the_gradients_of_the_plain_backward():
    """The MLP halves recomputed in the backward pass, under ELIP's pruning (whose hooks must run
    once per forward): the same loss and gradients as without checkpointing."""
    from model import CLIP
    from vit import set_grad_checkpointing
    torch.manual_seed(0)
    cfg = TrainConfig(method="elip", model_kwargs="width=32,depth=6,heads=2,text_width=32,text_depth=1,embed_dim=16")
    model = CLIP(prepare.model_config(cfg, 30))
    images, ids = torch.randn(4, 3, 64, 64), torch.randint(5, 30, (4, 9))
    grads = []
    for on in (False, True):
        set_grad_checkpointing(model, on)
        model.zero_grad()
        out = model(images, ids, train.reducer_fn(cfg, model.cfg.vision, 10), torch.Generator().manual_seed(0))
        out["loss"].backward()
        grads.append((out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, a), (loss_b, b) = grads
    assert torch.equal(loss_a, loss_b) and a.keys() == b.keys() and len(a) > 20
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-7, rtol=1e-6, msg=name)
