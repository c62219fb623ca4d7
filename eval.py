"""
Evaluation: image-text retrieval (R@1/5/10 both ways) and zero-shot classification.

Read first: `retrieval_metrics` (the standard definitions, on a similarity matrix), then
`zeroshot_classifier`, then `evaluate`, which `train.py` calls at the end and `python eval.py`
calls on a checkpoint.

Definitions (as in CLIP, ALBEF and open_clip's benchmark): with several captions per image,
image->text R@k is the share of images with ANY of their captions among the k most similar texts;
text->image R@k is the share of captions whose own image is among the k most similar images.
Metric names follow open_clip (`image_to_text_R@1`, ...), values are fractions.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

import data
from data import DataError


@torch.no_grad()
def retrieval_metrics(image_features, text_features, text_to_image, ks=(1, 5, 10)) -> dict:
    """image_features (N, E), text_features (M, E), text_to_image (M,) the image of each text."""
    sim = image_features.float() @ text_features.float().T  # (N, M)
    N, M = sim.shape
    positive = torch.zeros(N, M, dtype=torch.bool, device=sim.device)
    positive[text_to_image, torch.arange(M, device=sim.device)] = True
    # image -> text: rank of the best-scored correct caption = texts scored strictly higher
    best_correct = sim.masked_fill(~positive, float("-inf")).max(1).values  # (N,)
    i2t_rank = (sim > best_correct[:, None]).sum(1)
    # text -> image: images scored strictly higher than the text's own image
    own = sim[text_to_image, torch.arange(M, device=sim.device)]  # (M,)
    t2i_rank = (sim > own[None, :]).sum(0)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = (i2t_rank < k).float().mean().item()
        out[f"text_to_image_R@{k}"] = (t2i_rank < k).float().mean().item()
    return out


@torch.no_grad()
def encode_texts(model, tokenizer, texts, device, batch_size=256) -> torch.Tensor:
    return torch.cat([model.encode_text(tokenizer(texts[i:i + batch_size]).to(device))
                      for i in range(0, len(texts), batch_size)])


@torch.no_grad()
def encode_images(model, images, device, batch_size=256, reducer=None) -> torch.Tensor:
    return torch.cat([model.encode_image(images[i:i + batch_size].to(device), reducer)
                      for i in range(0, len(images), batch_size)])


def load_gallery(dataset, n=None):
    """The first n items of a dataset as (images (n, 3, S, S), captions, text_to_image)."""
    n = len(dataset) if n is None else min(n, len(dataset))
    images, captions, owner = [], [], []
    for i in range(n):
        item = dataset[i]
        images.append(item["image"])
        captions += item["captions"]
        owner += [i] * len(item["captions"])
    return torch.stack(images), captions, torch.tensor(owner)


@torch.no_grad()
def retrieval(model, tokenizer, dataset, device, n=None, reducer=None) -> dict:
    images, captions, owner = load_gallery(dataset, n)
    img = encode_images(model, images, device, reducer=reducer)
    txt = encode_texts(model, tokenizer, captions, device)
    return retrieval_metrics(img, txt, owner.to(device))


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames, templates, device) -> torch.Tensor:
    """(C, E): each class's mean prompt embedding over the templates, re-normalised (as CLIP)."""
    weights = [encode_texts(model, tokenizer, [t.format(c) for t in templates], device).mean(0)
               for c in classnames]
    return F.normalize(torch.stack(weights), dim=-1)


def topk_accuracy(logits, labels, ks=(1, 5)) -> dict:
    """Top-k accuracy for each k up to the number of classes (top-5 of 2 classes means nothing)."""
    ks = [k for k in ks if k <= logits.shape[1]]
    top = logits.topk(max(ks), dim=1).indices  # (N, kmax)
    hit = top == labels[:, None]
    return {f"top{k}": hit[:, :k].any(1).float().mean().item() for k in ks}


