"""Synthetic videos for training and evaluating video object segmentation without a dataset.

A video is a random scene, fully determined by its seed and `SyntheticConfig`:

- a textured background (two octaves of colour noise, sometimes a faint pattern) seen by a
  slowly panning camera, with a mild flicker of the light and per-pixel noise;
- target objects (labels 1..K) of various shapes (ellipse, rectangle, polygon, star, blob)
  and textures (solid, stripes, checker, dots, gradient, colour noise) that translate,
  wiggle, rotate and change size, bounce off the frame border or leave the frame for good;
- look-alike distractors: unlabelled copies of a target's shape, texture and colours on their
  own path, often crossing the target's; the case where matching by appearance alone fails
  and kernel guidance (HMMN/KMN) helps;
- occluders: unlabelled objects whose path crosses a target, so targets get hidden and
  reappear.

Every target is clearly visible in frame 0 (the given annotation). Frames are rendered on
demand and independently (`SyntheticVideo.render(t)`), so a training sampler can ask for 3
frames without drawing the other 27. numpy + Pillow only: a 96x96 frame takes well under a
millisecond, a 480x854 video of 30 frames a few seconds including the JPEG files.

`write_davis(root, seeds, ...)` writes a DAVIS-format folder; `SyntheticVideos(seeds)` is a
list of videos with the `Sequence` interface (`len`, `frame(i)`, `mask(i)`, `objects`).
"""
import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw

from ._io import atomic_path, write_text
from .davis import davis_paths
from .palette import save_mask

__all__ = ["SyntheticConfig", "SyntheticVideo", "SyntheticVideos", "synthetic_video", "write_davis"]

