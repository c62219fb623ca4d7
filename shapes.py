"""
The captioned shapes: a dataset generated on the fly, deterministic from (seed, split, index), that
needs no files. Each scene holds 1-3 objects (a shape, a colour, a size, one cell of a 3x3 grid) on
a textured background; it comes with five paraphrased captions, its structured attributes, and for
every object the patches it covers: the ground truth for "did the reducer keep the tokens the
caption talks about". Train and test are disjoint by construction: a scene belongs to the test
split iff a hash of its attributes (not of its index) says so. Shapes videos move the objects.

Read first: `sample_scene` and `caption_scene` (what an example is), then `ShapesDataset`.
"""
import math
import re
import zlib

import numpy as np
import torch
from data import to_tensor, to_uint8

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {"red": (215, 35, 35), "green": (35, 165, 55), "blue": (40, 75, 225),
           "yellow": (235, 205, 25), "purple": (150, 45, 185), "orange": (245, 125, 15)}
SIZES = {"small": 0.085, "medium": 0.125, "large": 0.17}  # radius as a fraction of the image side
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
SPLITS = ("train", "test")
TEST_SHARE = 10  # one scene in TEST_SHARE belongs to the test split


# ----------------------------------------------------------------------------------------------
# Shapes: scenes, captions, rendering

def cell_name(row: int, col: int, rng=None) -> str:
    """Where a cell is, in words; `rng` picks a synonym for paraphrases."""
    r, c = ROWS[row], COLS[col]
    if rng is not None and rng.random() < 0.5:
        r = {"top": "upper", "bottom": "lower"}.get(r, r)
    if r == "middle" and c == "center":
        return "in the center"
    if r == "middle":
        return f"on the {c}"
    if c == "center":
        return f"at the {r}" if r in ("top", "bottom") else f"in the {r} middle"
    return f"in the {r} {c}"


def scene_split(scene) -> str:
    """The split a scene belongs to, from its attributes (a video's motions included)."""
    key = repr(sorted((o["shape"], o["colour"], o["size"], o["row"], o["col"]) + ((o["motion"],) if "motion" in o else ())
                      for o in scene))
    return "test" if zlib.crc32(key.encode()) % TEST_SHARE == 0 else "train"


def sample_scene(rng) -> list:
    """1-3 objects in distinct cells of a 3x3 grid (more objects more often: fewer look-alikes)."""
    n = rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4])
    cells = rng.choice(9, size=n, replace=False)
    return [dict(shape=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
                 size=list(SIZES)[rng.integers(len(SIZES))], row=int(c) // 3, col=int(c) % 3,
                 jitter=rng.uniform(-0.06, 0.06, size=2).tolist())
            for c in cells]


def object_phrase(o: dict, tail: str, rng) -> str:
    """One object in words, in one of two phrasings, followed by `tail` (its place or motion)."""
    if rng.random() < 0.5:
        return f"a {o['size']} {o['colour']} {o['shape']} {tail}"
    article = "an" if o["colour"] == "orange" else "a"
    return f"{article} {o['colour']} {o['shape']} of {o['size']} size {tail}"


def paraphrases(scene, rng, n: int, openers: list, tail, join) -> list:
    """`n` captions of a scene: an opener, then every object's phrase (in scene order for even k,
    shuffled for odd k) joined by `join`; tail(object) says where it is or how it moves."""
    caps = []
    for k in range(n):
        order = list(range(len(scene))) if k % 2 == 0 else list(rng.permutation(len(scene)))
        caps.append(openers[k % len(openers)] + join([object_phrase(scene[i], tail(scene[i]), rng) for i in order]))
    return caps


def caption_scene(scene, rng, n: int = 5) -> list:
    """`n` paraphrases of the same content: every object's size, colour, shape and cell."""
    openers = ["", "there is ", "an image of ", "a picture showing ", "a scene with "]
    join = lambda p: p[0] if len(p) == 1 else ", ".join(p[:-1]) + " and " + p[-1]
    return paraphrases(scene, rng, n, openers, lambda o: cell_name(o["row"], o["col"], rng), join)


def scene_questions(scene) -> list:
    """(question, one-word answer) pairs a scene answers without ambiguity: the colour of a shape
    and the shape of a colour that occur once, and how many objects there are."""
    shapes = [o["shape"] for o in scene]
    colours = [o["colour"] for o in scene]
    qa = [(f"what color is the {o['shape']}", o["colour"]) for o in scene if shapes.count(o["shape"]) == 1]
    qa += [(f"what shape is {o['colour']}", o["shape"]) for o in scene if colours.count(o["colour"]) == 1]
    qa.append(("how many objects are there", ("one", "two", "three")[len(scene) - 1]))
    return qa