class ShapesZeroShot(torch.utils.data.Dataset):
    """The first n one-object scenes of the shapes test split, labelled '{colour} {shape}'."""
    classes, templates = data.SHAPES_CLASSES, data.SHAPES_TEMPLATES

    def __init__(self, n, image_size=64, patch_size=8, seed=0):
        self.scenes = data.ShapesDataset("test", 10 ** 9, image_size, patch_size, seed)
        self.index = []
        i = 0
        while len(self.index) < n:
            if len(self.scenes.scene(i)[0]) == 1:
                self.index.append(i)
            i += 1

    def __len__(self):
        return len(self.index)

    def __getitem__(self, k):
        item = self.scenes[self.index[k]]
        return item["image"], self.classes.index(data.zeroshot_label(item["attributes"]))


@torch.no_grad()
def zeroshot(model, tokenizer, dataset, device, reducer=None) -> dict:
    """Top-1/top-5 of classifying `dataset`'s (image, label) pairs by prompts of its classes."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    classifier = zeroshot_classifier(model, tokenizer, dataset.classes, dataset.templates, device)
    logits = encode_images(model, torch.stack(images), device, reducer=reducer) @ classifier.T
    return {f"zeroshot_{k}": v for k, v in topk_accuracy(logits, torch.tensor(labels, device=device)).items()}


def eval_sets(image_size, patch_size, seed=0, n_test=1000, val_data="", image_root="", zeroshot_dir="",
              skip_bad=False):
    """(retrieval gallery or None, zero-shot set or None): the shapes test split by default, else
    the caption file / class folders given. Built before training, so a bad path stops early."""
    if val_data or zeroshot_dir:
        gallery = data.CaptionDataset(val_data, image_root, image_size, skip_bad=skip_bad) if val_data else None
        folder = data.ImageFolder(zeroshot_dir, image_size) if zeroshot_dir else None
        return gallery, folder
    return (data.ShapesDataset("test", n_test, image_size, patch_size, seed),
            ShapesZeroShot(max(1, n_test // 2), image_size, patch_size, seed))


@torch.no_grad()
def evaluate(model, tokenizer, device, sets, n_test=None, reducer=None) -> dict:
    """Retrieval on the gallery (its first n_test images) and zero-shot accuracy, in eval mode."""
    gallery, zeroshot_set = sets
    was_training = model.training
    model.eval()
    metrics = {}
    if gallery is not None:
        metrics.update(retrieval(model, tokenizer, gallery, device, n_test, reducer))
    if zeroshot_set is not None:
        metrics.update(zeroshot(model, tokenizer, zeroshot_set, device, reducer))
    model.train(was_training)
    return metrics


def format_table(metrics: dict) -> str:
    return "\n".join(f"{k:<24} {100 * v:6.2f}" for k, v in metrics.items())


def main(argv=None):
    from train import load_checkpoint  # the one reader of checkpoints
    p = argparse.ArgumentParser(description="Evaluate a CLIP checkpoint: retrieval and zero-shot classification.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--json", action="store_true", help="print one JSON object (open_clip key names, fractions)")
    p.add_argument("--val-data", default="", help="caption file for retrieval (default: the shapes test split)")
    p.add_argument("--image-root", default="", help="folder the caption file's image paths are relative to")
    p.add_argument("--zeroshot-dir", default="", help="class-per-folder image tree for zero-shot classification")
    p.add_argument("--n-test", type=int, default=1000, help="gallery size (images)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        model, tokenizer, ckpt = load_checkpoint(args.ckpt, args.device)
        v = model.cfg.vision
        sets = eval_sets(v.image_size, v.patch_size, ckpt["config"]["seed"], args.n_test, args.val_data,
                         args.image_root, args.zeroshot_dir)
        metrics = evaluate(model, tokenizer, args.device, sets, args.n_test)
    except (DataError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(metrics) if args.json else format_table(metrics))


if __name__ == "__main__":
    main()