SHAPES = ("ellipse", "rectangle", "polygon", "star", "blob")
TEXTURES = ("solid", "stripes", "checker", "dots", "gradient", "noise")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator. Ranges are inclusive (low, high) pairs."""

    height: int = 480
    width: int = 854
    num_frames: int = 30
    objects: tuple = (1, 3)  # targets per video
    distractors: tuple = (1, 2)  # unlabelled look-alikes of a target
    occluders: tuple = (0, 1)  # unlabelled objects crossing a target's path
    object_size: tuple = (0.10, 0.22)  # object radius, fraction of min(height, width)
    speed: float = 0.015  # largest centre speed, fraction of the frame diagonal per frame
    rotation: float = 4.0  # largest rotation speed, degrees per frame
    scale_change: float = 0.01  # largest relative size change per frame
    p_leave: float = 0.15  # probability that a target leaves the frame before the end
    camera_pan: float = 0.003  # largest background drift, fraction of the diagonal per frame
    noise: float = 3.0  # std of the per-pixel noise, 0..255 scale
    jpeg_quality: int = 95  # of the frames `write_davis` writes (4:4:4, no chroma subsampling)

    def __post_init__(self):
        if self.height < 8 or self.width < 8:
            raise ValueError(f"height, width: expected >= 8, got {self.height}x{self.width}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames: expected >= 1, got {self.num_frames}")
        for name in ("objects", "distractors", "occluders", "object_size"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name}: expected a range (low, high) with 0 <= low <= high, got {(lo, hi)}")
        if self.objects[0] < 1 or self.objects[1] > 255:
            raise ValueError(f"objects: expected a range within [1, 255], got {self.objects}")
        if not 0 <= self.p_leave <= 1:
            raise ValueError(f"p_leave: expected a probability in [0, 1], got {self.p_leave}")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- appearance


def _random_colour(rng):
    """A saturated-enough RGB colour in [0, 255] (HSV with S, V away from 0)."""
    h, s, v = rng.uniform(0, 1), rng.uniform(0.35, 1.0), rng.uniform(0.35, 1.0)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, np.float32) * 255


@dataclasses.dataclass
class _Look:
    texture: str
    c1: np.ndarray
    c2: np.ndarray
    freq: float
    angle: float
    grid: np.ndarray  # (4, 4, 3) colours for the "noise" texture

    @classmethod
    def sample(cls, rng):
        return cls(
            texture=TEXTURES[rng.integers(len(TEXTURES))],
            c1=_random_colour(rng),
            c2=_random_colour(rng),
            freq=float(rng.uniform(1.0, 3.0)),
            angle=float(rng.uniform(0, math.pi)),
            grid=rng.uniform(0, 255, (4, 4, 3)).astype(np.float32),
        )

    def colour(self, u, v):
        """RGB (N, 3) float32 at object-local coordinates u, v (object radius = 1)."""
        w = u * math.cos(self.angle) + v * math.sin(self.angle)
        if self.texture == "noise":
            gy = np.clip((v + 1.2) / 2.4 * 3, 0, 3)
            gx = np.clip((u + 1.2) / 2.4 * 3, 0, 3)
            y0, x0 = np.minimum(gy.astype(int), 2), np.minimum(gx.astype(int), 2)
            fy, fx = (gy - y0)[:, None], (gx - x0)[:, None]
            g = self.grid
            rgb = (g[y0, x0] * (1 - fy) * (1 - fx) + g[y0 + 1, x0] * fy * (1 - fx)
                   + g[y0, x0 + 1] * (1 - fy) * fx + g[y0 + 1, x0 + 1] * fy * fx)
        else:
            if self.texture == "solid":
                t = np.zeros_like(u)
            elif self.texture == "stripes":
                t = (np.sin(2 * math.pi * self.freq * w) > 0).astype(np.float32)
            elif self.texture == "checker":
                t = ((np.floor(self.freq * (u + 4)) + np.floor(self.freq * (v + 4))) % 2).astype(np.float32)
            elif self.texture == "dots":
                du, dv = self.freq * u * 1.5, self.freq * v * 1.5
                t = (((du - np.round(du)) ** 2 + (dv - np.round(dv)) ** 2) < 0.09).astype(np.float32)
            else:  # gradient
                t = np.clip((w + 1) / 2, 0, 1).astype(np.float32)
            rgb = self.c1[None] * (1 - t[:, None]) + self.c2[None] * t[:, None]
        shade = 1.0 - 0.25 * np.clip(u * u + v * v, 0, 1)  # a hint of volume
        return rgb * shade[:, None]


def _random_shape(rng):
    """(kind, unit polygon (N, 2) as x, y with radius about 1)."""
    kind = SHAPES[rng.integers(len(SHAPES))]
    if kind == "ellipse":
        a = rng.uniform(0.5, 1.0)
        th = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        pts = np.stack([np.cos(th), a * np.sin(th)], 1)
    elif kind == "rectangle":
        a = rng.uniform(0.4, 1.0)
        pts = np.array([[-1, -a], [1, -a], [1, a], [-1, a]]) / math.hypot(1, a) * 1.2
    elif kind == "polygon":
        n = int(rng.choice([3, 5, 6]))
        th = np.arange(n) * 2 * math.pi / n
        pts = np.stack([np.cos(th), np.sin(th)], 1)
    elif kind == "star":
        n = int(rng.integers(4, 8))
        inner = rng.uniform(0.4, 0.6)
        th = np.arange(2 * n) * math.pi / n
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
        pts = np.stack([r * np.cos(th), r * np.sin(th)], 1)
    else:  # blob
        th = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        r = np.ones_like(th)
        for k in (2, 3, 4):
            r += rng.uniform(0, 0.18) * np.cos(k * th + rng.uniform(0, 2 * math.pi))
        pts = np.stack([r * np.cos(th), r * np.sin(th)], 1) / r.max()
    return kind, pts.astype(np.float64)


# ----------------------------------------------------------------------------- motion


def _reflect(x, lo, hi):
    """Fold x into [lo, hi] as a ball bouncing between walls."""
    span = hi - lo
    if span <= 0:
        return np.full_like(x, (lo + hi) / 2)
    m = np.mod(x - lo, 2 * span)
    return lo + np.where(m <= span, m, 2 * span - m)


@dataclasses.dataclass
class _Object:
    label: int  # 1..K for targets, 0 for distractors and occluders
    role: str  # "target" | "distractor" | "occluder"
    kind: str
    shape: np.ndarray
    look: _Look
    radius: float  # pixels at t = 0
    centre: np.ndarray  # (x, y) at t = 0
    velocity: np.ndarray
    wiggle: np.ndarray  # amplitude (x, y), pixels
    wiggle_freq: float
    wiggle_phase: float
    angle: float
    spin: float  # radians per frame
    growth: float  # log-size per frame
    bounce: bool  # stay in the frame (bounce) or fly straight (may leave)
    twin: int = 0  # for a distractor, the label of the target it copies

    def pose(self, t, width, height):
        """(centre (x, y), angle, radius) at frame t."""
        c = self.centre + self.velocity * t + self.wiggle * math.sin(self.wiggle_freq * t + self.wiggle_phase)
        if self.bounce:
            c = np.array([_reflect(c[0], 0.0, width - 1.0), _reflect(c[1], 0.0, height - 1.0)])
        return c, self.angle + self.spin * t, self.radius * math.exp(self.growth * t)

    def draw(self, t, canvas, labels, instances, index):
        """Paint this object at frame t; returns the number of pixels it covers."""
        height, width = labels.shape
        c, a, r = self.pose(t, width, height)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        pts = c + r * self.shape @ rot.T
        x0, y0 = (max(0, int(math.floor(v))) for v in pts.min(0))
        x1 = min(width, int(math.ceil(pts[:, 0].max())) + 1)
        y1 = min(height, int(math.ceil(pts[:, 1].max())) + 1)
        if x1 <= x0 or y1 <= y0:
            return 0  # out of the frame
        img = Image.new("L", (x1 - x0, y1 - y0), 0)
        ImageDraw.Draw(img).polygon([tuple(p) for p in (pts - (x0, y0))], fill=1)
        inside = np.asarray(img, dtype=bool)
        ys, xs = np.nonzero(inside)
        if ys.size == 0:
            return 0
        dx, dy = xs + x0 - c[0], ys + y0 - c[1]
        # back to object-local coordinates: the texture moves and turns with the object
        u = (dx * math.cos(a) + dy * math.sin(a)) / r
        v = (-dx * math.sin(a) + dy * math.cos(a)) / r
        canvas[ys + y0, xs + x0] = self.look.colour(u.astype(np.float32), v.astype(np.float32))
        labels[ys + y0, xs + x0] = self.label
        if instances is not None:
            instances[ys + y0, xs + x0] = index + 1
        return ys.size


# ----------------------------------------------------------------------------- scene


class SyntheticVideo:
    """One synthetic video, deterministic by (seed, config). Frames are rendered on demand.

    Same interface as `hmmn_ops.data.video.Sequence`: `len(v)`, `v.frame(i)` (H, W, 3) uint8,
    `v.mask(i)` (H, W) int64, `v.objects`, `v.annotated`, `v.name`; plus `render(t)` and
    `arrays()`. `v.layout` describes every object (role, shape, texture, twin, leaves).
    """

    def __init__(self, seed, config=None, name=None):
        self.seed = int(seed)
        self.config = config or SyntheticConfig()
        self.name = name or f"synth{self.seed:05d}"
        rng = np.random.default_rng([self.seed, 0x5EED])
        self._build(rng)
        self._cache = (None, None)

    # -- construction

    def _build(self, rng):
        cfg = self.config
        h, w = cfg.height, cfg.width
        diag = math.hypot(h, w)
        # Background canvas larger than the frame by what the camera pans over the video.
        pan = rng.uniform(-1, 1, 2) * cfg.camera_pan * diag
        margin = int(math.ceil(np.abs(pan).max() * max(cfg.num_frames - 1, 0))) + 1
        self._pan, self._margin = pan, margin
        self._background = self._make_background(rng, h + 2 * margin, w + 2 * margin)
        self._flicker = (rng.uniform(0, 0.06), rng.uniform(0.1, 0.4), rng.uniform(0, 2 * math.pi))
        for _ in range(100):
            objects = self._sample_objects(rng)
            if self._first_frame_ok(objects):
                break
        else:  # crowded settings: keep the targets alone, spread out
            objects = [o for o in self._sample_objects(rng) if o.role == "target"]
        self._objects = objects
        self.layout = [
            {"role": o.role, "label": o.label, "shape": o.kind, "texture": o.look.texture, "twin": o.twin,
             "leaves": o.role == "target" and not o.bounce}
            for o in objects
        ]

    def _make_background(self, rng, h, w):
        def octave(cells, amplitude):
            gh, gw = max(2, int(round(h / cells))), max(2, int(round(w / cells)))
            grid = rng.uniform(-amplitude, amplitude, (gh, gw, 3)) + 128
            img = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
            return np.asarray(img, np.float32) - 128

        base = _random_colour(rng) * rng.uniform(0.5, 1.0)
        bg = base + octave(rng.uniform(0.2, 0.4) * max(h, w), 90) + octave(rng.uniform(0.03, 0.08) * max(h, w), 30)
        if rng.uniform() < 0.5:  # a faint pattern, so the background is not all smooth
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            period = rng.uniform(0.02, 0.08) * max(h, w)
            a = rng.uniform(0, math.pi)
            bg += 12 * np.sign(np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period))[..., None]
        return np.clip(bg, 0, 255).astype(np.float32)

    def _sample_objects(self, rng):
        cfg = self.config
        h, w, T = cfg.height, cfg.width, cfg.num_frames
        side = min(h, w)
        diag = math.hypot(h, w)

        def motion(radius, bounce):
            return dict(
                radius=radius,
                velocity=rng.uniform(-1, 1, 2) * cfg.speed * diag / math.sqrt(2),
                wiggle=rng.uniform(0, 0.05, 2) * side,
                wiggle_freq=float(rng.uniform(0.1, 0.5)),
                wiggle_phase=float(rng.uniform(0, 2 * math.pi)),
                angle=float(rng.uniform(0, 2 * math.pi)),
                spin=math.radians(rng.uniform(-1, 1) * cfg.rotation),
                growth=float(rng.uniform(-1, 1) * cfg.scale_change),
                bounce=bounce,
            )

        def size():
            return rng.uniform(*cfg.object_size) * side

        objects = []
        n_targets = int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))
        for k in range(1, n_targets + 1):
            kind, shape = _random_shape(rng)
            r = size()
            centre = np.array([rng.uniform(r, max(r, w - r)), rng.uniform(r, max(r, h - r))])
            m = motion(r, bounce=rng.uniform() >= cfg.p_leave)
            if not m["bounce"] and T > 1:
                # Fly straight out: leave the frame between 30% and 80% of the video.
                t_exit = rng.uniform(0.3, 0.8) * (T - 1)
                d = rng.uniform(0, 2 * math.pi)
                direction = np.array([math.cos(d), math.sin(d)])
                reach = r * math.exp(abs(m["growth"]) * T) * 1.6 + 0.5 * m["wiggle"].max()
                # distance from the centre to the border along `direction`, plus the object's reach
                tx = ((w - centre[0]) if direction[0] > 0 else centre[0]) / max(abs(direction[0]), 1e-6)
                ty = ((h - centre[1]) if direction[1] > 0 else centre[1]) / max(abs(direction[1]), 1e-6)
                m["velocity"] = direction * (min(tx, ty) + reach) / t_exit
            objects.append(_Object(label=k, role="target", kind=kind, shape=shape, look=_Look.sample(rng), centre=centre, **m))
        targets = list(range(n_targets))

        def crossing(target, m):
            """A start point so that this path meets the target's at a random frame."""
            t_meet = rng.uniform(0.2, 0.8) * max(T - 1, 0)
            meet, _, _ = objects[target].pose(t_meet, w, h)
            return meet - m["velocity"] * t_meet - m["wiggle"] * math.sin(m["wiggle_freq"] * t_meet + m["wiggle_phase"])

        for _ in range(int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1))):
            twin = int(rng.choice(targets))
            src = objects[twin]
            m = motion(src.radius * rng.uniform(0.8, 1.2), bounce=True)
            if rng.uniform() < 0.5:
                centre = crossing(twin, m)
                m["bounce"] = False  # a straight pass, so the crossing really happens
            else:
                centre = np.array([rng.uniform(0, w), rng.uniform(0, h)])
            objects.append(_Object(label=0, role="distractor", kind=src.kind, shape=src.shape, look=src.look,
                                   centre=centre, twin=src.label, **m))
        for _ in range(int(rng.integers(cfg.occluders[0], cfg.occluders[1] + 1))):
            kind, shape = _random_shape(rng)
            m = motion(size() * 0.8, bounce=False)
            m["velocity"] *= 1.5
            centre = crossing(int(rng.choice(targets)), m)
            objects.append(_Object(label=0, role="occluder", kind=kind, shape=shape, look=_Look.sample(rng), centre=centre, **m))
        # Drawing order = depth: shuffle, so any object may pass in front of any other.
        order = rng.permutation(len(objects))
        return [objects[i] for i in order]

    def _first_frame_ok(self, objects):
        """Every target shows at least half of itself, and not less than 16 pixels, in frame 0."""
        cfg = self.config
        labels = np.zeros((cfg.height, cfg.width), np.uint8)
        canvas = np.zeros((cfg.height, cfg.width, 3), np.float32)
        alone = {}
        for o in objects:
            if o.role == "target":
                alone[o.label] = o.draw(0, np.zeros_like(canvas), np.zeros_like(labels), None, 0)
        for i, o in enumerate(objects):
            o.draw(0, canvas, labels, None, i)
        visible = np.bincount(labels.ravel(), minlength=256)
        return all(visible[k] >= max(16, 0.5 * a) for k, a in alone.items())

    # -- rendering

    def render(self, t, instances=False):
        """Frame t: (image (H, W, 3) uint8, labels (H, W) uint8[, instances (H, W) int32]).

        `instances` maps each pixel to 1 + the index of the object drawn there in `layout`
        (0 = background): it shows the unlabelled distractors and occluders too.
        """
        cfg = self.config
        if not 0 <= t < cfg.num_frames:
            raise IndexError(f"t: expected a frame index in [0, {cfg.num_frames}), got {t}")
        h, w, m = cfg.height, cfg.width, self._margin
        ox, oy = (np.rint(m + self._pan * t)).astype(int)
        canvas = self._background[oy : oy + h, ox : ox + w].copy()
        labels = np.zeros((h, w), np.uint8)
        inst = np.zeros((h, w), np.int32) if instances else None
        for i, o in enumerate(self._objects):
            o.draw(t, canvas, labels, inst, i)
        amp, freq, phase = self._flicker
        canvas *= 1.0 + amp * math.sin(freq * t + phase)
        if cfg.noise > 0:
            noise_rng = np.random.default_rng([self.seed, 0x0015E, t])  # per frame: frames render in any order
            canvas += noise_rng.standard_normal((h, w, 3), dtype=np.float32) * cfg.noise
        image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
        return (image, labels, inst) if instances else (image, labels)

    def _rendered(self, i):
        i = range(len(self))[i]
        if self._cache[0] != i:
            self._cache = (i, self.render(i))
        return self._cache[1]

    def __len__(self):
        return self.config.num_frames

    def __repr__(self):
        return f"SyntheticVideo(seed={self.seed}, frames={len(self)}, objects={self.num_objects}, size={self.size})"

    @property
    def size(self):
        return (self.config.height, self.config.width)

    def frame(self, i):
        return self._rendered(i)[0]

    def mask(self, i):
        return self._rendered(i)[1].astype(np.int64)

    @property
    def annotated(self):
        return list(range(len(self)))

    @property
    def objects(self):
        return {o.label: 0 for o in sorted(self._objects, key=lambda o: o.label) if o.role == "target"}

    @property
    def num_objects(self):
        return len(self.objects)

    def arrays(self):
        """All frames: (frames (T, H, W, 3) uint8, masks (T, H, W) uint8)."""
        out = [self.render(t) for t in range(len(self))]
        return np.stack([f for f, _ in out]), np.stack([m for _, m in out])


