"""Procedural dSprites: geometry, grid bookkeeping, shards, and the match to the official frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from trainer.data.convert import dsprites as ds
from trainer.data.shards import load_manifest, verify_shards

# shared/ lies beside the checkout (CI lays a copy there too)
GIF = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "dsprites.gif"
if not GIF.exists():  # the fixture may travel with the repo in other checkouts
    GIF = Path(__file__).parent / "fixtures" / "dsprites.gif"


def test_square_is_exact_at_the_grid_centre():
    # centre at 16 + 32*pos; pixel j's centre at j + 0.5; half side 9.6 -> centres 22.5..41.5 inside: 20 px wide
    img = ds.render(0, 1.0, 0.0, 0.5, 0.5)
    ys, xs = np.nonzero(img)
    assert img.dtype == np.uint8 and set(np.unique(img)) == {0, 1}
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (22, 41, 22, 41)
    assert img.sum() == 20 * 20


def test_shapes_orientation_and_position_conventions():
    ellipse = ds.render(1, 1.0, 0.0, 0.5, 0.5)
    ys, xs = np.nonzero(ellipse)
    assert np.ptp(xs) > np.ptp(ys)  # horizontal at orientation 0
    ys, xs = np.nonzero(ds.render(1, 1.0, np.pi / 2, 0.5, 0.5))
    assert np.ptp(ys) > np.ptp(xs)  # vertical after a quarter turn
    heart = ds.render(2, 1.0, 0.0, 0.5, 0.5)
    assert heart[:32].sum() > heart[32:].sum()  # lobes up (rows grow downward), tip down
    turned = ds.render(2, 1.0, np.pi / 2, 0.5, 0.5)
    assert turned[:, :32].sum() > turned[:, 32:].sum()  # counter-clockwise: the lobes go left
    corner = ds.render(0, 0.5, 0.0, 0.0, 0.0)  # pos 0 -> centre at (16, 16) px, x from the left
    ys, xs = np.nonzero(corner)
    assert abs(xs.mean() + 0.5 - 16) < 1e-9 and abs(ys.mean() + 0.5 - 16) < 1e-9
    ys, xs = np.nonzero(ds.render(0, 0.5, 0.0, 1.0, 0.0))
    assert abs(xs.mean() + 0.5 - 48) < 1e-9 and abs(ys.mean() + 0.5 - 16) < 1e-9


def test_batched_render_matches_single_and_periodic_orientation():
    rng = np.random.default_rng(0)
    index = rng.choice(ds.NUM_IMAGES, 64, replace=False)
    batch = ds.render_index(index)
    assert batch.shape == (64, 64, 64)
    for i, k in enumerate(index[:8]):
        np.testing.assert_array_equal(batch[i], ds.render_index(int(k)))
    first = ds.render_index(np.arange(3) * ds.GRID_STRIDES[1] + 5 * ds.GRID_STRIDES[2] + 0 * ds.GRID_STRIDES[3] + 500)
    last = ds.render_index(np.arange(3) * ds.GRID_STRIDES[1] + 5 * ds.GRID_STRIDES[2] + 39 * ds.GRID_STRIDES[3] + 500)
    assert (first != last).sum() <= 2  # index 39 (2π) renders like index 0


def test_grid_bookkeeping():
    assert ds.NUM_IMAGES == 737_280
    assert ds.GRID_STRIDES.tolist() == [737280, 245760, 40960, 1024, 32, 1]
    assert ds.grid_classes(ds.NUM_IMAGES - 1).tolist() == [0, 2, 5, 39, 31, 31]
    np.testing.assert_allclose(ds.grid_values(ds.NUM_IMAGES - 1), [1, 3, 1, 2 * np.pi, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(ds.grid_values(1024 + 33), [1, 1, 0.5, ds.GRID_VALUES[3][1], 1 / 31, 1 / 31],
                               rtol=1e-6)


def test_generate_dsprites_shards(tmp_path):
    manifest = ds.generate_dsprites(tmp_path / "a", seed=3, samples_per_shard=40, processes=2, limit=150,
                                    progress=False)
    again = ds.generate_dsprites(tmp_path / "b", seed=3, samples_per_shard=40, processes=1, limit=150,
                                 progress=False)
    loaded = load_manifest(tmp_path / "a")
    assert loaded == manifest == again  # same seed -> same subset, split and sha256
    verify_shards(tmp_path / "a", loaded)
    assert loaded.factor_names == ["color", "shape", "scale", "orientation", "posX", "posY"]
    assert [f["kind"] for f in loaded.factors] == list(ds.FACTOR_KINDS)
    assert [f["size"] for f in loaded.factors] == [1, 3, 6, 40, 32, 32]
    assert loaded.default_factor == "shape" and loaded.num_samples == 150
    assert {s: loaded.split_samples(s) for s in loaded.splits} == {"train": 120, "val": 15, "test": 15}
    keys = []
    for split in loaded.splits:
        urls = [str(tmp_path / "a" / i.name) for i in loaded.shards(split)]
        for s in wds.WebDataset(urls, shardshuffle=False).decode("l8"):
            k = int(s["__key__"])
            keys.append(k)
            np.testing.assert_array_equal(s["factors.npy"], ds.grid_values(k))
            assert s["cls"] == ds.grid_classes(k)[1]
            np.testing.assert_array_equal(s["png"], ds.render_index(k) * 255)
    assert len(set(keys)) == 150
    other = ds.generate_dsprites(tmp_path / "c", seed=4, samples_per_shard=200, processes=1, limit=150,
                                 progress=False)
    assert other.splits["train"]["shards"][0].sha256 != manifest.splits["train"]["shards"][0].sha256


@pytest.mark.skipif(not GIF.exists(), reason="official dSprites animation fixture not available")
def test_matches_official_frames():
    report = ds.compare_to_official_frames(GIF)
    print("\n" + ds.summarise_comparison(report))
    mismatches = np.array([r[1] for r in report])
    assert len(report) == 320
    assert np.mean(mismatches <= 16) >= 0.95
    shapes = np.array([ds.grid_classes(r[2])[1] for r in report])
    assert (shapes == 0).sum() >= 32 and mismatches[shapes == 0].sum() <= 16  # squares near-exact
    assert mismatches[shapes == 1].max() <= 8


def _reference_image(index: int) -> np.ndarray:
    """The documented geometry evaluated directly: uint8 {0, 1} [64, 64] of one grid index.

    Pixel (row i, column j) has its centre at (j + 0.5, i + 0.5) px; the sprite centre is at
    16 + 32·pos px (x from the left, y from the top); a point is taken into the sprite's frame
    (u right, w up) by rotating it by -orientation about the centre and dividing by the scale.
    """
    _, shape, scale, orientation, pos_x, pos_y = ds.grid_values(index).astype(np.float64)
    rows, cols = np.mgrid[:ds.IMAGE_SIZE, :ds.IMAGE_SIZE].astype(np.float64) + 0.5
    dx, dy_up = cols - (16 + 32 * pos_x), (16 + 32 * pos_y) - rows
    cos, sin = np.cos(np.full((1, 1), orientation)), np.sin(np.full((1, 1), orientation))
    u, w = (dx * cos + dy_up * sin) / scale, (-dx * sin + dy_up * cos) / scale
    inside = {1: ds._inside_square, 2: ds._inside_ellipse, 3: ds._inside_heart}[int(shape)]
    return inside(u, w).astype(np.uint8)


def _geometry_sample() -> np.ndarray:
    """Seeded random grid indices plus every shape and orientation at the largest scale in the
    four corners (where the sprite window is clipped by the image border)."""
    rng = np.random.default_rng(7)
    corners = [(0, 0), (0, 31), (31, 0), (31, 31)]
    edge = [ds.GRID_STRIDES @ [0, shape, 5, orient, px, py]
            for shape in range(3) for orient in range(40) for px, py in corners]
    return np.concatenate([rng.choice(ds.NUM_IMAGES, 400, replace=False), edge]).astype(np.int64)


def test_fast_renderer_and_shards_follow_the_documented_geometry(tmp_path):
    """The shard writer's fast path (cached axis terms, sprite window, cached .npy header) must
    draw exactly what the geometry says, and the shards must hold exactly those images."""
    sample = _geometry_sample()
    assert set(ds.grid_classes(sample)[:, 1].tolist()) == {0, 1, 2}
    for index in sample.tolist():
        expected = _reference_image(index)
        np.testing.assert_array_equal(ds.render_index(index), expected, err_msg=f"index {index}")
        np.testing.assert_array_equal(ds._render_grid_image(*ds._classes_of(index)[1:]), expected)
    np.testing.assert_array_equal(ds.render_index(sample[:64]), [_reference_image(i) for i in sample[:64]])

    manifest = ds.generate_dsprites(tmp_path, seed=5, samples_per_shard=100, processes=1, limit=300,
                                    progress=False)
    seen = 0
    for split in manifest.splits:
        urls = [str(tmp_path / i.name) for i in manifest.shards(split)]
        for s in wds.WebDataset(urls, shardshuffle=False).decode("l8"):
            k = int(s["__key__"])
            np.testing.assert_array_equal(s["png"], _reference_image(k) * 255)
            np.testing.assert_array_equal(s["factors.npy"], ds.grid_values(k))
            assert s["factors.npy"].dtype == np.float32 and s["cls"] == ds.grid_classes(k)[1]
            seen += 1
    assert seen == 300