def qa_text(caption: str, question: str, answer: str = "") -> str:
    """The question-answering format: the caption, then the question, then the answer; the
    language model learns it from text (--method lm) and is prompted with it (eval.py)."""
    return f"{caption} question: {question} answer: {answer}".rstrip()


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixels inside a shape of radius r, given offsets from its centre (y grows downwards)."""
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= 0.62 * (dy + r))
    if shape == "cross":
        arm = 0.36 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render_background(rng, size: int) -> np.ndarray:
    """A low-saturation base colour with random stripes and pixel noise, (size, size, 3) float."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(70, 170) + rng.uniform(-15, 15, size=3)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    for _ in range(2):
        angle, freq, amp = rng.uniform(0, math.pi), rng.uniform(2, 8), rng.uniform(6, 18)
        wave = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 6.3))
        img += amp * wave[..., None]
    img += rng.normal(0, 6, size=(size, size, 3))
    return img


def object_pixels(scene, size: int) -> np.ndarray:
    """(n_objects, size, size) bool: which pixels each object covers (later objects on top)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    masks = []
    for o in scene:
        cx = (o["col"] + 0.5 + o["jitter"][0]) * size / 3
        cy = (o["row"] + 0.5 + o["jitter"][1]) * size / 3
        masks.append(shape_mask(o["shape"], xx - cx, yy - cy, SIZES[o["size"]] * size))
    return np.stack(masks)


def render_scene(scene, background: np.ndarray) -> np.ndarray:
    img = background.copy()
    for o, m in zip(scene, object_pixels(scene, img.shape[0])):
        img[m] = COLOURS[o["colour"]]
    return np.clip(img, 0, 255).astype(np.uint8)


def patch_mask(pixels: np.ndarray, patch_size: int) -> np.ndarray:
    """(..., H, W) bool pixels -> (..., P) bool: a patch is covered if any of its pixels is."""
    *lead, H, W = pixels.shape
    g = pixels.reshape(*lead, H // patch_size, patch_size, W // patch_size, patch_size)
    return g.any(axis=(-3, -1)).reshape(*lead, -1)


class ShapesDataset(torch.utils.data.Dataset):
    """`n` captioned shapes scenes of one split. Item i is a dict: image (3, S, S) normalised,
    captions (5 str), attributes (list of object dicts), object_patches (n_obj, P) bool and
    patch_mask (P,) bool (any object)."""

    def __init__(self, split="train", n=10000, image_size=64, patch_size=8, seed=0, cache=False):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (choose train or test)")
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
        self.split, self.n, self.image_size, self.patch_size, self.seed = split, n, image_size, patch_size, seed
        self.cache = {} if cache else None  # rendered items: a training set is re-read every epoch

    def __len__(self):
        return self.n

    def rng(self, i: int, attempt: int = 0):
        return np.random.default_rng([self.seed, SPLITS.index(self.split), i, attempt])

    sample = staticmethod(sample_scene)

    def scene(self, i: int):
        """The scene of item i and the rng that goes on to draw its captions and texture."""
        for attempt in range(1000):
            rng = self.rng(i, attempt)
            scene = self.sample(rng)
            if scene_split(scene) == self.split:
                return scene, rng
        raise RuntimeError("no scene of this split found")  # unreachable: ~1 in 10 scenes is test

    def captions(self, i: int) -> list:
        scene, rng = self.scene(i)
        return caption_scene(scene, rng)

    def texts(self, i: int) -> list:
        """Language-model training text: the captions, and each question about the scene
        asked after one of them (text alone: no image is involved)."""
        caps = self.captions(i)
        qa = scene_questions(self.scene(i)[0])
        return caps + [qa_text(caps[k % len(caps)], q, a) for k, (q, a) in enumerate(qa)]

    def rendered(self, i):
        """render(i), kept when the dataset caches (a training set is re-read every epoch)."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        item = None if self.cache is None else self.cache.get(i)
        if item is None:
            item = self.render(i)
            if self.cache is not None:
                self.cache[i] = item
        return item

    def __getitem__(self, i):
        image, captions, scene, objects = self.rendered(i)
        return dict(image=to_tensor(image), captions=captions, attributes=scene,
                    object_patches=torch.from_numpy(objects), patch_mask=torch.from_numpy(objects.any(0)))

    def get(self, i, rng=None):
        """Item i as training draws it, its image uint8 (normalised on the device). Shapes take no
        augmentation: a crop or flip would move objects out of the cells their captions name."""
        image, captions = self.rendered(i)[:2]
        return dict(image=to_uint8(image), captions=captions)

    def render(self, i):
        scene, rng = self.scene(i)
        captions = caption_scene(scene, rng)
        image = render_scene(scene, render_background(rng, self.image_size))
        objects = patch_mask(object_pixels(scene, self.image_size), self.patch_size)
        return image, captions, scene, objects


