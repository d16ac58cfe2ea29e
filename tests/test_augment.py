"""Contrast/sharpness randomisation of training volumes (pgasr.data.augment) and its use in
``prepare`` (augmented copies of training subjects only)."""

import json

import numpy as np
import pytest

from pgasr.config import AugmentConfig, ConfigError, load_config
from pgasr.data import schema
from pgasr.data.augment import augment_rng, augment_volume, copy_name
from pgasr.data.batches import read_split
from pgasr.data.prepare import prepare

from test_prepare import _cfg, _write_cohort


def _phantom():
    """Background 0, three 'tissues' (100, 300, 600) in concentric bands, a little noise."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (48, 48, 6)], indexing="ij")
    r = np.sqrt(x**2 + y**2)
    vol = np.where(r < 0.8, 100.0, 0.0) + np.where(r < 0.55, 200.0, 0.0) \
        + np.where(r < 0.3, 300.0, 0.0)
    return vol.astype(np.float32), r


def test_identity_settings_return_the_volume():
    vol, _ = _phantom()
    out, params = augment_volume(vol, np.random.default_rng(0),
                                 AugmentConfig(remap_p=0.0, gamma=0.0, blur=[0.0, 0.0]))
    np.testing.assert_allclose(out, vol, atol=1e-3)
    assert params == {"remap": None, "gamma": 1.0, "blur_sigma": 0.0}


def test_draws_are_seeded_per_subject_and_copy():
    vol, _ = _phantom()
    cfg = AugmentConfig()
    a = augment_volume(vol, augment_rng(0, "IXI901", 1), cfg)[0]
    b = augment_volume(vol, augment_rng(0, "IXI901", 1), cfg)[0]
    c = augment_volume(vol, augment_rng(0, "IXI901", 2), cfg)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert copy_name("IXI901", 2) == "IXI901-aug2"


def test_remap_changes_and_can_invert_contrast_but_keeps_background():
    vol, r = _phantom()
    cfg = AugmentConfig(remap_p=1.0, gamma=0.0, blur=[0.0, 0.0])
    inverted = 0
    for k in range(20):
        out, params = augment_volume(vol, augment_rng(0, "s", k), cfg)
        assert params["remap"] is not None
        assert np.abs(out[r >= 0.85]).max() < 1e-3  # background stays at the minimum
        assert out.shape == vol.shape and out.dtype == np.float32
        inner, outer = out[r < 0.25].mean(), out[(r > 0.6) & (r < 0.75)].mean()
        inverted += inner < outer  # the brightest tissue became darker than the dimmest
    assert 0 < inverted < 20


def test_gamma_and_blur():
    vol, r = _phantom()
    g = augment_volume(vol, np.random.default_rng(3),
                       AugmentConfig(remap_p=0.0, gamma=0.7, blur=[0.0, 0.0]))
    assert g[1]["gamma"] != 1.0 and not np.allclose(g[0], vol)
    np.testing.assert_allclose(g[0].max(), vol.max(), rtol=1e-4)  # the range end is fixed
    b, params = augment_volume(vol, np.random.default_rng(0),
                               AugmentConfig(remap_p=0.0, gamma=0.0, blur=[1.0, 1.0]))
    assert params["blur_sigma"] == 1.0
    edges = lambda v: np.abs(np.diff(v, axis=0)).max()  # noqa: E731
    assert edges(b) < 0.7 * edges(vol)
    np.testing.assert_array_equal(b[:, :, 0], b[:, :, 3])  # in-plane only: slices unchanged


@pytest.mark.parametrize("item, message", [
    ("augment.copies=-1", "augment.copies"), ("augment.remap_p=1.5", "augment.remap_p"),
    ("augment.remap_knots=1", "augment.remap_knots"), ("augment.blur=[0.5,0.1]", "augment.blur"),
])
def test_bad_augment_config_is_refused(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [item])


def test_prepare_adds_copies_of_training_subjects_only(tmp_path):
    _write_cohort(tmp_path / "ixi")
    plain = prepare(_cfg(tmp_path), progress=False)
    man0 = json.loads((plain.out_dir / schema.MANIFEST).read_text())
    cfg = _cfg(tmp_path, **{"augment.copies": 2, "data.prepared_dir": tmp_path / "aug"})
    res = prepare(cfg, progress=False)
    man = json.loads((res.out_dir / schema.MANIFEST).read_text())
    assert man["fingerprint"] != man0["fingerprint"]
    assert res.rows["train"] == 3 * plain.rows["train"]
    assert res.rows["val"] == plain.rows["val"] and res.rows["test"] == plain.rows["test"]
    assert man["split"] == man0["split"]  # the subject split is the real subjects'
    train = man["split"]["train"]
    assert man["augmented"] == sorted(f"{s}-aug{k}" for s in train for k in (1, 2))
    for s in man["augmented"]:
        m = man["subjects"][s]
        assert m["split"] == "train" and m["augmented_from"] in train and "gamma" in m["augment"]
    rows = read_split(res.out_dir, "train")
    subjects = set(rows[schema.SUBJECT])
    assert subjects == set(train) | set(man["augmented"])
    # an original subject's rows are exactly those of the plain preparation
    rows0 = read_split(plain.out_dir, "train")
    s0 = train[0]
    a = rows[schema.HR][np.asarray(rows[schema.SUBJECT]) == s0]
    b = rows0[schema.HR][np.asarray(rows0[schema.SUBJECT]) == s0]
    np.testing.assert_array_equal(a, b)
    # ... and a copy differs from its source (its own contrast and degradation)
    c = rows[schema.HR][np.asarray(rows[schema.SUBJECT]) == f"{s0}-aug1"]
    assert c.shape == a.shape and not np.allclose(c, a)


def test_augment_settings_do_not_change_the_fingerprint_while_off(tmp_path):
    _write_cohort(tmp_path / "ixi")
    a = prepare(_cfg(tmp_path), progress=False)
    b = prepare(_cfg(tmp_path, **{"augment.gamma": 0.3}), progress=False)
    assert b.reused  # copies = 0: augmentation settings are not part of the data
