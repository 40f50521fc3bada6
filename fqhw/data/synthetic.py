"""The built-in synthetic dermatology data set.

Lesion images on skin backgrounds whose tone follows the six Fitzpatrick skin types. Classes
are told apart by four cues, each drawn from the class's prototype with probability
`cue_reliability` (otherwise from all values of that cue, so classes overlap):

- shape: round, oval, irregular (many small harmonics), lobed (a few large ones)
- border: sharp or blurred
- colour: the pigment's absorption per RGB channel (brown, black, red, blue-grey)
- texture: uniform, mottled (smooth random field) or dotted (sparse dots / globules)

A lesion darkens the skin multiplicatively, pixel = skin * (1 - k * mask * absorb * texture),
with k = the skin type's `contrast` times a per-image jitter. Because the skin itself is
darker and its contrast factor is lower, every cue is smaller, in pixel levels, on dark skin,
while the sensor noise (`noise_std`, in pixel levels) is the same for all: the dark (and
rare) groups are genuinely harder, and their small activation differences are what coarse
activation quantization erases first.

Artefacts (each kind independently, at its own rate): hairs, ruler marks, vignetting and
specular highlights. Everything is vectorised numpy, generated in chunks, and deterministic
in `seed`; each split has its own random stream, so changing `n_test` leaves `train` as is.
Within each split, the group counts follow the shares exactly (largest remainder): the
training split `group_shares` (skewed like Fitzpatrick17k), the validation and test splits
`eval_group_shares` (equal by default, 500 validation and 1000 test images per type), and
classes are balanced within each group, so group and class are independent.

The defaults were tuned so that the data set shows the effect fqhw exists to fix. Trained
with train_float(FairCNN(), epochs=12, lr=3e-3, batch_size=64) (about 40 s on one thread),
seeds 0, 1, 2 gave on the 5000-image test split: mean-group accuracy 83-85 %, worst group
(type VI) 60-70 %, a mean-minus-worst gap of 15-23 points; uniform 8-bit QAT (2 epochs)
kept the gap within a few points of the float model; uniform 4-bit (weights and
activations, 8-bit input) widened it to 25-31 points, light types I-III losing about 1 point
and types V-VI 5-13. Lowering `noise_std` or raising the dark types' `contrast` closes
the gap; the sensor noise must stay small next to the dark-skin lesion signal, or the dark
groups are noise-limited in float already and quantization adds little.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..errors import FqhwError
from .dataset import DataSplits, GroupedImages

GROUP_NAMES = ["FST-I", "FST-II", "FST-III", "FST-IV", "FST-V", "FST-VI"]

# Mean skin colour (RGB, 0..255) per Fitzpatrick type, light to dark.
SKIN_RGB = np.array(
    [
        [236, 202, 182],
        [222, 182, 152],
        [196, 150, 116],
        [158, 113, 80],
        [112, 76, 54],
        [70, 47, 35],
    ],
    dtype=np.float32,
)

SHAPES = ["round", "oval", "irregular", "lobed"]
BORDERS = ["sharp", "blurred"]
COLOURS = ["brown", "black", "red", "blue-grey"]
TEXTURES = ["uniform", "mottled", "dotted"]

# Fraction of light absorbed per RGB channel by fully opaque pigment of each colour.
ABSORB = np.array(
    [
        [0.50, 0.64, 0.76],  # brown: absorbs blue most
        [0.82, 0.82, 0.80],  # black
        [0.10, 0.58, 0.48],  # red: keeps the red channel
        [0.56, 0.46, 0.26],  # blue-grey: keeps the blue channel
    ],
    dtype=np.float32,
)

# Class prototypes (name, shape, border, colour, texture); the first num_classes are used.
PROTOTYPES = [
    ("nevus", "round", "sharp", "brown", "uniform"),
    ("melanoma", "irregular", "blurred", "black", "mottled"),
    ("vascular", "lobed", "sharp", "red", "dotted"),
    ("blue-nevus", "oval", "blurred", "blue-grey", "uniform"),
    ("seborrheic-keratosis", "lobed", "sharp", "brown", "mottled"),
    ("basal-cell", "irregular", "sharp", "blue-grey", "dotted"),
    ("dermatofibroma", "round", "blurred", "red", "mottled"),
    ("actinic-keratosis", "irregular", "blurred", "red", "uniform"),
]
MAX_CLASSES = len(PROTOTYPES)


EQUAL_SHARES = tuple(1.0 / len(GROUP_NAMES) for _ in GROUP_NAMES)


@dataclass(frozen=True)
class SyntheticDermConfig:
    """Every knob of the generator. Defaults: 32x32 RGB, 4 classes, Fitzpatrick17k-like shares."""

    seed: int = 0
    n_train: int = 6000
    n_val: int = 3000  # 500 per type (eval_group_shares)
    n_test: int = 6000  # 1000 per type: a group's accuracy within about +-2.8 points (95 %)
    image_size: int = 32
    num_classes: int = 4
    # Share of each Fitzpatrick type I..VI in the training split (Fitzpatrick17k is
    # light-heavy, type VI rare): the under-representation that causes the problem.
    group_shares: tuple[float, ...] = (0.18, 0.30, 0.21, 0.17, 0.10, 0.04)
    # Share of each type in the validation and test splits: equal by default, so that the
    # rare groups' accuracies can be resolved (a skewed test set only hides the problem:
    # 4 % of 5000 is 200 images, +-6.7 points at 95 %). None: the training shares.
    eval_group_shares: tuple[float, ...] | None = EQUAL_SHARES
    # Lesion contrast factor per type I..VI (melanin masks the lesion): multiplies the pigment.
    contrast: tuple[float, ...] = (1.0, 0.85, 0.70, 0.48, 0.30, 0.20)
    # Share of each class (None: balanced).
    class_shares: tuple[float, ...] | None = None
    # Probability that each of the four cues follows the class prototype (else random).
    cue_reliability: float = 0.8
    # Gaussian sensor noise, in pixel levels (0..255), the same for every skin type.
    noise_std: float = 3.0
    # Amplitude of the skin's own low-frequency tone variation (relative).
    skin_texture: float = 0.04
    # Per-image probability of each artefact kind.
    hair_rate: float = 0.25
    ruler_rate: float = 0.10
    vignette_rate: float = 0.30
    specular_rate: float = 0.20

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SyntheticDermConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FqhwError(f"synthetic data: unknown knob(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**d)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def validate(cfg: SyntheticDermConfig) -> None:
    """Raise FqhwError with a one-line message naming the knob and the fix."""

    def fail(msg: str) -> None:
        raise FqhwError(f"synthetic data: {msg}")

    if not _is_int(cfg.seed) or cfg.seed < 0:
        fail(f"seed={cfg.seed!r} must be a non-negative integer")
    for name in ("n_train", "n_val", "n_test"):
        v = getattr(cfg, name)
        if not _is_int(v) or v < 1:
            fail(f"{name}={v!r} must be a positive integer")
    s = cfg.image_size
    if not _is_int(s) or s < 8 or s > 128 or s % 4:
        fail(f"image_size={s!r} must be a multiple of 4 between 8 and 128 (e.g. 32)")
    if not _is_int(cfg.num_classes) or not 2 <= cfg.num_classes <= MAX_CLASSES:
        fail(f"num_classes={cfg.num_classes!r} must be an integer from 2 to {MAX_CLASSES}")
    _check_shares("group_shares", cfg.group_shares, len(GROUP_NAMES), fail)
    if cfg.eval_group_shares is not None:
        _check_shares("eval_group_shares", cfg.eval_group_shares, len(GROUP_NAMES), fail)
    if cfg.class_shares is not None:
        _check_shares("class_shares", cfg.class_shares, cfg.num_classes, fail)
        if min(cfg.class_shares) <= 0:
            fail("class_shares must all be > 0 (every class needs samples); drop the class with num_classes instead")
    c = cfg.contrast
    if not isinstance(c, (tuple, list)) or len(c) != len(GROUP_NAMES):
        fail(f"contrast needs {len(GROUP_NAMES)} values (one per Fitzpatrick type I..VI), got {c!r}")
    if not all(_is_num(v) and 0 < v <= 1 for v in c):
        fail(f"contrast values must lie in (0, 1], got {tuple(c)!r}")
    if not _is_num(cfg.cue_reliability) or not 0 <= cfg.cue_reliability <= 1:
        fail(f"cue_reliability={cfg.cue_reliability!r} must lie in [0, 1] (1: every cue follows its class)")
    if not _is_num(cfg.noise_std) or not 0 <= cfg.noise_std <= 64:
        fail(f"noise_std={cfg.noise_std!r} must lie in [0, 64] pixel levels")
    if not _is_num(cfg.skin_texture) or not 0 <= cfg.skin_texture <= 0.5:
        fail(f"skin_texture={cfg.skin_texture!r} must lie in [0, 0.5]")
    for name in ("hair_rate", "ruler_rate", "vignette_rate", "specular_rate"):
        v = getattr(cfg, name)
        if not _is_num(v) or not 0 <= v <= 1:
            fail(f"{name}={v!r} must be a probability in [0, 1]")


def _check_shares(name, shares, n, fail) -> None:
    if not isinstance(shares, (tuple, list)) or len(shares) != n:
        fail(f"{name} needs {n} values, got {shares!r}")
    if not all(_is_num(v) and v >= 0 for v in shares):
        fail(f"{name} must be non-negative numbers, got {tuple(shares)!r}")
    total = float(sum(shares))
    if abs(total - 1.0) > 1e-6:
        fail(f"{name} sum to {total:.6g}, not 1; rescale them so they sum to 1")


# ---------------------------------------------------------------------------------------
# generation


def class_names(num_classes: int) -> list[str]:
    return [p[0] for p in PROTOTYPES[:num_classes]]


def _exact_counts(n: int, shares) -> np.ndarray:
    """Largest-remainder rounding of n * shares (sums to n exactly)."""
    raw = np.asarray(shares, dtype=np.float64) * n
    counts = np.floor(raw).astype(np.int64)
    rest = n - counts.sum()
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


def _interp_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) bilinear interpolation weights, align-corners."""
    pos = np.linspace(0, in_size - 1, out_size)
    lo = np.floor(pos).astype(int).clip(0, in_size - 2) if in_size > 1 else np.zeros(out_size, int)
    frac = pos - lo
    m = np.zeros((out_size, in_size), dtype=np.float32)
    m[np.arange(out_size), lo] += 1 - frac
    if in_size > 1:
        m[np.arange(out_size), lo + 1] += frac
    return m


