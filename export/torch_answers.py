"""`python -m export.torch_answers [--out FILE]`: the torch TQN's answers on the test split, in the
form `vqs evaluate --against` reads, so served and torch answers can be compared video by video.

The models are the ones `vqs models` trained and saved beside the data (data/trained_models.pt;
its provenance must match the served decoder's), scored with the served decoder's calibration
temperatures, so answers and top-answer probabilities are what the served models should return:

    python -m export.torch_answers --out runs/torch_test_answers.json
    vqs evaluate data/test --resume --against runs/torch_test_answers.json   # agreement per query
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from export import MODEL_REPOSITORY, REPO, build, data, train


def answer_rows(records: list[dict], logits: dict[str, np.ndarray], temperature: dict[str, float],
                heads: dict[str, tuple[str, ...]]) -> list[dict]:
    """Per video: its id (file name) and labels, the arg-max attribute per query and the top
    answer's probability after dividing the logits by the query's temperature."""
    rows = []
    for i, record in enumerate(records):
        answers, confidence = {}, {}
        for q, attributes in heads.items():
            scaled = logits[q][i] / temperature[q]
            p = np.exp(scaled - scaled.max())
            p /= p.sum()
            answers[q] = attributes[int(p.argmax())]
            confidence[q] = float(p.max())
        rows.append({"id": record["file"], "labels": {q: record[q] for q in heads}, "answers": answers,
                     "confidence": confidence})
    return rows


def main(data_dir: Path, out: Path) -> dict:
    decoder_meta = json.loads((MODEL_REPOSITORY / "tqn_decoder" / "1" / "model.json").read_text())
    saved = torch.load(data_dir / "trained_models.pt", weights_only=False)
    if saved["provenance"] != decoder_meta["provenance"]:
        raise ValueError(f"{data_dir / 'trained_models.pt'} is not the run the served decoder was exported from")
    encoder, decoder = train.load_models({"tqn": saved["models"]["tqn"]})["tqn"]
    test = data.load(build.make_split(data_dir, "test"))
    logits = train.video_logits(encoder, decoder, test)
    rows = answer_rows(test.records, logits, decoder_meta["temperature"], train.HEADS)
    result = {"source": "torch", "provenance": saved["provenance"], "videos": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result) + "\n")
    print(f"{len(rows)} videos' torch answers in {out}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "torch_test_answers.json")
    args = parser.parse_args()
    main(args.data_dir, args.out)
