"""Real-world-style test videos with broken or unusual timestamps, made at test time.

Each maker writes one tiny file (96x96 or smaller, 1-3 s) with the ffmpeg binary of the
`imageio-ffmpeg` wheel (or PyAV, where only a remux can say exactly which timestamps a packet
carries) and returns its path; `Media(directory)` makes each at most once. `timestamps(path)`
reads back what a demuxer and decoder report, so a test can first prove the file really has the
defect it is named after.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np

SIZE = "96x96"
RATE = 25  # input frames per second


def ffmpeg(*args: str) -> None:
    """Run ffmpeg with these arguments; raise with its stderr if it fails."""
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed:\n{result.stderr[-2000:]}")


def _testsrc(seconds: float, rate: int = RATE) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc=size={SIZE}:rate={rate}:duration={seconds}"]


@dataclass(frozen=True)
class Timestamps:
    """What PyAV reports for a file's video stream: per decoded frame, pts in seconds (NaN where
    the frame has none), and how many frames decord reports without a timestamp."""

    pts_s: np.ndarray
    decord_missing: int

    @property
    def missing(self) -> int:
        return int(np.isnan(self.pts_s).sum())

    @property
    def backwards(self) -> int:
        return int((np.diff(self.pts_s) < 0).sum())

    @property
    def repeated(self) -> int:
        return int((np.diff(self.pts_s) == 0).sum())

    @property
    def largest_step_s(self) -> float:
        steps = np.diff(self.pts_s)
        steps = steps[np.isfinite(steps)]
        return float(steps.max()) if len(steps) else 0.0


def timestamps(path: Path) -> Timestamps:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts = [
            float(frame.pts * stream.time_base) if frame.pts is not None else np.nan
            for frame in container.decode(stream)
        ]
    import decord  # after PyAV: see tests/conftest.py

    try:
        reader = decord.VideoReader(str(path))
        times = reader.get_frame_timestamp(list(range(len(reader))))[:, 0]
        # decord turns FFmpeg's "no timestamp" (INT64_MIN) into a huge negative number.
        decord_missing = int((times < -1e9).sum())
    except decord.DECORDError:
        decord_missing = -1
    return Timestamps(np.array(pts, np.float64), decord_missing)


# -- makers: each writes `path` ---------------------------------------------------------------


def xvid_bframes(path: Path) -> None:
    """An AVI of MPEG-4 Part 2 (FourCC XVID) with 2 B-frames in a row. AVI stores no timestamps,
    and decord reports none for the first 18 frames, then times out of step with the frames."""
    ffmpeg(*_testsrc(2), "-c:v", "mpeg4", "-vtag", "XVID", "-bf", "2", "-q:v", "5", str(path))


def xvid_packed_bframes(path: Path) -> None:
    """An AVI of MPEG-4 Part 2 (FourCC XVID) with packed B-frames, as DivX 5 / Xvid wrote them:
    each P-frame shares its AVI chunk with the B-frame displayed before it, followed by a
    not-coded placeholder frame ("N-VOP"), so chunks and displayed frames stay one to one.

    ffmpeg's encoders cannot write this, so the packets of a normal `-bf 1` encode are repacked
    (the packing flag is the 'p' at the end of the DivX user data, as in real files)."""
    plain = path.with_suffix(".plain.avi")
    ffmpeg(*_testsrc(2), "-c:v", "mpeg4", "-vtag", "XVID", "-bf", "1", "-g", "300", "-q:v", "5",
           str(plain))
    with av.open(str(plain)) as src:
        stream = src.streams.video[0]
        packets = [(bytes(p), p.is_keyframe, p.pts) for p in src.demux(stream) if p.size]
        chunks: list[tuple[bytes, bool]] = []
        i = 0
        while i < len(packets):
            data, key, pts = packets[i]
            if i + 1 < len(packets) and packets[i + 1][2] < pts:  # a B-frame shown before it
                chunks += [(data + packets[i + 1][0], key), (_n_vop(i + 1), False)]
                i += 2
            else:
                chunks.append((data, key))
                i += 1
        first = chunks[0][0]
        at = first.find(b"\x00\x00\x01\xb6")  # the first frame's header: user data goes before it
        chunks[0] = (first[:at] + b"\x00\x00\x01\xb2DivX503b1393p" + first[at:], True)
        with av.open(str(path), "w", format="avi") as dst:
            out = dst.add_stream_from_template(stream)
            out.codec_tag = "XVID"
            for n, (data, key) in enumerate(chunks):
                packet = av.Packet(data)
                packet.stream = out
                packet.time_base = stream.time_base
                packet.pts = packet.dts = n
                packet.is_keyframe = key
                dst.mux(packet)
    plain.unlink()


def _n_vop(frame: int, rate: int = RATE) -> bytes:
    """A not-coded P VOP: start code, type P, time (5 bits at 25 Hz resolution), vop_coded = 0."""
    bits = "01" + "1" * (frame // rate) + "0" + "1" + format(frame % rate, "05b") + "1" + "0"
    bits += "0" + "1" * (-(len(bits) + 1) % 8)  # stuffing: a zero, then ones to the byte
    return b"\x00\x00\x01\xb6" + int(bits, 2).to_bytes(len(bits) // 8, "big")


def _with_pts(path: Path, pts: list[int], rate: int = RATE) -> None:
    """An intra-only (MJPEG) Matroska file whose frames carry exactly these pts (in 1/1000 s),
    in this order: a remux, since ffmpeg's own muxing would repair them."""
    plain = path.with_suffix(".plain.mkv")
    ffmpeg(*_testsrc(len(pts) / rate), "-c:v", "mjpeg", "-q:v", "8", str(plain))
    with av.open(str(plain)) as src:
        stream = src.streams.video[0]
        packets = [bytes(p) for p in src.demux(stream) if p.size][: len(pts)]
        with av.open(str(path), "w", format="matroska") as dst:
            out = dst.add_stream_from_template(stream)
            out.time_base = Fraction(1, 1000)
            # The muxer wants non-decreasing dts <= pts: the smallest pts still to come.
            dts = np.minimum.accumulate(np.array(pts[: len(packets)])[::-1])[::-1]
            for data, p, d in zip(packets, pts, dts):
                packet = av.Packet(data)
                packet.stream = out
                packet.time_base = out.time_base
                packet.pts, packet.dts = int(p), int(d)
                packet.is_keyframe = True
                dst.mux(packet)
    plain.unlink()


