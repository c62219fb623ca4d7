"""The captioner (EVLGen and its baselines), the frozen LM, captioning metrics and Q&A."""
import math
import os

import pytest
import torch

import data
import shapes
from captioning import bleu, cider_d, cider_d_scores
from captioner import Captioner, CaptionerConfig, check_vocabularies
from text import CLS, LMConfig, TextConfig, Tokenizer
from vit import ViTConfig

from test_train import ROOT, TINY, run


def tiny_captioner(**kw):
    cfg = CaptionerConfig(vision=ViTConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
                          lm=LMConfig(vocab_size=30, context_length=40, width=32, depth=1, heads=2),
                          text=TextConfig(vocab_size=30, context_length=40, width=32, depth=2, heads=2), **kw)
    torch.manual_seed(0)
    return Captioner(cfg)


def test_bleu_by_hand():
    assert bleu(["a b c d"], [["a b c d"]]) == pytest.approx(1.0)
    # closest reference lengths 4 and 6 tie at distance 1: the shorter counts, so no brevity penalty
    assert bleu(["a b c d e"], [["a b c d", "a b c d e f"]]) == pytest.approx(1.0)
    # two words against four: brevity exp(1 - 4/2); no 3- or 4-grams: COCO's 1e-15/1e-9 each
    assert bleu(["a b"], [["a b c d"]]) == pytest.approx(math.exp(-1) * (1e-6 * 1e-6) ** 0.25, rel=1e-6)
    assert bleu(["the the the the"], [["the cat"]], max_n=1) == pytest.approx(0.25)  # clipped counts


def test_cider_d_by_hand():
    refs = [["a b"], ["c d"]]
    assert cider_d(["a b", "c d"], refs) == pytest.approx(5.0)  # cosine 1 for n = 1, 2; 0 for n = 3, 4
    one_word = 10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4  # half the unigrams, length 1 vs 2
    assert cider_d(["a", "c d"], refs) == pytest.approx((one_word + 5.0) / 2)
    # "a a": the candidate's weight of "a" is clipped at the reference's (the D in CIDEr-D)
    clipped = 10 * (1 / (2 * math.sqrt(2))) / 4
    assert cider_d(["a a", "c d"], refs) == pytest.approx((clipped + 5.0) / 2)


# A small but realistic corpus: six images, two to four references each, unequal document
# frequencies ("a" everywhere, "yellow" in one image), candidates of every quality, some shorter
# than their closest reference, one repeating itself.
CORPUS_CANDS = [
    "a red circle above a blue square",
    "a blue square on the left",
    "a green triangle and a red circle",
    "two yellow circles",
    "a red square a red square",
    "a blue circle",
]
CORPUS_REFS = [
    ["a red circle above a blue square", "a blue square below a red circle", "red circle and blue square"],
    ["a blue square on the left side", "the square"],
    ["a red circle to the right of a green triangle", "a green triangle beside a red circle",
     "a triangle and a circle", "two shapes a green triangle and a red circle"],
    ["two yellow circles and a gray square", "a gray square next to two yellow circles"],
    ["a big red square in the middle of the image", "a red square in the centre", "one red square"],
    ["a blue circle under a green triangle", "a green triangle on the right above a small blue circle"],
]


def test_bleu_and_cider_d_equal_the_coco_caption_code_on_a_corpus():
    """Catches departures from COCO's scorers that hand cases with one reference miss: document
    frequency counted per reference instead of per image, IDF over the wrong number of images, the
    brevity penalty against the shortest instead of the closest reference, clipping by the sum
    instead of the max over references, the length penalty or the clipping of CIDEr-D dropped.
    The constants were computed once with pycocoevalcap 1.2 (the COCO caption evaluation code, from
    PyPI): Bleu(4).compute_score and Cider().compute_score on {i: refs} and {i: [candidate]}, the
    captions above being already lower-case and tokenized (its PTBTokenizer needs Java)."""
    assert bleu(CORPUS_CANDS, CORPUS_REFS) == pytest.approx(0.6456931775476433, rel=1e-9)
    assert bleu(CORPUS_CANDS, CORPUS_REFS, max_n=1) == pytest.approx(0.6840733892597834, rel=1e-9)
    assert cider_d(CORPUS_CANDS, CORPUS_REFS) == pytest.approx(3.2674120530676642, rel=1e-9)
    coco_per_image = [4.937703477712098, 4.434803029685018, 4.134885127548053, 3.327919155418231,
                      1.0258509662948414, 1.7433105617477436]
    assert cider_d_scores(CORPUS_CANDS, CORPUS_REFS) == pytest.approx(coco_per_image, rel=1e-9)


