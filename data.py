"""
Data from disk and the image transforms (plain torch + Pillow, no torchvision): caption files
(ALBEF/BLIP JSON, COCO captions JSON, CSV/TSV), clip folders for video, class-per-folder image
trees for zero-shot. The default data, generated with no files, is shapes.py's.

Read first: `read_caption_file`, then `CaptionDataset` and `ImageFolder`.
"""
import csv
import io
import json
import math
import os
import re
import tarfile

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(Exception):
    """Bad input data: the message names the file (and line) to fix."""


# ----------------------------------------------------------------------------------------------
# Transforms (Pillow in, normalised tensor out)

def to_uint8(image) -> torch.Tensor:
    """uint8 (H, W, 3) array or PIL image -> uint8 (3, H, W): what training batches carry (a
    quarter of float32's bytes through worker processes and onto the GPU)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def pixel_stats(device="cpu") -> tuple:
    """CLIP's per-channel mean and std, (3, 1, 1) each, on `device` (made once: a copy from the
    host would wait for the GPU)."""
    return torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1), torch.tensor(CLIP_STD, device=device).view(3, 1, 1)


def normalize(x: torch.Tensor, stats: tuple = None) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float, CLIP-normalised, on x's device (stats: `pixel_stats` there)."""
    mean, std = stats or pixel_stats(x.device)
    return (x.float() / 255 - mean) / std