# ----------------------------------------------------------------------------------------------
# Shapes videos: the same scene over T frames, each object moving one way or staying

MOTIONS = ("left", "right", "up", "down", "still")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
MOTION_PHRASES = {"left": ("moves to the left", "moving left", "goes left"),
                  "right": ("moves to the right", "moving right", "goes right"),
                  "up": ("moves up", "moving up", "goes up"),
                  "down": ("moves down", "moving down", "goes down"),
                  "still": ("stays still", "is still", "standing still")}
TRAVEL = 0.6  # how far an object moves over the clip, in cells (a cell is a third of the image side)


def sample_video_scene(rng) -> list:
    """1-2 objects in distinct cells, each with a motion; fewer objects than the images, since
    the caption now has to say how each one moves."""
    n = rng.choice([1, 2])
    cells = rng.choice(9, size=n, replace=False)
    return [dict(shape=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
                 size=list(SIZES)[rng.integers(len(SIZES))], row=int(c) // 3, col=int(c) % 3,
                 jitter=rng.uniform(-0.06, 0.06, size=2).tolist(), motion=MOTIONS[rng.integers(len(MOTIONS))])
            for c in cells]


def caption_video(scene, rng, n: int = 5) -> list:
    """`n` paraphrases naming every object and its motion, e.g. "a small red circle moves to the
    left and a large blue square stays still". No cell names: "left" must mean the motion."""
    openers = ["", "in this video ", "a clip where ", "a video of ", "we see "]
    return paraphrases(scene, rng, n, openers, lambda o: MOTION_PHRASES[o["motion"]][rng.integers(3)], " and ".join)


def moved(scene, t: int, frames: int) -> list:
    """The scene at frame t: each object's jitter shifted along its motion, centred on its cell
    over the clip (so its mean position is where the still picture would put it)."""
    step = (t / (frames - 1) - 0.5) * TRAVEL if frames > 1 else 0.0
    return [{**o, "jitter": [o["jitter"][0] + step * DIRECTIONS[o["motion"]][0],
                             o["jitter"][1] + step * DIRECTIONS[o["motion"]][1]]} for o in scene]


def motion_of(caption: str, colour: str, shape: str):
    """The motion a caption gives the object "{colour} {shape}", or None: the first motion word in
    the part of the caption (split at "and" and commas) that names its colour — and its shape too,
    if several parts name the colour. The object is found by its colour because the frozen ViTs
    here know colours far better than shapes: motion accuracy should not be shape accuracy."""
    parts = [p.split() for p in re.split(r",| and ", caption)]
    named = [p for p in parts if colour in p]
    part = next((p for p in named if shape in p), named[0] if named else [])
    return next((w for w in part if w in MOTIONS), None)


class ShapesVideoDataset(ShapesDataset):
    """`n` captioned clips of `frames` frames: item i is a dict with image (T, 3, S, S), captions
    (5 str naming each object's motion) and attributes (the objects, with "motion"). The camera
    is still: one background, objects drawn at their place in each frame. Deterministic from
    (seed, split, index) like the images, and split by attributes (motions included)."""

    def __init__(self, split="train", n=10000, image_size=64, patch_size=8, seed=0, frames=4, cache=False):
        super().__init__(split, n, image_size, patch_size, seed, cache)
        if frames < 1:
            raise ValueError(f"a clip needs at least one frame, got {frames}")
        self.frames = frames

    sample = staticmethod(sample_video_scene)

    def rng(self, i: int, attempt: int = 0):
        return np.random.default_rng([self.seed, SPLITS.index(self.split), i, attempt, 7])  # 7: apart from the images

    def captions(self, i: int) -> list:
        scene, rng = self.scene(i)
        return caption_video(scene, rng)

    def texts(self, i: int) -> list:
        return self.captions(i)  # the language model of the video captioner reads the captions alone

    def __getitem__(self, i):
        frames, captions, scene = self.rendered(i)
        return dict(image=torch.stack([to_tensor(f) for f in frames]), captions=captions, attributes=scene)

    def get(self, i, rng=None):
        frames, captions = self.rendered(i)[:2]
        return dict(image=torch.stack([to_uint8(f) for f in frames]), captions=captions)

    def render(self, i):
        scene, rng = self.scene(i)
        captions = caption_video(scene, rng)
        background = render_background(rng, self.image_size)
        frames = [render_scene(moved(scene, t, self.frames), background) for t in range(self.frames)]
        return frames, captions, scene


def zeroshot_label(scene) -> str:
    """The zero-shot class of a one-object scene: '{colour} {shape}' (30 classes)."""
    return f"{scene[0]['colour']} {scene[0]['shape']}"


SHAPES_CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
SHAPES_TEMPLATES = ["a {}", "there is a {}", "an image of a {}", "a picture showing a {}"]


