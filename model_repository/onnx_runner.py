"""The one Triton python-backend model for every vqs model: runs `<version>/model.onnx` with ONNX Runtime.

Each `<model>/1/model.py` is a symlink to this file. Tensor names, dtypes and dims come from the
model's `config.pbtxt`; the ONNX graph must use the same names (checked at load time).

Config parameters (all optional):
  intra_op_threads / inter_op_threads  ONNX Runtime thread pools (default 1 / 1)
  allow_spinning                       "1" lets idle ORT threads busy-wait (default "0")
  onnx_file                            file name inside the version directory (default model.onnx)
  providers                            comma-separated execution providers to request, in order
                                       (default: TensorRT, CUDA when installed, then CPU)
Other parameters (`clip_fps`, `queries`, `attributes.<query>`) describe the model to the gateway,
which reads them from Triton; this runner does not use them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_CPU = "CPUExecutionProvider"


class _BadRequest(Exception):
    """A request this model cannot run; answered with its own INVALID_ARG error response."""


def _error(message: str, code_name: str) -> "pb_utils.TritonError":
    code = getattr(pb_utils.TritonError, code_name, None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def _parameter(config: dict, key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value or default


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.logger = pb_utils.Logger
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.inputs = [
            (t["name"], pb_utils.triton_string_to_numpy(t["data_type"]), [int(d) for d in t["dims"]])
            for t in config["input"]
        ]
        self.outputs = [
            (t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["output"]
        ]

        version_dir = Path(args["model_repository"]) / args["model_version"]
        onnx_path = version_dir / _parameter(config, "onnx_file", "model.onnx")
        if not onnx_path.is_file():
            raise FileNotFoundError(
                f"{self.name}: no ONNX file at {onnx_path}; export the model first"
            )

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(config, "intra_op_threads", "1"))
        options.inter_op_num_threads = int(_parameter(config, "inter_op_threads", "1"))
        # Idle ORT threads must not spin: the video decoders need those cores between batches.
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", _parameter(config, "allow_spinning", "0")
        )
        self.session = self._create_session(onnx_path, options, config)
        # On the CPU each request runs alone: a clip costs ONNX Runtime the same at any batch size
        # there, and joining the requests of a dynamic batch would copy every clip once more
        # (README, "Speed"). On a GPU, one larger batch is what dynamic batching is for.
        self.join_requests = self.batched and self.session.get_providers()[0] != _CPU
        self._check_graph()
        self.logger.log_info(
            f"{self.name}: {onnx_path.name} on {self.session.get_providers()[0]} "
            f"(intra_op_threads={options.intra_op_num_threads}, batched={self.batched}, "
            f"joins requests={self.join_requests})"
        )

    def _create_session(self, path: Path, options: ort.SessionOptions, config: dict):
        requested = _parameter(config, "providers", "")
        if requested:
            providers = [p.strip() for p in requested.split(",") if p.strip()]
        else:
            available = set(ort.get_available_providers())
            providers = [p for p in _GPU_PROVIDERS if p in available] + [_CPU]
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # a GPU provider listed but unusable on this host
            if providers == [_CPU]:
                raise
            self.logger.log_warn(f"{self.name}: {providers} failed ({exc}); using {_CPU}")
            session = ort.InferenceSession(str(path), options, providers=[_CPU])
        # onnxruntime-gpu lists CUDA even without a GPU; what the session got is what counts.
        got = session.get_providers()
        if providers[0] != got[0]:
            self.logger.log_warn(f"{self.name}: asked for {providers[0]}, running on {got[0]}")
        return session

    def _check_graph(self) -> None:
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        want_inputs = {name for name, _, _ in self.inputs}
        want_outputs = {name for name, _ in self.outputs}
        if want_inputs != graph_inputs or not want_outputs <= graph_outputs:
            raise ValueError(
                f"{self.name}: config.pbtxt and model.onnx disagree: config inputs "
                f"{sorted(want_inputs)} outputs {sorted(want_outputs)}, ONNX inputs "
                f"{sorted(graph_inputs)} outputs {sorted(graph_outputs)}"
            )

    def _read(self, request) -> dict[str, np.ndarray]:
        feed = {}
        for name, dtype, dims in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise _BadRequest(f"missing input '{name}'")
            array = tensor.as_numpy()
            if array.dtype != dtype:
                raise _BadRequest(f"input '{name}' has dtype {array.dtype}, expected {np.dtype(dtype)}")
            shape = array.shape[1:] if self.batched else array.shape
            if len(shape) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, shape)):
                raise _BadRequest(f"input '{name}' has shape {list(array.shape)}, expected {dims}")
            feed[name] = array
        if "mask" in feed and "features" in feed:
            self._check_mask(feed["features"], feed["mask"])
        return feed

    @staticmethod
    def _check_mask(features: np.ndarray, mask: np.ndarray) -> None:
        if mask.shape != features.shape[:2]:
            raise _BadRequest(
                f"mask shape {list(mask.shape)} does not match features {list(features.shape[:2])}"
            )
        empty = np.flatnonzero(~mask.any(axis=-1))
        if empty.size:
            raise _BadRequest(f"mask rows {empty.tolist()} have no valid clip")

    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = [name for name, _ in self.outputs]
        results = self.session.run(names, feed)
        return [r.astype(dtype, copy=False) for r, (_, dtype) in zip(results, self.outputs)]

    def _response(self, arrays: list[np.ndarray]):
        tensors = [pb_utils.Tensor(name, a) for (name, _), a in zip(self.outputs, arrays)]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests):
        responses: list = [None] * len(requests)
        feeds: list[tuple[int, dict[str, np.ndarray]]] = []
        for i, request in enumerate(requests):
            try:
                feeds.append((i, self._read(request)))
            except _BadRequest as exc:
                responses[i] = pb_utils.InferenceResponse(
                    error=_error(f"{self.name}: {exc}", "INVALID_ARG")
                )

        if self.join_requests and len(feeds) > 1:
            groups = [feeds]
        else:
            groups = [[item] for item in feeds]
        for group in groups:
            try:
                self._run_group(group, responses)
            except Exception as exc:
                for i, _ in group:
                    responses[i] = pb_utils.InferenceResponse(
                        error=_error(f"{self.name}: inference failed: {exc}", "INTERNAL")
                    )
        return responses

    def _run_group(self, group: list[tuple[int, dict[str, np.ndarray]]], responses: list) -> None:
        if len(group) == 1:
            i, feed = group[0]
            responses[i] = self._response(self._run(feed))
            return
        names = [name for name, _, _ in self.inputs]
        batch = {name: np.concatenate([feed[name] for _, feed in group]) for name in names}
        sizes = [len(feed[names[0]]) for _, feed in group]
        results = self._run(batch)
        bounds = np.cumsum(sizes)[:-1]
        per_output = [np.split(r, bounds) for r in results]
        for k, (i, _) in enumerate(group):
            responses[i] = self._response([parts[k] for parts in per_output])

    def finalize(self) -> None:
        self.session = None
