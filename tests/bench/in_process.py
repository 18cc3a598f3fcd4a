"""The same models run in the benchmark's own process: PyAV decodes, the gateway's `chunk` code
samples and cuts clips (so the clips are the gateway's), ONNX Runtime runs the ONNX models of the
model repository.

ONNX Runtime's settings here are the reference's own, fixed, not read from the `config.pbtxt`
Triton's runner uses: a reference that followed the server's thread settings would move with
them, so a change to the server's threading could never show against it. Each model gets its
in-process setting with the best wall time, idle threads never spinning (spinning costs CPU and
gains nothing here): the encoder one intra-op thread per core (`os.cpu_count()`, as ONNX Runtime's
own default on this machine; one thread is cheaper in CPU but slower), the small query decoder one thread (a second one costs CPU
and is slower too); README "Speed". `encoder_threads=1` gives the CPU-cheapest in-process setup."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from tests.vocabulary import model_config

ENCODER, QUERY_DECODER = "clip_encoder_s3d", "tqn_decoder"
ENCODER_THREADS = os.cpu_count() or 1  # ONNX Runtime's intra-op threads for the reference's encoder
QUERY_DECODER_THREADS = 1


class InProcess:
    """PyAV + ONNX Runtime in this process, on the clips the gateway makes."""

    def __init__(self, repository: Path, *, encoder_threads: int = ENCODER_THREADS) -> None:
        import av.video.reformatter

        config = model_config(repository, ENCODER)
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.clip_fps = float(params["clip_fps"])
        clips_input = config["input"][0]
        self.clip_frames, self.frame_size = int(clips_input["dims"][0]), int(clips_input["dims"][1])
        self.max_batch = int(config.get("max_batch_size", 0)) or 64
        self.encoder_threads = encoder_threads
        self.encoder = _session(repository, ENCODER, encoder_threads)
        self.query_decoder = _session(repository, QUERY_DECODER, QUERY_DECODER_THREADS)
        self.outputs = [o["name"] for o in model_config(repository, QUERY_DECODER)["output"]]
        self.scaler = av.video.reformatter.VideoReformatter()
        self.cpu = {"decode": 0.0, "onnxruntime": 0.0}  # cumulative CPU-s of this process by part

    def analyze(self, path: Path, *, skip: bool | None = None) -> tuple[dict[str, np.ndarray], int]:
        """({output name: array}, clips) for one video; `skip`: skip non-reference frames (None:
        where the gateway does, when sampling at half the frame rate or less)."""
        started = time.process_time()
        clips = self.clips(path, skip=skip)
        middle = time.process_time()
        features = np.concatenate([
            self.encoder.run(["features"], {"clips": clips[i:i + self.max_batch]})[0]
            for i in range(0, len(clips), self.max_batch)
        ])
        mask = np.ones((1, len(features)), bool)
        outputs = self.query_decoder.run(self.outputs, {"features": features[None], "mask": mask})
        self.cpu["decode"] += middle - started
        self.cpu["onnxruntime"] += time.process_time() - middle
        return dict(zip(self.outputs, outputs)), len(clips)

    @staticmethod
    def answers(specs, outputs: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        """query -> {attribute: probability} from `analyze`'s outputs (the gateway's softmax)."""
        from tests.bench.harness import answers_from_logits

        return answers_from_logits(specs, {q.query: outputs[f"logits_{q.query}"][0] for q in specs})

    def clips(self, path: Path, *, skip: bool | None = None) -> np.ndarray:
        import av

        from server.pipeline.chunk import ClipAssembler, FrameTimes, TimeGrid
        from server.pipeline.decode_backends import skips_frames

        size = self.frame_size
        pictures, starts, durations = [], [], []
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if skips_frames(float(rate) if rate else None, self.clip_fps) if skip is None else skip:
                stream.codec_context.skip_frame = "NONREF"
            num, den = stream.time_base.numerator, stream.time_base.denominator  # as the workers do
            origin = stream.start_time or 0
            for frame in container.decode(stream):
                pictures.append(self.scaler.reformat(frame, size, size, "rgb24", threads=1).to_ndarray())
                stamp = frame.pts if frame.pts is not None else frame.dts
                starts.append((stamp - origin) * num / den if stamp is not None else math.nan)
                durations.append(frame.duration * num / den if frame.duration else math.nan)
        starts, ends = FrameTimes().repair(np.array(starts), np.array(durations))
        picked, starts, ends = TimeGrid(self.clip_fps).sample(starts, ends)
        assembler = ClipAssembler(self.clip_frames)
        clips, _ = assembler.push(np.stack(pictures)[picked], starts, ends)
        last, _ = assembler.flush()
        return np.concatenate([clips, last])  # N, T, H, W, 3


def _session(repository: Path, model: str, intra_op_threads: int):
    """The model's ONNX Runtime session: `intra_op_threads`, one inter-op thread, no spinning."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(repository / model / "1" / "model.onnx"), options,
                                providers=["CPUExecutionProvider"])