def to_tensor(image) -> torch.Tensor:
    """uint8 (H, W, 3) array or PIL image -> float (3, H, W), CLIP-normalised."""
    return normalize(to_uint8(image))


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_tensor`'s normalisation, for drawing: (3, H, W) in [0, 1]."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic), then the central size x size square: CLIP's eval transform."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


CROP_SCALE, CROP_RATIO = (0.5, 1.0), (3 / 4, 4 / 3)
# the random crop's smallest side, as a share of the image's: decoding at least size / this keeps it sharp
SMALLEST_CROP = math.sqrt(CROP_SCALE[0] * CROP_RATIO[0])


def random_resized_crop(img: Image.Image, size: int, rng, scale=CROP_SCALE, ratio=CROP_RATIO) -> Image.Image:
    """A random area share in `scale` and aspect ratio in `ratio`, resized to size x size
    (the training transform of Inception/CLIP); falls back to the centre crop after 10 tries."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.crop((left, top, left + cw, top + ch)).resize((size, size), Image.BICUBIC)
    return resize_center_crop(img, size)


# ----------------------------------------------------------------------------------------------
# Real data from disk

def load_image(path: str, where: str, at_least: int = 0) -> Image.Image:
    """Open an image as RGB, or stop with one sentence naming it and where it was listed. With
    `at_least`, a JPEG is decoded at 1/2, 1/4 or 1/8 of its size where both sides still reach
    that many pixels (Pillow's draft mode: most of a large JPEG's decoding time saved)."""
    try:
        with Image.open(path) as im:
            if at_least:
                im.draft("RGB", (at_least, at_least))
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {path} ({where}) does not exist") from None
    except Exception as e:
        named = f"image {path} ({where})" if isinstance(path, str) else where  # a file, or a shard's bytes
        raise DataError(f"{named} cannot be read: {e}") from None


def read_caption_file(path: str, keys: tuple = ()) -> list:
    """Read captions as (image path, caption, where) rows. Formats, by content and extension:
    ALBEF/BLIP JSON `[{"image": path, "caption": str or [str]}]`, COCO `captions_*.json`
    (`images` + `annotations`), and CSV/TSV rows `image,caption` (an optional header row), or
    with `keys` = (image column, caption column) the columns of those names in the header row,
    as open_clip reads them (a TSV is split at tabs alone: quotes are text)."""
    if not os.path.isfile(path):
        raise DataError(f"caption file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        try:
            with open(path) as f:
                obj = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"caption file {path} is not valid JSON: {e}") from None
        if isinstance(obj, dict) and "annotations" in obj and "images" in obj:
            return read_coco(path, obj)
        if isinstance(obj, list):
            return read_albef(path, obj)
        raise DataError(f"caption file {path} is JSON but neither a list of {{image, caption}} "
                        f"entries nor COCO captions (images + annotations)")
    if ext in (".csv", ".tsv"):
        return read_table(path, "\t" if ext == ".tsv" else ",", keys)
    raise DataError(f"caption file {path} has an unknown format (use .json, .csv or .tsv)")


def read_albef(path, entries):
    rows = []
    for k, e in enumerate(entries):
        where = f"{path} entry {k}"
        if not isinstance(e, dict) or "image" not in e or "caption" not in e:
            raise DataError(f"{where} needs the keys 'image' and 'caption'")
        caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        rows += [(e["image"], c, where) for c in caps]
    return rows


def read_coco(path, obj):
    files = {im["id"]: im["file_name"] for im in obj["images"]}
    rows = []
    for k, a in enumerate(obj["annotations"]):
        where = f"{path} annotation {k}"
        if a.get("image_id") not in files:
            raise DataError(f"{where} refers to image id {a.get('image_id')!r}, which is not in 'images'")
        rows.append((files[a["image_id"]], a.get("caption"), where))
    return rows


def read_table(path, delimiter, keys=()):
    rows, columns = [], (0, 1)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f, delimiter=delimiter, quoting=quoting), start=1):
            if line_no == 1 and keys:
                missing = [k for k in keys if k not in row]
                if missing:
                    raise DataError(f"{path} line 1 (the header) has no column {missing[0]!r} (--csv-img-key / "
                                    f"--csv-caption-key); its columns: {', '.join(row)}")
                columns = tuple(row.index(k) for k in keys)
                continue
            if not row or (line_no == 1 and not row[0].lower().endswith(IMAGE_EXTS)):
                continue  # blank line, or a header row such as "image,caption"
            if len(row) <= max(columns):
                expected = "as many as the header" if keys else f"image{delimiter}caption"
                raise DataError(f"{path} line {line_no} has {len(row)} column(s); expected {expected}")
            rows.append((row[columns[0]], row[columns[1]], f"{path} line {line_no}"))
    return rows


class CaptionDataset(torch.utils.data.Dataset):
    """Images with their captions from a caption file; item i is one image with all its captions
    (several rows naming the same image are grouped, as COCO lists five captions per image)."""
    what = "image"

    def __init__(self, path, image_root="", image_size=224, skip_bad=False, keys=()):
        self.image_size, self.skip_bad = image_size, skip_bad
        groups = {}
        for image, caption, where in read_caption_file(path, keys):
            if not isinstance(caption, str) or not caption.strip():
                raise DataError(f"{where} has an empty caption")
            full = os.path.join(image_root, image)
            groups.setdefault(full, dict(path=full, captions=[], where=where))["captions"].append(caption.strip())
        self.items, self.missing = [], 0
        for g in groups.values():
            if self.exists(g["path"]):
                self.items.append(g)
            elif skip_bad:
                self.missing += 1
            else:
                raise DataError(f"{self.what} {g['path']} ({g['where']}) does not exist (pass --skip-bad to skip such samples)")
        if not self.items:
            raise DataError(f"caption file {path} lists no usable image")

    def exists(self, path: str) -> bool:
        return os.path.isfile(path)

    def open_image(self, g: dict, at_least: int) -> Image.Image:
        return load_image(g["path"], g["where"], at_least)

    def __len__(self):
        return len(self.items)

    def captions(self, i):
        return self.items[i]["captions"]

    def get(self, i, rng=None):
        """Item i as training reads it, its image uint8 (normalised on the device); with an rng,
        a random resized crop, else the centre crop. A corrupt image is found only when decoded:
        with skip_bad the next readable one stands in (so batches keep their size under DDP) and
        `skipped` counts it."""
        for k in range(len(self.items)):
            g = self.items[(i + k) % len(self.items)]
            try:
                img = self.open_image(g, math.ceil(self.image_size / (SMALLEST_CROP if rng is not None else 1)))
            except DataError:
                if not self.skip_bad:
                    raise
                continue
            img = random_resized_crop(img, self.image_size, rng) if rng is not None else resize_center_crop(img, self.image_size)
            return dict(image=to_uint8(img), captions=g["captions"], skipped=k)
        raise DataError("no image of the caption file could be read")

    def __getitem__(self, i):
        """Item i as evaluation reads it: the centre crop, normalised."""
        item = self.get(i)
        return dict(item, image=normalize(item["image"]))


class VideoCaptionDataset(CaptionDataset):
    """Clips with their captions from a caption file (the same formats) whose "image" entries are
    folders, one per clip, of frame images in name order. Item i's image is (T, 3, S, S): T frames
    evenly spaced over the clip, each centre-cropped (the same crop for every frame, so motion is
    not distorted). A clip with fewer than T frames, no frames, or frames of different sizes
    stops with a message naming its folder and where it was listed (frame counts are checked when
    the file is read, frame sizes when the clip is); --skip-bad skips missing folders only."""
    what = "clip folder"

    def __init__(self, path, image_root="", image_size=224, frames=4, skip_bad=False):
        self.frames = frames
        super().__init__(path, image_root, image_size, skip_bad)
        for g in self.items:
            self.frame_files(g)

    def exists(self, path: str) -> bool:
        return os.path.isdir(path)

    def frame_files(self, g) -> list:
        files = sorted(f for f in os.listdir(g["path"]) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise DataError(f"clip {g['path']} ({g['where']}) holds no frame images")
        if len(files) < self.frames:
            raise DataError(f"clip {g['path']} ({g['where']}) has {len(files)} frame(s), fewer than the {self.frames} "
                            f"asked for (--frames)")
        picks = np.linspace(0, len(files) - 1, self.frames).round().astype(int)  # evenly spaced, first and last
        return [os.path.join(g["path"], files[k]) for k in picks]

    def get(self, i, rng=None):
        g = self.items[i]
        frames = [load_image(f, f"clip {g['path']}, {g['where']}", self.image_size) for f in self.frame_files(g)]
        sizes = sorted({f.size for f in frames})
        if len(sizes) > 1:
            raise DataError(f"clip {g['path']} ({g['where']}) has frames of different sizes: "
                            f"{', '.join(f'{w}x{h}' for w, h in sizes)}")
        image = torch.stack([to_uint8(resize_center_crop(f, self.image_size)) for f in frames])  # (T, 3, S, S)
        return dict(image=image, captions=g["captions"], skipped=0)


def shard_paths(pattern: str) -> list:
    """WebDataset's shard notation: 'shards/{00000..00099}.tar' -> the 100 paths, zero-padded
    as written; several {a..b} ranges expand in order."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    a, b = m.groups()
    return [p for k in range(int(a), int(b) + 1)
            for p in shard_paths(pattern[:m.start()] + str(k).zfill(len(a)) + pattern[m.end():])]


def is_shards(data: str) -> bool:
    return data.endswith(".tar") or ".tar" in data and "{" in data


class TarShards(CaptionDataset):
    """Image-text pairs in WebDataset tar shards, as img2dataset writes them: per sample KEY a
    KEY.jpg (or .png, .webp) and a KEY.txt caption, read with the standard library's tarfile.
    The shards are indexed once (headers and captions; the images stay where they are), so the
    samples are a list like a caption file's: the same seeded order, resume and split over
    ranks and workers as every other dataset. A sample without its caption or image, or a
    truncated shard, stops with the shard and the key named; --skip-bad skips and counts them."""
    what = "sample"

    def __init__(self, pattern, image_size=224, skip_bad=False):
        self.image_size, self.skip_bad = image_size, skip_bad
        self.items, self.missing = [], 0
        for shard in shard_paths(pattern):
            self.index(shard)
        if not self.items:
            raise DataError(f"shards {pattern} hold no usable sample")

    def index(self, shard: str):
        if not os.path.isfile(shard):
            raise DataError(f"shard {shard} does not exist")
        samples, name, end = {}, None, os.path.getsize(shard)
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    key, _, ext = os.path.basename(member.name).partition(".")
                    name = os.path.join(os.path.dirname(member.name), key)
                    if member.offset_data + member.size > end:  # tarfile reads a cut-off end as the end
                        raise tarfile.ReadError(f"sample {name} runs past the end of the file")
                    entry = samples.setdefault(name, {})
                    if ext == "txt":
                        entry["caption"] = tar.extractfile(member).read().decode("utf-8").strip()
                    elif ext.lower() in ("jpg", "jpeg", "png", "webp"):
                        entry["image"] = (member.offset_data, member.size)
        except (tarfile.TarError, UnicodeDecodeError, OSError) as e:
            samples.pop(name, None)  # the sample being read when the shard broke off
            self.bad(f"shard {shard} is truncated or not a tar file" + (f" at sample {name}" if name else "") + f": {e}")
        for name, entry in samples.items():
            if "caption" in entry and "image" in entry and entry["caption"]:
                self.items.append(dict(path=shard, image=entry["image"], captions=[entry["caption"]],
                                       where=f"shard {shard}, sample {name}"))
            else:
                self.bad(f"shard {shard}: sample {name} has no " + ("caption (.txt)" if "image" in entry else "image"))

    def bad(self, message: str):
        if not self.skip_bad:
            raise DataError(message + " (pass --skip-bad to skip such samples)")
        self.missing += 1

    def open_image(self, g: dict, at_least: int) -> Image.Image:
        offset, size = g["image"]
        with open(g["path"], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) < size:
            raise DataError(f"{g['where']}: the image is cut short (the shard is truncated)")
        return load_image(io.BytesIO(data), g["where"], at_least)


def image_text_pairs(data: str, image_root="", image_size=224, skip_bad=False, keys=()):
    """--data's dataset: WebDataset shards, or a caption file whose image paths are relative to
    image_root (keys: the CSV/TSV columns to read, as open_clip's --csv-img-key/--csv-caption-key)."""
    if is_shards(data):
        return TarShards(data, image_size, skip_bad)
    return CaptionDataset(data, image_root, image_size, skip_bad, keys)


FOLDER_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}."]


class ImageFolder(torch.utils.data.Dataset):
    """A class-per-folder image tree (root/CLASS/xxx.jpg) for zero-shot classification; class
    names are the folder names with underscores read as spaces."""
    templates = FOLDER_TEMPLATES

    def __init__(self, root, image_size=224):
        if not os.path.isdir(root):
            raise DataError(f"image folder {root} does not exist")
        dirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.classes = [d.replace("_", " ") for d in dirs]
        self.items = [(os.path.join(root, d, f), c) for c, d in enumerate(dirs)
                      for f in sorted(os.listdir(os.path.join(root, d))) if f.lower().endswith(IMAGE_EXTS)]
        if not self.items:
            raise DataError(f"image folder {root} holds no images in class sub-folders")
        self.image_size = image_size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        return to_tensor(resize_center_crop(load_image(path, f"class folder {self.classes[label]}"), self.image_size)), label


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


# ----------------------------------------------------------------------------------------------
# Training pairs: what train.py's loop reads for a (dataset index, stream position) key

def lm_texts(dataset, i: int) -> list:
    """What the language model trains on for item i: its captions, plus the shapes' Q&A text."""
    return dataset.texts(i) if hasattr(dataset, "texts") else dataset.captions(i)


def in_context(caption: str, text: str) -> str:
    """A language-model text in context: a description of the scene, then the text itself. A
    frozen LM is steered by a soft prompt only as far as it learned to use what its context
    says; a large LM learns that from documents, a small one that sees one caption at a time
    does not. So the LM of the captioner trains on each text after another caption of its scene."""
    return f"{caption} {text}"


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
                text = in_context(others[int(rng.integers(len(others)))], text)
            return torch.zeros(0), text, 0
        item = self.dataset.get(i, rng)
        caps = item["captions"]
        return item["image"], caps[int(rng.integers(len(caps)))], item.get("skipped", 0)

    def collate(self, batch):
        images, captions, skipped = zip(*batch)
        return torch.stack(images), self.tokenizer(list(captions)), sum(skipped)


def loader_workers(device) -> int:
    """--workers -1: on CUDA the CPUs of this node shared among its processes (one left for each
    process itself), at most 8; on the CPU none, as the training shares the same cores."""
    if device.type != "cuda":
        return 0
    per_process = (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(8, per_process - 1))
