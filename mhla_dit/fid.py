"""FID and Inception Score of generated images (.npz or folder) against reference statistics.

    python -m mhla_dit.fid samples.npz --ref VIRTUAL_imagenet256_labeled.npz \
        --inception-weights /models/weights-inception-2015-12-05-6726825d.pth

Features come from torch-fidelity's port of the TF Inception graph used by the ADM evaluator (pool3,
2048-d; unbiased logits for IS). The weights are read only from `--inception-weights` (never downloaded).
`--ref` is an .npz with "mu" and "sigma" (e.g. ADM's reference batches), an .npz of images under
"arr_0", or an image folder. The ADM evaluator (TensorFlow) remains the reference for published numbers;
this port agrees with it closely, not bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) for covariance matrices (float64, eigen-decomposition).

    tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), a symmetric PSD matrix.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    h = _sqrt_psd(s1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(h @ s2 @ h), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of [N, D] features."""
    features = np.asarray(features, np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and std over `splits` consecutive splits of exp(E_x KL(p(y|x) || p(y)))."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    scores = []
    for part in logits.chunk(splits):
        logp = part.log_softmax(1)
        logpy = torch.logsumexp(logp, 0) - np.log(len(part))
        scores.append(torch.exp((logp.exp() * (logp - logpy)).sum(1).mean()).item())
    return float(np.mean(scores)), float(np.std(scores))


def load_inception(weights: str | os.PathLike | None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's FID Inception (pool3 + unbiased logits) from a local weights file; never downloads."""
    if not weights or not Path(weights).is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {weights!r}. FID needs torch-fidelity's file {INCEPTION_FILE} "
            f"({INCEPTION_URL}); fetch it once and pass --inception-weights /path/to/{INCEPTION_FILE}. "
            "This tool never downloads.")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                        feature_extractor_weights_path=str(weights))
    return model.to(device).eval()


def iter_images(path: str | os.PathLike, batch_size: int = 100) -> Iterator[np.ndarray]:
    """uint8 NHWC RGB batches of an .npz ("arr_0") or of the image files in a folder (sorted by name)."""
    path = Path(path)
    if path.suffix == ".npz":
        arr = np.load(path)["arr_0"]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {arr.dtype} {arr.shape}")
        for i in range(0, len(arr), batch_size):
            yield arr[i: i + batch_size]
        return
    from PIL import Image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{path}: expected an .npz with arr_0 or a folder of images")
    for i in range(0, len(files), batch_size):
        yield np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[i: i + batch_size]])


@torch.no_grad()
def inception_outputs(model: torch.nn.Module, batches: Iterator[np.ndarray],
                      device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(pool3 features [N, 2048], unbiased logits [N, 1008]) of uint8 NHWC batches."""
    from tqdm import tqdm

    feats, logits = [], []
    for batch in tqdm(batches, desc="inception", unit="batch"):
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)
        f, lg = model(x)
        feats.append(f.double().cpu().numpy())
        logits.append(lg.double().cpu().numpy())
    return np.concatenate(feats), np.concatenate(logits)


def reference_stats(ref: str | os.PathLike, model: torch.nn.Module, device, batch_size: int) -> tuple:
    """(mu, sigma) of a reference: stored statistics, or computed from its images."""
    ref = Path(ref)
    if ref.suffix == ".npz":
        with np.load(ref) as f:
            if "mu" in f and "sigma" in f:
                return f["mu"], f["sigma"]
    feats, _ = inception_outputs(model, iter_images(ref, batch_size), device)
    return feature_stats(feats)


def evaluate(samples: str | os.PathLike, ref: str | os.PathLike | None, weights: str | os.PathLike | None, *,
             device: str | torch.device = "cpu", batch_size: int = 100, save_stats: str | None = None) -> dict:
    """{"fid", "inception_score", "inception_score_std", "num_images"} of `samples` (FID only with `ref`)."""
    model = load_inception(weights, device)
    feats, logits = inception_outputs(model, iter_images(samples, batch_size), device)
    mu, sigma = feature_stats(feats)
    if save_stats:
        np.savez(save_stats, mu=mu, sigma=sigma)
    is_mean, is_std = inception_score(logits)
    result = {"num_images": len(feats), "inception_score": is_mean, "inception_score_std": is_std}
    if ref:
        result["fid"] = frechet_distance(mu, sigma, *reference_stats(ref, model, device, batch_size))
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help=".npz (arr_0 uint8 NHWC) or image folder")
    p.add_argument("--ref", default=None, help=".npz with mu/sigma, .npz of images, or an image folder")
    p.add_argument("--inception-weights", default=None, help=f"path to {INCEPTION_FILE}")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--save-stats", default=None, help="also write the samples' mu/sigma to this .npz")
    p.add_argument("--out-json", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    result = evaluate(args.samples, args.ref, args.inception_weights, device=args.device,
                      batch_size=args.batch_size, save_stats=args.save_stats)
    print(json.dumps(result), flush=True)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
