"""Fréchet distance and Inception Score math; the missing-weights error; image loading (no Inception run)."""

import numpy as np
import pytest
import torch
from PIL import Image

from mhla_dit.fid import INCEPTION_FILE, feature_stats, frechet_distance, inception_score, iter_images, main


def _rand_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _psd_sqrt(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(w)) @ v.T


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    # diagonal (commuting) covariances: sum of per-axis (sqrt(a) - sqrt(b))^2
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert np.isclose(frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)), want, rtol=1e-10)
    # general covariances: the 2-Wasserstein distance with the matrix-square-root form
    c1, c2 = _rand_cov(rng, d), _rand_cov(rng, d)
    r = _psd_sqrt(c1)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * _psd_sqrt(r @ c2 @ r))
    assert np.isclose(frechet_distance(mu1, c1, mu2, c2), want, rtol=1e-10)
    assert np.isclose(frechet_distance(mu1, c1, mu2, c2), frechet_distance(mu2, c2, mu1, c1), rtol=1e-9)
    assert abs(frechet_distance(mu1, c1, mu1, c1)) < 1e-9
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(mu1, c1, mu2[:3], c2[:3, :3])


def test_frechet_distance_of_sampled_gaussian_features():
    rng = np.random.default_rng(1)
    d, n = 8, 200_000
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    c1, c2 = _rand_cov(rng, d), np.eye(d) * 2.0
    f1 = rng.multivariate_normal(mu1, c1, n)
    f2 = rng.multivariate_normal(mu2, c2, n)
    # closed form with c2 = 2 I: tr(c1) + 2 d - 2 sqrt(2) tr(c1^(1/2)) + |mu1 - mu2|^2
    want = np.trace(c1) + 2 * d - 2 * np.sqrt(2) * np.trace(_psd_sqrt(c1)) + d * 0.25
    got = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    assert abs(got - want) < 0.02 * want + 0.01


def test_inception_score_extremes():
    k = 10
    uniform = np.zeros((100, k))
    assert np.isclose(inception_score(uniform, splits=2)[0], 1.0)
    confident = np.full((100, k), -1e4)
    confident[np.arange(100), np.arange(100) % k] = 0  # one sure class each, all classes equally often
    mean, std = inception_score(confident, splits=2)
    assert np.isclose(mean, k, rtol=1e-6) and std < 1e-6


def test_missing_inception_weights_name_the_file(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    for weights in (None, str(tmp_path / "nope.pth")):
        flags = [str(tmp_path / "s.npz")] + (["--inception-weights", weights] if weights else [])
        with pytest.raises(FileNotFoundError, match=INCEPTION_FILE) as err:
            main(flags + ["--device", "cpu"])
        assert "never downloads" in str(err.value)


def test_iter_images_npz_and_folder(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=arr)
    assert np.array_equal(np.concatenate(list(iter_images(tmp_path / "s.npz", batch_size=2))), arr)
    (tmp_path / "imgs").mkdir()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(tmp_path / "imgs" / f"{i:03d}.png")
    assert np.array_equal(np.concatenate(list(iter_images(tmp_path / "imgs", batch_size=3))), arr)
    np.savez(tmp_path / "bad.npz", arr_0=arr.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        next(iter_images(tmp_path / "bad.npz"))


def test_evaluate_with_a_stand_in_inception(tmp_path, monkeypatch):
    """The pipeline around the network: stats, stored reference mu/sigma, FID of identical sets is ~0."""
    from mhla_dit import fid

    class Fake(torch.nn.Module):
        def forward(self, x):
            f = x.float().flatten(1)[:, :16] / 255
            return f, torch.cat([f, -f], 1)

    monkeypatch.setattr(fid, "load_inception", lambda weights, device: Fake())
    arr = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=arr)
    res = fid.evaluate(tmp_path / "s.npz", tmp_path / "s.npz", None, save_stats=str(tmp_path / "stats.npz"))
    assert res["num_images"] == 40 and abs(res["fid"]) < 1e-8 and res["inception_score"] >= 1
    res2 = fid.evaluate(tmp_path / "s.npz", tmp_path / "stats.npz", None)
    assert abs(res2["fid"]) < 1e-8
