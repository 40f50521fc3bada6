"""The synthetic dermatology generator: determinism, shares, contrast, validation."""
import numpy as np
import pytest

from fqhw.data.synthetic import GROUP_NAMES, SyntheticDermConfig, describe, generate
from fqhw.errors import FqhwError

SMALL = dict(n_train=120, n_val=30, n_test=30, image_size=16)


def test_same_seed_same_arrays_other_seed_differs():
    a = generate(SyntheticDermConfig(seed=3, **SMALL))
    b = generate(SyntheticDermConfig(seed=3, **SMALL))
    c = generate(SyntheticDermConfig(seed=4, **SMALL))
    for split in ("train", "val", "test"):
        x, y = getattr(a, split), getattr(b, split)
        assert np.array_equal(x.images, y.images)
        assert np.array_equal(x.labels, y.labels)
        assert np.array_equal(x.groups, y.groups)
    assert not np.array_equal(a.train.images, c.train.images)
    assert not np.array_equal(a.train.labels, c.train.labels)


def test_splits_are_independent_of_each_others_size():
    a = generate(SyntheticDermConfig(seed=1, **SMALL))
    b = generate(SyntheticDermConfig(seed=1, **{**SMALL, "n_test": 50}))
    assert np.array_equal(a.train.images, b.train.images)
    assert not np.array_equal(a.train.images[:30], a.val.images)


def test_types_shapes_and_names():
    s = generate(SyntheticDermConfig(**SMALL))
    d = s.train
    assert d.images.dtype == np.uint8 and d.images.shape == (120, 3, 16, 16)
    assert d.labels.dtype == np.int64 and d.groups.dtype == np.int64
    assert d.group_names == GROUP_NAMES and d.num_classes == 4
    assert set(np.unique(d.labels)) == {0, 1, 2, 3}
    assert len(s.val) == 30 and len(s.test) == 30


def test_shares_as_configured_and_describe():
    cfg = SyntheticDermConfig(n_train=1000, n_val=10, n_test=10, image_size=8)
    s = generate(cfg)
    counts = np.bincount(s.train.groups, minlength=6)
    assert np.allclose(counts / 1000, cfg.group_shares, atol=0.002)
    cls = np.bincount(s.train.labels, minlength=4)
    assert cls.min() >= 245 and cls.max() <= 255
    info = describe(s)
    assert info["train"]["n"] == 1000
    assert sum(info["train"]["per_group"].values()) == 1000
    assert info["train"]["per_group"]["FST-VI"] == counts[5]
    assert sum(info["test"]["per_class"].values()) == 10
    assert info["train"]["group_class"]["FST-I"]["nevus"] == int(((s.train.groups == 0) & (s.train.labels == 0)).sum())


def test_contrast_falls_with_darker_skin():
    # No noise, no artefacts: compare the lesion centre with the image's outer frame.
    cfg = SyntheticDermConfig(
        seed=0, n_train=600, n_val=6, n_test=6, image_size=32, noise_std=0.0, skin_texture=0.0,
        hair_rate=0.0, ruler_rate=0.0, vignette_rate=0.0, specular_rate=0.0,
        group_shares=(1 / 6,) * 6,
    )
    d = generate(cfg).train
    img = d.images.astype(np.float64).mean(axis=1)  # luminance-ish, N x H x W
    centre = img[:, 14:18, 14:18].mean(axis=(1, 2))
    frame = np.concatenate([img[:, :2].reshape(len(img), -1), img[:, -2:].reshape(len(img), -1)], 1).mean(1)
    diff = np.array([(frame - centre)[d.groups == g].mean() for g in range(6)])
    assert np.all(diff > 0)
    assert np.all(np.diff(diff) < 0), diff  # strictly falling from type I to type VI
    assert diff[5] < 0.25 * diff[0], diff


def test_other_sizes_and_class_counts():
    s = generate(SyntheticDermConfig(n_train=16, n_val=8, n_test=8, image_size=64, num_classes=8))
    assert s.train.images.shape == (16, 3, 64, 64) and s.train.num_classes == 8
    s = generate(SyntheticDermConfig(n_train=16, n_val=8, n_test=8, image_size=8, num_classes=2))
    assert s.train.class_names == ["nevus", "melanoma"]


@pytest.mark.parametrize(
    "kwargs, knob",
    [
        (dict(group_shares=(0.2, 0.2, 0.2, 0.2, 0.1, 0.2)), "group_shares"),
        (dict(group_shares=(0.5, 0.5)), "group_shares"),
        (dict(image_size=30), "image_size"),
        (dict(image_size=4), "image_size"),
        (dict(image_size=132), "image_size"),
        (dict(num_classes=9), "num_classes"),
        (dict(num_classes=1), "num_classes"),
        (dict(n_train=0), "n_train"),
        (dict(n_test=-5), "n_test"),
        (dict(n_val=2.5), "n_val"),
        (dict(contrast=(1.0, 0.9, 0.8, 0.7, 0.6)), "contrast"),
        (dict(contrast=(1.0, 0.9, 0.8, 0.7, 0.6, 0.0)), "contrast"),
        (dict(noise_std=-1.0), "noise_std"),
        (dict(hair_rate=1.5), "hair_rate"),
        (dict(cue_reliability=2.0), "cue_reliability"),
        (dict(class_shares=(0.5, 0.5)), "class_shares"),
        (dict(seed=-1), "seed"),
    ],
)
def test_validation_names_the_knob(kwargs, knob):
    with pytest.raises(FqhwError) as e:
        SyntheticDermConfig(**kwargs)
    msg = str(e.value)
    assert knob in msg and "\n" not in msg


def test_from_dict_round_trip_and_unknown_knob():
    cfg = SyntheticDermConfig(seed=5, num_classes=3)
    assert SyntheticDermConfig.from_dict(cfg.to_dict()) == cfg
    d = cfg.to_dict()
    d["group_shares"] = list(d["group_shares"])  # as read back from JSON
    assert SyntheticDermConfig.from_dict(d) == cfg
    with pytest.raises(FqhwError, match="noise"):
        SyntheticDermConfig.from_dict({"nois_std": 1.0})


def test_eval_splits_have_their_own_group_shares():
    # training keeps the skewed shares; validation and test default to equal shares
    cfg = SyntheticDermConfig(n_train=1000, n_val=600, n_test=1200, image_size=8)
    s = generate(cfg)
    assert np.allclose(np.bincount(s.train.groups, minlength=6) / 1000, cfg.group_shares, atol=0.002)
    assert np.bincount(s.val.groups, minlength=6).tolist() == [100] * 6
    assert np.bincount(s.test.groups, minlength=6).tolist() == [200] * 6
    # the defaults resolve every group: at least 1000 test and 500 validation images each
    d = SyntheticDermConfig()
    assert min(d.n_test * x for x in d.eval_group_shares) >= 1000 - 1e-9
    assert min(d.n_val * x for x in d.eval_group_shares) >= 500 - 1e-9
    # None: the evaluation splits follow the training shares; the training split is the same either way
    skew = generate(SyntheticDermConfig(n_train=1000, n_val=600, n_test=1000, image_size=8, eval_group_shares=None))
    assert np.bincount(skew.test.groups, minlength=6).tolist() == [round(1000 * x) for x in cfg.group_shares]
    assert np.array_equal(skew.train.images, s.train.images)
    with pytest.raises(FqhwError, match="eval_group_shares"):
        SyntheticDermConfig(eval_group_shares=(0.5, 0.5))
