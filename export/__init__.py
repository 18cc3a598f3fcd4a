"""Data, training and export of the served models (the server never imports this package)."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO / "model_repository"