def test_questions_are_answered_by_the_scene():
    scene = [dict(shape="circle", colour="red"), dict(shape="circle", colour="blue"), dict(shape="cross", colour="red")]
    qa = shapes.scene_questions(scene)
    assert ("what color is the cross", "red") in qa and not any("the circle" in q for q, _ in qa)
    assert ("what shape is blue", "circle") in qa and ("how many objects are there", "three") in qa
    assert shapes.qa_text("a red cross", "what color is the cross") == "a red cross question: what color is the cross answer:"


@pytest.mark.parametrize("r,expected", [((3, 3), 17 - 6), ((0, 0), 17), ((20, 20), 17 - 8 - 4)])
def test_merging_bridge_token_counts(r, expected):
    from merge import merge_schedule
    capped, _ = merge_schedule(list(r), 2, 17)
    model = tiny_captioner(r=tuple(capped))
    prompt = model.prompt(torch.randn(2, 3, 32, 32), track_source=True)
    assert prompt.x.shape == (2, expected, 32)
    assert prompt.size.sum(1).tolist() == [17, 17] and torch.equal(prompt.source.sum(-1), prompt.size)


def test_only_the_bridge_learns_and_the_frozen_parts_stay_in_eval_mode():
    model = tiny_captioner(r=(2, 2)).train()
    assert not model.lm.training and not model.visual.training and model.bridge.training
    ids = torch.tensor([[CLS, 7, 8, 3], [CLS, 9, 3, 0]])
    model(torch.randn(2, 3, 32, 32), ids)["loss"].backward()
    for name, p in model.named_parameters():
        trained = name.startswith(("bridge.", "lm_proj."))
        assert p.requires_grad == trained, name
        assert (p.grad is not None) == trained, name


def test_the_bridge_sees_a_set_of_tokens_unless_given_their_positions():
    x = torch.randn(2, 17, 32)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(16, generator=torch.Generator().manual_seed(0))])
    for bridge_pos in (False, True):
        bridge = tiny_captioner(r=(0, 0), bridge_pos=bridge_pos).bridge
        out, out_permuted = bridge(x).x, bridge(x[:, perm]).x
        # without positions, permuting the patch tokens permutes the output the same way; with them, not
        assert torch.allclose(out[:, perm], out_permuted, atol=1e-5) == (not bridge_pos)
    model = tiny_captioner(r=(2, 2), bridge_pos=True)
    model(torch.randn(2, 3, 32, 32), torch.tensor([[CLS, 7, 8, 3], [CLS, 9, 3, 0]]))["loss"].backward()
    assert model.bridge.pos_embed.shape == (1, 17, 32) and model.bridge.pos_embed.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="17 positions, got 10 tokens"):
        model.bridge(torch.randn(1, 10, 32))


def test_query_bridge_gives_a_fixed_number_of_tokens_and_stage_one_losses():
    model = tiny_captioner(bridge="query", num_queries=5, stage1=True)
    images, ids = torch.randn(3, 3, 32, 32), torch.tensor([[CLS, 7, 8, 3]] * 3)
    assert model.prompt(images).x.shape == (3, 5, 32)
    model.stage = 1
    out = model(images, ids, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"itc", "itm", "loss"} and torch.isfinite(out["loss"])


def test_batched_greedy_equals_per_sample_search():
    model = tiny_captioner(r=(2, 2)).eval()
    images = torch.randn(4, 3, 32, 32)
    start = torch.full((4, 1), CLS)
    batched = model.generate(images, start, 6)
    prefix = model.prompt(images).x
    assert batched == [model.lm.beam_search(start[b:b + 1], prefix[b:b + 1], 6, 1) for b in range(4)]