def _smooth_field(rng: np.random.Generator, n: int, size: int, coarse: int) -> np.ndarray:
    """n smooth random fields (n, size, size), roughly unit variance, from a coarse grid."""
    g = rng.standard_normal((n, coarse, coarse), dtype=np.float32)
    u = _interp_matrix(size, coarse)
    f = np.einsum("hi,nij,wj->nhw", u, g, u, optimize=True)
    return f / (f.std(axis=(1, 2), keepdims=True) + 1e-6)


def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float32)
    k = np.exp(-0.5 * ((x[:, None] - x[None, :]) / sigma) ** 2)
    return k


def _sample_attr(rng, n, proto_vals, n_vals, reliability) -> np.ndarray:
    keep = rng.random(n) < reliability
    return np.where(keep, proto_vals, rng.integers(0, n_vals, n))


def _render(cfg: SyntheticDermConfig, labels: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, s = len(labels), cfg.image_size
    sc = s / 32.0  # geometric quantities are given for 32x32 and scaled
    yy, xx = np.meshgrid(np.arange(s, dtype=np.float32), np.arange(s, dtype=np.float32), indexing="ij")

    # -- the cues, per image
    proto = np.array(
        [
            [SHAPES.index(p[1]), BORDERS.index(p[2]), COLOURS.index(p[3]), TEXTURES.index(p[4])]
            for p in PROTOTYPES[: cfg.num_classes]
        ]
    )[labels]
    r = cfg.cue_reliability
    shape = _sample_attr(rng, n, proto[:, 0], len(SHAPES), r)
    border = _sample_attr(rng, n, proto[:, 1], len(BORDERS), r)
    colour = _sample_attr(rng, n, proto[:, 2], len(COLOURS), r)
    texture = _sample_attr(rng, n, proto[:, 3], len(TEXTURES), r)

    # -- skin background: type colour, per-image tone jitter, low-frequency tone variation
    skin = SKIN_RGB[groups] * rng.uniform(0.92, 1.08, (n, 1)).astype(np.float32)
    skin = skin * rng.uniform(0.97, 1.03, (n, 3)).astype(np.float32)
    tone = 1.0 + cfg.skin_texture * _smooth_field(rng, n, s, 4)
    img = skin[:, :, None, None] * tone[:, None]  # n,3,s,s

    # -- lesion geometry: polar radius with harmonics, elliptic stretch, rotation
    cx = s / 2 + rng.uniform(-3, 3, n).astype(np.float32) * sc
    cy = s / 2 + rng.uniform(-3, 3, n).astype(np.float32) * sc
    radius = rng.uniform(5.5, 10.0, n).astype(np.float32) * sc
    rot = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    aspect = np.where(shape == 1, rng.uniform(1.5, 2.0, n), rng.uniform(1.0, 1.15, n)).astype(np.float32)
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    c, si = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
    u = (dx * c + dy * si) / np.sqrt(aspect)[:, None, None]
    v = (-dx * si + dy * c) * np.sqrt(aspect)[:, None, None]
    rho = np.sqrt(u * u + v * v)
    # cos(k*theta + phase) = Re(z^k e^{i phase}) with z = e^{i theta}: powers, no trig per pixel
    z = ((u + 1j * v) / np.maximum(rho, 1e-6)).astype(np.complex64)
    zk = z.copy()
    powers = {1: z}
    for k in range(2, 10):
        zk = zk * z
        powers[k] = zk

    def harmonic(k, amp, ph):
        rot_ph = (amp * np.exp(1j * ph)).astype(np.complex64)[:, None, None]
        return (powers[k] * rot_ph).real

    wobble = np.zeros_like(rho)
    # irregular: harmonics 5..9 of moderate amplitude; lobed: 3 or 4 big lobes; round/oval: a trace
    for k in range(2, 10):
        if k <= 4:
            amp = np.where(shape == 3, rng.uniform(0.0, 0.08, n), rng.uniform(0.0, 0.03, n))
        else:
            amp = np.where(shape == 2, rng.uniform(0.04, 0.10, n), rng.uniform(0.0, 0.012, n))
        ph = rng.uniform(0, 2 * np.pi, n)
        wobble += harmonic(k, amp, ph)
    lobes = rng.choice([3, 4], n)
    lobe_amp = np.where(shape == 3, rng.uniform(0.22, 0.32, n), 0.0)
    lobe_ph = rng.uniform(0, 2 * np.pi, n)
    for k in (3, 4):
        wobble += harmonic(k, np.where(lobes == k, lobe_amp, 0.0), lobe_ph)
    edge = radius[:, None, None] * (1 + wobble)
    width = np.where(border == 0, rng.uniform(0.25, 0.6, n), rng.uniform(1.6, 3.0, n)).astype(np.float32) * sc
    mask = 1.0 / (1.0 + np.exp(np.clip((rho - edge) / width[:, None, None], -30, 30)))

    # -- texture modulation of the pigment density (mean ~1)
    tex = np.ones((n, s, s), dtype=np.float32)
    mott = texture == 1
    if mott.any():
        f = _smooth_field(rng, int(mott.sum()), s, max(3, s // 5))
        tex[mott] = np.clip(1.0 + 0.45 * f, 0.2, 1.9)
    dot = texture == 2
    if dot.any():
        m = int(dot.sum())
        pts = (rng.random((m, s, s)) < 0.05).astype(np.float32)
        b = _blur_matrix(s, 0.6 * sc)
        d = np.einsum("hi,nij,wj->nhw", b, pts, b, optimize=True)
        tex[dot] = 0.55 + 1.3 * np.clip(d, 0, 1.2)

    # -- pigment: multiplicative absorption, scaled by the skin type's contrast
    absorb = ABSORB[colour] * rng.uniform(0.92, 1.08, (n, 3)).astype(np.float32)
    k = np.asarray(cfg.contrast, dtype=np.float32)[groups] * rng.uniform(0.8, 1.05, n).astype(np.float32)
    dens = np.clip(k[:, None, None] * mask * tex, 0, 1.0)
    img = img * (1.0 - np.clip(dens[:, None] * absorb[:, :, None, None], 0, 0.97))

    # -- artefacts
    _hairs(cfg, rng, img, xx, yy, sc)
    _rulers(cfg, rng, img, xx, yy, sc)
    if cfg.vignette_rate > 0:
        on = rng.random(n) < cfg.vignette_rate
        strength = np.where(on, rng.uniform(0.15, 0.45, n), 0.0).astype(np.float32)
        r2 = ((xx - s / 2) ** 2 + (yy - s / 2) ** 2) / (s / 2) ** 2 / 2.0
        img *= (1.0 - strength[:, None, None, None] * r2[None, None])
    if cfg.specular_rate > 0:
        on = rng.random(n) < cfg.specular_rate
        for _ in range(2):
            px, py = rng.uniform(0, s, n), rng.uniform(0, s, n)
            sig = rng.uniform(0.5, 1.0, n) * sc
            a = np.where(on & (rng.random(n) < 0.8), rng.uniform(0.5, 0.9, n), 0.0)
            idx = np.nonzero(a > 0)[0]
            if not len(idx):
                continue
            f32 = lambda t: t[idx].astype(np.float32)[:, None, None]  # noqa: E731
            d2 = (xx[None] - f32(px)) ** 2 + (yy[None] - f32(py)) ** 2
            alpha = (f32(a) * np.exp(-d2 / (2 * f32(sig) ** 2)))[:, None]
            img[idx] = img[idx] * (1 - alpha) + 250.0 * alpha

    # -- sensor noise, quantize
    if cfg.noise_std > 0:
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(cfg.noise_std)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _hairs(cfg, rng, img, xx, yy, sc) -> None:
    n, s = img.shape[0], img.shape[-1]
    if cfg.hair_rate <= 0:
        return
    count = np.where(rng.random(n) < cfg.hair_rate, rng.integers(1, 4, n), 0)
    colour = np.array([38, 28, 22], dtype=np.float32)[None, :, None, None]
    for j in range(3):
        on = count > j
        ang = rng.uniform(0, np.pi, n)
        px, py = rng.uniform(0, s, n), rng.uniform(0, s, n)
        curv = rng.uniform(-0.04, 0.04, n) / sc
        w = rng.uniform(0.35, 0.6, n) * sc
        a = rng.uniform(0.5, 0.85, n)
        idx = np.nonzero(on)[0]
        if not len(idx):
            continue
        f32 = lambda t: t[idx].astype(np.float32)[:, None, None]  # noqa: E731
        ca, sa = np.cos(f32(ang)), np.sin(f32(ang))
        du, dv = xx[None] - f32(px), yy[None] - f32(py)
        along = du * ca + dv * sa
        across = -du * sa + dv * ca - f32(curv) * along**2
        alpha = (f32(a) * np.exp(-0.5 * (across / f32(w)) ** 2))[:, None]
        img[idx] = img[idx] * (1 - alpha) + alpha * colour


def _rulers(cfg, rng, img, xx, yy, sc) -> None:
    n, s = img.shape[0], img.shape[-1]
    if cfg.ruler_rate <= 0:
        return
    on = rng.random(n) < cfg.ruler_rate
    if not on.any():
        return
    idx = np.nonzero(on)[0]
    m = len(idx)
    period = rng.integers(3, 5, m) * max(1, round(sc))
    phase = rng.integers(0, 4, m)
    length = rng.uniform(2, 4, m) * sc
    edge = rng.integers(0, 4, m)  # top, bottom, left, right
    along = np.where(edge[:, None, None] < 2, xx[None], yy[None])
    depth = np.select(
        [edge[:, None, None] == 0, edge[:, None, None] == 1, edge[:, None, None] == 2],
        [yy[None], s - 1 - yy[None], xx[None]],
        s - 1 - xx[None],
    )
    ticks = ((along + phase[:, None, None]) % period[:, None, None]) < 1
    tick_len = np.where(((along + phase[:, None, None]) // period[:, None, None]) % 5 == 0, 1.8, 1.0) * length[:, None, None]
    band = (depth < tick_len) & ticks
    alpha = (0.8 * band).astype(np.float32)[:, None]
    img[idx] = img[idx] * (1 - alpha) + 20.0 * alpha


def _make_split(cfg: SyntheticDermConfig, n: int, stream: int, chunk: int, shares) -> GroupedImages:
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, stream]))
    groups = np.repeat(np.arange(len(GROUP_NAMES)), _exact_counts(n, shares))
    class_shares = cfg.class_shares or [1.0 / cfg.num_classes] * cfg.num_classes
    labels = np.empty(n, dtype=np.int64)
    # classes balanced within each group (so group and class are independent, as in a
    # study that samples each skin type's diagnoses alike)
    for g in range(len(GROUP_NAMES)):
        sel = np.nonzero(groups == g)[0]
        labels[sel] = rng.permutation(np.repeat(np.arange(cfg.num_classes), _exact_counts(len(sel), class_shares)))
    order = rng.permutation(n)
    groups, labels = groups[order].astype(np.int64), labels[order]
    images = np.empty((n, 3, cfg.image_size, cfg.image_size), dtype=np.uint8)
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        images[sl] = _render(cfg, labels[sl], groups[sl], rng)
    return GroupedImages(images, labels, groups, list(GROUP_NAMES), class_names(cfg.num_classes))


def generate(cfg: SyntheticDermConfig | None = None) -> DataSplits:
    """Train/val/test splits, deterministic in cfg.seed (and independent of each other's sizes)."""
    cfg = cfg or SyntheticDermConfig()
    validate(cfg)
    chunk = max(64, (1 << 22) // (cfg.image_size * cfg.image_size))  # bounded memory for any size
    eval_shares = cfg.group_shares if cfg.eval_group_shares is None else cfg.eval_group_shares
    return DataSplits(
        train=_make_split(cfg, cfg.n_train, 0, chunk, cfg.group_shares),
        val=_make_split(cfg, cfg.n_val, 1, chunk, eval_shares),
        test=_make_split(cfg, cfg.n_test, 2, chunk, eval_shares),
        name="synthetic-derm",
    )


def describe(splits: DataSplits) -> dict:
    """Counts per split, per group and per class (and the group x class table)."""
    out: dict = {"name": splits.name}
    for split in ("train", "val", "test"):
        d: GroupedImages = getattr(splits, split)
        table = np.zeros((d.num_groups, d.num_classes), dtype=np.int64)
        np.add.at(table, (d.groups, d.labels), 1)
        out[split] = {
            "n": len(d),
            "per_group": {g: int(table[i].sum()) for i, g in enumerate(d.group_names)},
            "per_class": {c: int(table[:, j].sum()) for j, c in enumerate(d.class_names)},
            "group_class": {g: {c: int(table[i, j]) for j, c in enumerate(d.class_names)} for i, g in enumerate(d.group_names)},
        }
    return out