def synthetic_video(seed, config=None, **overrides):
    """(frames (T, H, W, 3) uint8, masks (T, H, W) uint8) of the video of this seed.

    `overrides` replace fields of `config` (default `SyntheticConfig()`), e.g.
    `synthetic_video(3, height=96, width=96, num_frames=8)`.
    """
    config = (config or SyntheticConfig()).replace(**overrides) if overrides else config
    return SyntheticVideo(seed, config).arrays()


class SyntheticVideos:
    """A list of synthetic videos, one per seed, built on access (like a dataset reader)."""

    def __init__(self, seeds, config=None, prefix="synth"):
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError("seeds: expected at least one seed")
        self.config = config or SyntheticConfig()
        self.prefix = prefix

    def __len__(self):
        return len(self.seeds)

    def __getitem__(self, i):
        seed = self.seeds[i]
        return SyntheticVideo(seed, self.config, name=f"{self.prefix}{seed:05d}")

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _write_one(video, frame_dir, mask_dir, quality):
    for t in range(len(video)):
        image, labels = video.render(t)
        with atomic_path(os.path.join(frame_dir, f"{t:05d}.jpg")) as tmp:
            Image.fromarray(image).save(tmp, format="JPEG", quality=quality, subsampling=0)
        save_mask(os.path.join(mask_dir, f"{t:05d}.png"), labels)


def write_davis(root, seeds, config=None, set_name="val", year="2017", resolution="480p", prefix="synth", workers=1):
    """Write the videos of `seeds` as a DAVIS-format folder; returns the sequence names.

    ROOT/JPEGImages/<resolution>/<seq>/00000.jpg, ROOT/Annotations/<resolution>/<seq>/00000.png
    (DAVIS palette) and ROOT/ImageSets/<year>/<set_name>.txt. Every file is written under a
    temporary name and renamed; the set file comes last, so a listed set is complete. Existing
    files of the same names are replaced. `workers` > 1 renders videos in threads.
    """
    root = os.fspath(root)
    videos = SyntheticVideos(seeds, config, prefix)
    frame_root, mask_root, sets_root = davis_paths(root, resolution)

    def one(video):
        _write_one(video, os.path.join(frame_root, video.name), os.path.join(mask_root, video.name), videos.config.jpeg_quality)
        return video.name

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            names = list(pool.map(one, videos))
    else:
        names = [one(v) for v in videos]
    write_text(os.path.join(sets_root, year, f"{set_name}.txt"), "".join(n + "\n" for n in names))
    return names
