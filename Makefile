# One-command setup: `make serve` and `make test` build the venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv serve test models bench proto clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[export,test]'
	touch $(STAMP)

ARTIFACTS := model_repository/clip_encoder_s3d/1/model.onnx model_repository/tqn_decoder/1/model.onnx

# Committed artifacts make this a no-op; without them `make serve` trains them first.
$(ARTIFACTS):
	$(BIN)/vqs models

serve: venv $(ARTIFACTS)
	$(BIN)/vqs serve

test: venv
	$(BIN)/python -m pytest

models: venv
	$(BIN)/vqs models

bench: venv
	$(BIN)/python -m pytest -m slow tests/bench -s -p no:cacheprovider

proto: venv
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. server/proto/video_analytics.proto

clean:
	rm -rf $(VENV) .pytest_cache
