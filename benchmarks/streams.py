"""Warm starts for streams: iterations with and without the previous frame's fixed point.

Streams are built from real MNIST test digits: each digit drifts frame by frame by a sub-pixel
shift and a small rotation, with fresh pixel noise on every frame. Each frame is classified cold
(from u = 0) and warm (from the previous frame's latents, as the server does for a sequence), at
several tolerances and with the certified stop.

    python benchmarks/streams.py                    # 200 streams of 24 frames
    python benchmarks/streams.py --streams 50       # fewer

Prints a table and writes ``benchmarks/results/streams.json``. Needs the ``train`` extra (torch,
scipy) and MNIST under ``--data-root``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fpn_serve import Engine  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def make_streams(pixels: np.ndarray, n: int, frames: int, seed: int) -> np.ndarray:
    """[n, frames, 28, 28] float pixel values in [0, 1]: drifting, rotating, noisy digits."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, frames, 28, 28), np.float32)
    centre = np.array([13.5, 13.5])
    for i in range(n):
        digit = pixels[i]
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction)
        speed = rng.uniform(0.1, 0.3)  # pixels per frame
        spin = np.deg2rad(rng.uniform(-0.75, 0.75))  # per frame
        for t in range(frames):
            angle = spin * t
            rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            shift = direction * speed * t
            offset = centre - rot @ (centre + shift)
            frame = ndimage.affine_transform(digit, rot, offset=offset, order=1, mode="constant")
            frame = frame + rng.normal(0, 0.02, frame.shape)
            out[i, t] = np.clip(frame, 0, 1)
    return out


def run(engine: Engine, streams: np.ndarray, mean: float, std: float, setting: dict[str, Any]) -> dict[str, Any]:
    frames = streams.shape[1]
    x = ((streams - mean) / std).astype(np.float32)[:, :, None]  # [n, frames, 1, 28, 28]
    cold_iters, warm_iters, agree = [], [], []
    latents = None
    for t in range(frames):
        frame = np.ascontiguousarray(x[:, t])
        cold = engine.classify(frame, **setting)
        warm = engine.classify(frame, **setting, u0=latents, trace=True)  # trace: the step loop keeps latents
        latents = warm.latents
        cold_iters.append(cold.iterations)
        warm_iters.append(warm.iterations)
        agree.append(cold.labels == warm.labels)
    cold_all = np.concatenate(cold_iters[1:])  # frame 0 starts cold either way
    warm_all = np.concatenate(warm_iters[1:])
    return {
        **{k: v for k, v in setting.items()},
        "frames_compared": int(cold_all.size),
        "cold_mean_iterations": float(cold_all.mean()),
        "warm_mean_iterations": float(warm_all.mean()),
        "ratio": float(cold_all.mean() / warm_all.mean()),
        "labels_equal": float(np.concatenate(agree).mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REPO / "models" / "mnist")
    p.add_argument("--data-root", type=Path, default=REPO / "data")
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()

    from training.data import load_split

    test = load_split("mnist", args.data_root, train=False, limit=args.streams)
    pixels = test.images.numpy().reshape(-1, 28, 28).astype(np.float32)
    if pixels.max() > 1.5:
        pixels = pixels / 255.0
    engine = Engine.load(args.model, device="cpu")
    spec = engine.manifest.input
    streams = make_streams(pixels, args.streams, args.frames, args.seed)
    settings: list[dict[str, Any]] = [{"tol": 1e-4}, {"tol": 1e-6}, {"stop": "certified"}]
    rows = [run(engine, streams, spec.mean[0], spec.std[0], s) for s in settings]
    report = {"cpu": cpu_model(), "model": engine.name, "streams": args.streams, "frames": args.frames, "rows": rows}
    print(f"CPU: {report['cpu']}; {args.streams} streams x {args.frames} frames of real MNIST test digits")
    print(f"{'setting':>16} {'cold iters':>11} {'warm iters':>11} {'ratio':>7} {'labels equal':>13}")
    for row in rows:
        name = f"tol={row['tol']:g}" if "tol" in row else "stop=certified"
        print(
            f"{name:>16} {row['cold_mean_iterations']:11.3f} {row['warm_mean_iterations']:11.3f} "
            f"{row['ratio']:7.2f} {100 * row['labels_equal']:12.2f}%"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "streams.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'streams.json'}")


if __name__ == "__main__":
    main()
