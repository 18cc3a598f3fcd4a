# One-command setup: `make serve` and `make test` build the venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv serve test golden models models-adaptive models-segments evaluate bench proto clean image image-base image-tools

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

# After retraining: re-record tests/golden/analyze.json from the served models (starts its own
# Triton + gateway; prints what changed). `GOLDEN_ARGS=--check` compares without writing.
golden: venv
	$(BIN)/python -m tests.golden.regenerate $(GOLDEN_ARGS)

models: venv
	$(BIN)/vqs models

# The adaptive encoders s3d_sgs, vit and vit_ats (issue 9), trained against what `make models` serves:
# rebuild them after that.
models-adaptive: venv
	$(BIN)/vqs models --part adaptive

# The action parser and the frame embedder (issue 11), with their baselines and ablations.
models-segments: venv
	$(BIN)/vqs models --part segments

# The seeds study (3 seeds x TQN and both baselines on the splits of `make models`, not part of
# it): export/seeds.json and export/seeds.md.
seeds: venv
	$(BIN)/python -m export.seeds

# The served models scored on a labelled split, against a running gateway (`make serve` elsewhere):
# every video of SPLIT is sent to SERVER and the answers scored against its labels.jsonl (per-query
# and per-class accuracy, by length, ECE, null and in-domain rates); EVALUATE_ARGS e.g. --resume.
SPLIT ?= data/test
SERVER ?= 127.0.0.1:50051
OUT ?= export/evaluation_served.json
evaluate: venv
	$(BIN)/vqs evaluate $(SPLIT) --server $(SERVER) --out $(OUT) $(EVALUATE_ARGS)

bench: venv
	$(BIN)/python -m pytest -m slow tests/bench -s -p no:cacheprovider

proto: venv
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. server/proto/video_analytics.proto

# Container image without a daemon or a registry: buildah (vfs storage, chroot isolation) builds
# the Dockerfile on a Debian base made here with debootstrap. With registry access, use the
# official base instead: `make image BASE_IMAGE=python:3.11-slim-bookworm PULL=missing`.
BUILDAH := buildah --storage-driver vfs
IMAGE ?= localhost/vqs:latest
LOCAL_BASE := localhost/vqs-base:bookworm
BASE_IMAGE ?= $(LOCAL_BASE)
PULL ?= never
DEBIAN_MIRROR ?= http://deb.debian.org/debian
# pip inside the build uses the builder's pip settings and CA bundle, mounted read-only (never
# copied into a layer).
PIP_MOUNTS := $(foreach f,/etc/pip.conf /etc/xdg/pip /etc/ssl/certs/ca-certificates.crt,\
	$(if $(wildcard $(f)),-v $(f):$(f):ro))

image-tools:
	command -v buildah >/dev/null && command -v debootstrap >/dev/null || \
		{ apt-get update && apt-get install -y buildah debootstrap; }

# Like the official python:3.11-slim-bookworm: Python 3.11 with its shared libpython.
image-base: image-tools
	if $(BUILDAH) inspect --type image $(LOCAL_BASE) >/dev/null 2>&1; then \
		echo "base image $(LOCAL_BASE) exists"; else \
	work=$$(mktemp -d) && trap 'rm -rf "$$work"' EXIT && \
	debootstrap --variant=minbase \
		--include=python3,python3-venv,python3-pip,ca-certificates,libpython3.11 \
		bookworm "$$work/rootfs" $(DEBIAN_MIRROR) && \
	rm -rf "$$work"/rootfs/var/cache/apt/archives/*.deb "$$work"/rootfs/var/lib/apt/lists/* && \
	ctr=$$($(BUILDAH) from scratch) && mnt=$$($(BUILDAH) mount "$$ctr") && \
	cp -a "$$work/rootfs/." "$$mnt/" && $(BUILDAH) umount "$$ctr" && \
	$(BUILDAH) config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		--env LANG=C.UTF-8 --cmd python3 "$$ctr" && \
	$(BUILDAH) commit --rm "$$ctr" $(LOCAL_BASE); fi

image: image-tools $(if $(filter $(LOCAL_BASE),$(BASE_IMAGE)),image-base)
	$(BUILDAH) bud --isolation chroot --network host --pull=$(PULL) --format docker \
		--build-arg BASE_IMAGE=$(BASE_IMAGE) $(PIP_MOUNTS) -t $(IMAGE) .

clean:
	rm -rf $(VENV) .pytest_cache
