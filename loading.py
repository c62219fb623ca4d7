"""
How fast training is fed: train.py's data loader (worker processes, uint8 batches, JPEG draft
decoding, normalisation on the device) against the naive path (each image decoded at full size,
made float32 and normalised in the main process), in images/s on this machine.

    python bench.py --loader --data caps.csv --image-root DIR --workers 2

Read first: `bench_loader`.
"""
import time

import numpy as np
import torch
from PIL import Image

from data import CaptionDataset, Pairs, normalize, pixel_stats, random_resized_crop, to_tensor
from text import Tokenizer


def naive_batches(dataset, keys: list, size: int):
    """The naive path, for comparison: each image decoded at full size, cropped, made float32
    and normalised in this process."""
    for batch in keys:
        images = []
        for i, pos in batch:
            with Image.open(dataset.items[i]["path"]) as im:
                img = im.convert("RGB")
            images.append(to_tensor(random_resized_crop(img, size, np.random.default_rng([0, pos, 1]))))
        yield torch.stack(images)


def bench_loader(path: str, image_root: str, size: int, workers: int, batch_size: int, batches: int, device) -> dict:
    """images/s of the naive path and of train.py's loader (workers, uint8 batches, JPEG draft
    decoding, normalisation on `device`), the first batch of each left out (start-up)."""
    dataset = CaptionDataset(path, image_root, size)
    tokenizer = Tokenizer.build(c for i in range(len(dataset)) for c in dataset.captions(i))
    keys = [[(p % len(dataset), p) for p in range(b * batch_size, (b + 1) * batch_size)] for b in range(batches + 1)]
    pairs = Pairs(dataset, tokenizer, seed=0)
    loader = torch.utils.data.DataLoader(pairs, batch_sampler=keys, collate_fn=pairs.collate, num_workers=workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    stats = pixel_stats(device)

    def rate(batches_on_device) -> float:
        t0 = None
        for _ in batches_on_device:
            t0 = t0 or time.perf_counter()  # from the first batch's arrival on
        if device.type == "cuda":
            torch.cuda.synchronize()
        return batch_size * batches / (time.perf_counter() - t0)

    carried = set()

    def loaded():
        for images, _, _ in loader:
            carried.add(str(images.dtype).replace("torch.", ""))
            yield normalize(images.to(device, non_blocking=True), stats)

    naive = rate(x.to(device) for x in naive_batches(dataset, keys, size))
    return dict(naive=naive, loader=rate(loaded()), carried=", ".join(sorted(carried)))