def test_lm_then_evlgen_end_to_end_and_the_frozen_lm_is_unchanged(tmp_path):
    clip, lm, cap = (str(tmp_path / n) for n in ("clip", "lm", "cap"))
    small = [*TINY, "--batch-size", "8", "--steps", "3"]
    assert run([*small, "--out", clip]).returncode == 0
    r = run([*small, "--method", "lm", "--out", lm])
    assert r.returncode == 0 and "perplexity_in_context" in r.stdout, r.stderr
    r = run([*small, "--method", "evlgen", "--lm", f"{lm}/ckpt.pt", "--clip", f"{clip}/ckpt.pt", "--bridge-r", "40",
             "--eval-every", "2", "--out", cap])
    assert r.returncode == 0, r.stderr
    assert "layer 0: 40 -> 32" in r.stdout and "65 visual tokens" in r.stdout  # one bridge layer: the CLIP text depth
    assert "frozen language model unchanged by training: yes" in r.stdout and "cider_d" in r.stdout
    before, after = (torch.load(f"{d}/ckpt.pt", weights_only=True)["model"] for d in (lm, cap))
    clip_state = torch.load(f"{clip}/ckpt.pt", weights_only=True)["model"]
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # the frozen LM, bit for bit
    for k, v in after.items():
        if k.startswith("visual."):
            assert torch.equal(v, clip_state[k]), k  # the frozen ViT too
    # a captioner checkpoint is evaluated by eval.py like any other
    r = __import__("subprocess").run([__import__("sys").executable, "eval.py", "--ckpt", f"{cap}/ckpt.pt",
                                      "--n-test", "5"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "cider_d" in r.stdout, r.stderr


def test_bad_captioner_inputs(tmp_path):
    r = run(["--bridge-pos", "--out", str(tmp_path / "p")])
    assert r.returncode != 0 and "--bridge-pos applies to the captioner" in r.stderr and "Traceback" not in r.stderr
    r = run(["--method", "evlgen", "--out", str(tmp_path / "x")])
    assert r.returncode != 0 and "--method lm" in r.stderr and "Traceback" not in r.stderr
    clip = str(tmp_path / "clip")
    assert run([*TINY, "--batch-size", "8", "--steps", "1", "--no-eval", "--out", clip]).returncode == 0
    r = run(["--method", "evlgen", "--lm", f"{clip}/ckpt.pt", "--out", str(tmp_path / "y")])
    assert r.returncode != 0 and "is a clip checkpoint, not a lm one" in r.stderr and "Traceback" not in r.stderr
    lm_ckpt = dict(tokenizer=Tokenizer(["red", "circle"]).state_dict(), model_config=dict(vocab_size=7))
    with pytest.raises(data.DataError, match="does not match the language model"):
        check_vocabularies(Tokenizer(["blue", "square"]), dict(lm=lm_ckpt), "ckpt.pt")


def test_language_model_packs_texts_into_full_rows():
    from captioner import pack
    ids = torch.tensor([[2, 7, 8, 3, 0], [2, 9, 3, 0, 0], [2, 5, 6, 7, 3]])
    assert pack(ids, 4).tolist() == [[2, 7, 8, 3], [2, 9, 3, 2], [5, 6, 7, 3]]
    assert pack(ids, 5).tolist() == [[2, 7, 8, 3, 2], [9, 3, 2, 5, 6]]  # the tail that does not fill a row is dropped


def test_lm_texts_follow_another_caption_of_their_scene():
    ds = shapes.ShapesDataset("train", 20)
    plain, ctx = (data.Pairs(ds, None, seed=0, images=False, context=c) for c in (False, True))
    for key in [(i, pos) for i in range(20) for pos in range(3)]:
        text, with_context = plain[key][1], ctx[key][1]
        assert text in data.lm_texts(ds, key[0])  # the same text is drawn either way
        assert with_context.endswith(" " + text)
        first = with_context[:-len(text) - 1]
        assert first in ds.captions(key[0]) and not text.startswith(first)  # another reference, never itself


def test_in_context_perplexity_equals_scoring_token_by_token():
    from captioning import continuation_nll
    from text import CausalLM
    tok = Tokenizer(["red", "blue", "circle", "square", "a", "big"])
    torch.manual_seed(0)
    lm = CausalLM(LMConfig(vocab_size=len(tok), context_length=20, width=16, depth=2, heads=2)).eval()
    firsts, seconds = ["a red circle", "big blue square a", "a"], ["blue square", "a", "big red circle a"]
    with torch.no_grad():
        nll, count = continuation_nll(lm, tok, firsts, seconds, "cpu")
        expected, n = 0.0, 0
        for a, b in zip(firsts, seconds):  # each token of the second text (and the end id), one forward each
            ids = tok([data.in_context(a, b)])[0]
            ids = ids[ids != tok.pad_id]
            for t in range(len(tok([a])[0][tok([a])[0] != tok.pad_id]) - 1, len(ids)):
                expected -= torch.log_softmax(lm(ids[None, :t])[0, -1], -1)[ids[t]].item()
                n += 1
    assert count == n == sum(len(b.split()) + 1 for b in seconds)
    assert nll == pytest.approx(expected, rel=1e-5)


def test_two_process_ddp_runs_both_stages_of_the_query_bridge(tmp_path):
    import subprocess
    import sys
    clip, lm, cap = (str(tmp_path / n) for n in ("clip", "lm", "cap"))
    small = [*TINY, "--batch-size", "4", "--steps", "2", "--no-eval"]
    assert run([*small, "--out", clip]).returncode == 0
    assert run([*small, "--method", "lm", "--out", lm]).returncode == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *small, "--method", "evlgen", "--lm", f"{lm}/ckpt.pt", "--clip", f"{clip}/ckpt.pt",
                        "--bridge", "query", "--stage1-steps", "2", "--out", cap],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "frozen language model unchanged by training: yes" in r.stdout
    logged = [line for line in open(f"{cap}/log.jsonl")]
    assert '"itc"' in logged[0] and '"lm"' in logged[-1]  # stage 1, then the LM loss