def repeated_pts(path: Path) -> None:
    """Each timestamp on three frames in a row (a capture that stamps at 1/3 the frame rate)."""
    _with_pts(path, [(n // 3) * 120 for n in range(50)])


def non_monotonic_pts(path: Path) -> None:
    """Frames stored in display order but stamped out of order (pairs swapped)."""
    order = [n + 1 if n % 2 == 0 else n - 1 for n in range(50)]
    _with_pts(path, [n * 40 for n in order])


def jumping_pts(path: Path) -> None:
    """Two frames stamped 1000 s away from their neighbours, then back to normal (within the
    server's duration limit, so the times, not the limit, decide the answer)."""
    pts = [n * 40 for n in range(50)]
    pts[20] = pts[21] = 1000 * 1000
    _with_pts(path, pts)


def random_pts(path: Path) -> None:
    """Timestamps drawn at random within 3000 s: no order to repair."""
    rng = np.random.default_rng(7)
    pts = rng.integers(0, 3000 * 1000, 50)
    _with_pts(path, sorted(pts[:5]) + list(pts[5:]))


def gap_3000s(path: Path) -> None:
    """Two 1 s recordings in one MPEG-TS file, the second stamped 3000 s after the first (a
    camera resumed recording into the same file): byte-concatenated transport streams."""
    first, second = path.with_suffix(".1.ts"), path.with_suffix(".2.ts")
    for part, offset in ((first, 0), (second, 3000)):
        ffmpeg(*_testsrc(1), "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-bf", "0",
               "-output_ts_offset", str(offset), "-f", "mpegts", str(part))
    path.write_bytes(first.read_bytes() + second.read_bytes())
    first.unlink()
    second.unlink()


def annexb_h264(path: Path) -> None:
    """A raw H.264 Annex B elementary stream (`.h264`): no container, so no timestamps."""
    ffmpeg(*_testsrc(2), "-c:v", "libx264", "-preset", "ultrafast", "-bf", "2",
           "-bsf:v", "h264_mp4toannexb", "-f", "h264", str(path))


MAKERS = {
    "xvid_bframes.avi": xvid_bframes,
    "xvid_packed.avi": xvid_packed_bframes,
    "repeated_pts.mkv": repeated_pts,
    "non_monotonic_pts.mkv": non_monotonic_pts,
    "jumping_pts.mkv": jumping_pts,
    "random_pts.mkv": random_pts,
    "gap_3000s.ts": gap_3000s,
    "annexb.h264": annexb_h264,
}


class Media:
    """`Media(directory)[name]`: the path of that test video, made on first use."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._made: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self._made:
            path = self.directory / name
            MAKERS[name](path)
            self._made[name] = path
        return self._made[name]


# Long enough that an unloaded machine is still analysing it when a 1 s deadline or a cancel
# arrives (60 s of it took 1.2 s).
LONG_VIDEO_S = 120.0


def write_long_video(path: Path) -> Path:
    """LONG_VIDEO_S of 1280x720 30 fps H.264 (ffmpeg's test pattern, ~60 MB)."""
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi",
         "-i", f"testsrc2=size=1280x720:rate=30:duration={LONG_VIDEO_S:g}",
         "-c:v", "libx264", "-preset", "ultrafast", "-crf", "32", "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )
    return path
