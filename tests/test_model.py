import math

import numpy as np
import torch
import torch.nn.functional as F

from model import CLIP, CLIPConfig, contrastive_loss
from text import TextConfig
from vit import ViTConfig


def test_contrastive_loss_matches_hand_computation():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(5, 8), dim=-1)
    txt = F.normalize(torch.randn(5, 8), dim=-1)
    scale = 7.0
    sim = (img @ txt.T).numpy() * scale
    # cross-entropy of each row (image -> texts) and each column (text -> images), by hand
    i2t = np.mean([-sim[i, i] + math.log(np.exp(sim[i]).sum()) for i in range(5)])
    t2i = np.mean([-sim[j, j] + math.log(np.exp(sim[:, j]).sum()) for j in range(5)])
    got = contrastive_loss(img, txt, torch.tensor(scale))
    assert abs(got.item() - (i2t + t2i) / 2) < 1e-5


def global_batch_gradients(rank, world, init_file, out_file):
    """One rank of `test_two_processes_have_the_single_process_gradient`: the contrastive loss of
    this rank's slice of the batch through two shared linear towers and a learned scale; the
    gradients averaged over ranks exactly as DDP's all-reduce does, nothing else in between."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    towers, images, texts = gradient_case()
    B = len(images) // world
    rows = slice(rank * B, (rank + 1) * B)
    loss = towers_loss(towers, images[rows], texts[rows])
    loss.backward()
    for p in towers:
        dist.all_reduce(p.grad)
        p.grad /= world
    if rank == 0:
        torch.save([p.grad for p in towers], out_file)
    dist.destroy_process_group()


def gradient_case():
    g = torch.Generator().manual_seed(0)
    towers = [torch.randn(6, 5, generator=g).requires_grad_(), torch.randn(7, 5, generator=g).requires_grad_(),
              torch.tensor(2.5, requires_grad=True)]
    return towers, torch.randn(8, 6, generator=g), torch.randn(8, 7, generator=g)


def towers_loss(towers, images, texts):
    w_image, w_text, log_scale = towers
    return contrastive_loss(F.normalize(images @ w_image, dim=-1), F.normalize(texts @ w_text, dim=-1), log_scale.exp())


def test_two_processes_have_the_single_process_gradient(tmp_path):
    """Catches a global-batch contrastive loss whose gradient is wrong under torch.distributed:
    gathered features without a backward (the other ranks' rows get no gradient), a backward that
    forgets to sum over ranks, the wrong slice handed back, or labels not offset by the rank. Two
    gloo processes, gradients averaged as DDP does, against autograd on the whole batch in one."""
    import torch.multiprocessing as mp
    out = str(tmp_path / "grads.pt")
    mp.spawn(global_batch_gradients, args=(2, str(tmp_path / "init"), out), nprocs=2)
    towers, images, texts = gradient_case()
    towers_loss(towers, images, texts).backward()
    for got, p in zip(torch.load(out, weights_only=True), towers):
        torch.testing.assert_close(got, p.grad, atol=1e-6, rtol=1e-5)
        assert p.grad.abs().max() > 1e-3


def test_clip_forward_and_temperature_clamp():
    cfg = CLIPConfig(vision=ViTConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
                     text=TextConfig(vocab_size=20, context_length=8, width=32, depth=1, heads=2), embed_dim=16)
    model = CLIP(cfg)
    images, ids = torch.randn(4, 3, 32, 32), torch.randint(5, 20, (4, 8))
    out = model(images, ids)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    torch.testing.assert_close(model.encode_image(images).norm(dim=-1), torch.ones(4))
    assert abs(model.scale().item() - 1 / 0.07) < 1e-3
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert abs(model.scale().item() - 100.0) < 1e-3
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg


def test_mlm_masks_only_words_and_splits_80_10_10_by_count():
    """Catches masking that touches [CLS]/[SEP]/[PAD], labels off the chosen positions, a count
    other than BERT's per text, a split other than 80% [MASK] / 10% random word / 10% unchanged
    (e.g. the choice and the split drawn from the same random numbers), random "words" that are
    special tokens, or slots that do not say where the chosen words are."""
    from text import MASK, SPECIALS, mask_tokens
    V = 50
    ids = torch.randint(len(SPECIALS), V, (1000, 20))
    ids[:, 0], ids[:, 15], ids[:, 16:] = 2, 3, 0  # [CLS] 14 words [SEP] [PAD]...
    ids[0, 3:15] = 0  # a text of 2 words: still one chosen
    masked, labels, slots, slot_labels = mask_tokens(ids, V, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert not chosen[:, [0, 15, 16, 17, 18, 19]].any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    assert chosen[1:].sum(1).eq(2).all() and chosen[0].sum() == 1  # round(0.15 x 14) = 2 per text of 14 words
    assert slots.shape == (1000, 3) and torch.equal(labels.gather(1, slots), slot_labels)  # K = round(0.15 x 20)
    assert int((slot_labels != -100).sum()) == int(chosen.sum())
    n = int(chosen.sum())
    within = lambda count, total, p: abs(count - total * p) < 4 * math.sqrt(total * p * (1 - p))
    new = masked[chosen]
    as_mask, changed = int((new == MASK).sum()), int(((new != MASK) & (new != ids[chosen])).sum())
    same_word = 1 / (V - len(SPECIALS))  # a random word may draw the word itself
    assert within(as_mask, n, 0.8)
    assert within(changed, n, 0.1 * (1 - same_word))
    assert within(n - as_mask - changed, n, 0.1 + 0.1 * same_word)
    assert (new[new != MASK] >= len(SPECIALS)).all()


def test_itm_labels_land_exactly_on_the_matched_pairs():
    """Catches ITM labels shifted off the positive pairs, negatives paired with the wrong ids, or a
    "negative" that is the positive itself: a stand-in ITM head says "match" exactly where image
    and text belong together, so the loss is ~0 only if every label agrees with it."""
    from model import matching_loss
    B = 6
    image_tokens = torch.arange(float(B))[:, None, None].expand(B, 3, 2)  # token value = image index
    text_tokens = torch.arange(float(B))[:, None, None].expand(B, 4, 2)
    ids = torch.arange(B)[:, None].expand(B, 4) + 10

    def head(images, texts, all_ids):
        assert torch.equal(texts[:, 0, 0].long() + 10, all_ids[:, 0])  # ids travel with their texts
        match = images[:, 0, 0] == texts[:, 0, 0]
        return torch.stack([(~match).float(), match.float()], 1) * 60.0

    sim = torch.randn(B, B)
    for seed in range(5):
        loss = matching_loss(head, image_tokens, text_tokens, ids, sim, torch.Generator().manual_seed(seed))
        assert loss.item() < 1e-6


def test_hard_negatives_follow_a_row_softmax_of_an_asymmetric_similarity():
    """Catches hard negatives drawn uniformly, with the positive in the softmax's normaliser left
    unaccounted, from the similarity's rows for both directions (images need its columns), or
    ever equal to the positive: frequencies over many draws against softmax over the others."""
    from model import matching_loss
    B, draws = 4, 4000
    sim = torch.tensor([[5.0, 2.0, 0.0, 1.0], [0.5, 5.0, 1.5, -1.0], [2.5, 0.0, 5.0, 1.0], [0.0, 0.0, 3.0, 5.0]])
    tokens = torch.arange(float(B))[:, None, None]
    picked = []
    head = lambda images, texts, ids: picked.append((texts[B:2 * B, 0, 0], images[2 * B:, 0, 0])) or torch.zeros(3 * B, 2)
    g = torch.Generator().manual_seed(0)
    for _ in range(draws):
        matching_loss(head, tokens, tokens, torch.zeros(B, 1, dtype=torch.long), sim, g)
    neg_text = torch.stack([p[0] for p in picked]).long()  # (draws, B): text drawn for image i
    neg_image = torch.stack([p[1] for p in picked]).long()  # image drawn for text j
    for neg, s in ((neg_text, sim), (neg_image, sim.T)):
        counts = F.one_hot(neg, B).sum(0).float()  # (B, B): row i = how often each column was drawn
        expected = s.masked_fill(torch.eye(B, dtype=torch.bool), -math.inf).softmax(1)
        assert counts.diagonal().sum() == 0
        se = (expected * (1 - expected) / draws).sqrt()
        assert ((counts / draws - expected).abs() <= 4 * se + 1e-9).all(), (counts / draws, expected)


def test_albef_objectives_each_term_by_hand_on_the_pruned_tokens():
    """Catches an objective computed on the wrong tokens (ITM or MLM on all 17 image tokens instead
    of ELIP's 8, ITC on features of the unpruned image) or a term mis-weighted in the sum: each
    term recomputed from the parts (the same random draws, in the same order), then their sum."""
    from elip import ELIP, scaled_schedule
    from model import sample_negatives
    from text import mask_tokens
    cfg = CLIPConfig(vision=ViTConfig(image_size=32, patch_size=8, width=32, depth=6, heads=2),
                     text=TextConfig(vocab_size=20, context_length=8, width=32, depth=1, heads=2),
                     embed_dim=16, objectives=("itc", "itm", "mlm"))
    torch.manual_seed(0)
    model = CLIP(cfg)
    images, ids = torch.randn(4, 3, 32, 32), torch.randint(5, 20, (4, 8))
    elip = lambda t: ELIP(scaled_schedule(6), 16, t)
    out = model(images, ids, elip, torch.Generator().manual_seed(0))
    with torch.no_grad():
        text_tokens = model.text.forward_tokens(ids)
        text_cls = model.text.pooled(text_tokens, ids)
        image_tokens = model.visual.forward_tokens(images, elip(model.text_guidance(text_cls))).x
        assert image_tokens.shape[1] == 1 + 6 + 1  # ELIP kept 6 of 16 patches, plus the fused token
        image_feat = F.normalize(model.visual_proj(image_tokens[:, 0]), dim=-1)
        text_feat = F.normalize(model.text_proj(text_cls), dim=-1)
        itc = contrastive_loss(image_feat, text_feat, model.scale())
        g = torch.Generator().manual_seed(0)
        sim = model.scale() * image_feat @ text_feat.T
        neg_text, neg_image = sample_negatives(sim, g).tolist(), sample_negatives(sim.T, g).tolist()
        pairs = [(i, i, 1) for i in range(4)] + [(i, neg_text[i], 0) for i in range(4)] + \
                [(neg_image[j], j, 0) for j in range(4)]
        itm = sum(F.cross_entropy(model.itm_logits(image_tokens[[i]], text_tokens[[j]], ids[[j]]), torch.tensor([y]))
                  for i, j, y in pairs) / len(pairs)
        masked, labels, _, _ = mask_tokens(ids, 20, g)
        logits = model.mlm_head(model.fusion(model.text.forward_tokens(masked), masked, image_tokens))
        at = labels != -100
        mlm = F.cross_entropy(logits[at], labels[at])
    for name, expected in (("itc", itc), ("itm", itm), ("mlm", mlm)):
        torch.testing.assert_close(out[name].detach(), expected, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(out["loss"].detach(), itc + itm + mlm, atol=1e-5, rtol=1e-5)
    out["loss"].backward()
    assert model.itm_head.weight.grad.abs().sum() > 0 and model.mlm_head.weight.grad.abs().sum() > 0
