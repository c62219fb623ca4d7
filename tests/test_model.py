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


def test_hard_negatives_are_never_the_positive_and_follow_similarity():
    from model import sample_negatives
    sim = torch.randn(6, 6) + 50 * torch.eye(6)  # the positive dominates and must still be skipped
    sim[0, 3] = 40.0  # image 0's hardest negative
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        neg = sample_negatives(sim, g)
        assert (neg != torch.arange(6)).all()
        assert neg[0] == 3


def test_mlm_masking_spares_special_tokens():
    from text import MASK, SPECIALS, mask_tokens
    ids = torch.randint(len(SPECIALS), 50, (400, 20))
    ids[:, 0], ids[:, 15], ids[:, 16:] = 2, 3, 0  # [CLS] words [SEP] [PAD]...
    masked, labels = mask_tokens(ids, 50, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert not chosen[:, [0, 15, 16, 17]].any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    assert 0.13 < chosen.float().sum() / (400 * 14) < 0.17
    assert 0.75 < (masked[chosen] == MASK).float().mean() < 0.85


def test_albef_objectives_see_the_pruned_tokens():
    from elip import ELIP, scaled_schedule
    cfg = CLIPConfig(vision=ViTConfig(image_size=32, patch_size=8, width=32, depth=6, heads=2),
                     text=TextConfig(vocab_size=20, context_length=8, width=32, depth=1, heads=2),
                     embed_dim=16, objectives=("itc", "itm", "mlm"))
    model = CLIP(cfg)
    images, ids = torch.randn(4, 3, 32, 32), torch.randint(5, 20, (4, 8))
    seen = []
    model.fusion.register_forward_hook(lambda m, args, out: seen.append(args[2].shape[1]))
    out = model(images, ids, lambda t: ELIP(scaled_schedule(6), 16, t), torch.Generator().manual_seed(0))
    assert set(out) == {"itc", "itm", "mlm", "loss"}
    torch.testing.assert_close(out["loss"], out["itc"] + out["itm"] + out["mlm"])
    assert seen == [1 + 6 + 1, 1 + 6 + 1]  # ITM and MLM passes cross-attend to 8 tokens, not 17
    out["loss"].backward()
    assert model.itm_head.weight.grad.abs().sum() > 0 and model.mlm_head.weight.grad.abs().sum() > 0
