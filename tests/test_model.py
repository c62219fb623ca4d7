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
