"""`vqs score --ray ADDRESS`: the same job on a Ray cluster (the `ray` extra).

Ray Data maps the listing (ids and where to read each video, not the bytes) through a fixed pool
of actors; each actor reads its videos (a path on the shared file system, a member of the
archive, or nothing when the gateway reads the path itself) and calls the gateway. The rows come
back to this process, the only writer of the JSONL, through the same `LineWriter`: one whole
line per video, so `--resume` after a kill gives every video exactly once, as without Ray.
Every node needs vqs installed and the archive at the same path.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import grpc

from clients import analyze
from clients.archive import Item, Listing, open_listing
from clients.channel import ChannelConfig, open_channel
from clients.scoring import (
    DESCRIBE_TIMEOUT_S, GatewayUnreachable, LineWriter, Tally, describe_failed, make_progress, rates,
    score_one_sync, uri_for,
)
from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc

UNREACHABLE = "__gateway_unreachable__"


class RayScorer:
    """One Ray Data actor: a blocking channel to the gateway, the archive open for reading."""

    def __init__(self, *, server: ChannelConfig, archive: str, encoder: str, timeout: float | None,
                 retries: int, max_upload_bytes: int, budget: float = 0.0):
        # The config carries the PEM bytes and the token: nodes need no certificate files.
        self.channel = open_channel(server, options=analyze.channel_options(max_upload_bytes / 2**20))
        self.stub = pb_grpc.VideoAnalyticsStub(self.channel)
        self.listing = open_listing(Path(archive))
        self.options = {"encoder": encoder, "budget": budget, "timeout": timeout, "retries": retries,
                        "max_upload_bytes": max_upload_bytes}

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        lines = []
        for item_id, source, path, uri in zip(batch["id"], batch["source"], batch["path"], batch["uri"]):
            path = path or None
            uri = uri or None
            item = Item(str(item_id), str(source), Path(path) if path else None, None)
            payload: bytes | OSError | None = None
            if not uri:
                try:
                    payload = self.listing.read_one(item.id, path)
                except OSError as exc:
                    payload = exc
            try:
                row = score_one_sync(self.stub, item, payload, uri, **self.options)
            except GatewayUnreachable as exc:
                row = {"id": item.id, UNREACHABLE: str(exc)}
            lines.append(json.dumps(row, separators=(",", ":")))
        return {"line": lines}


def run_ray(
    listing: Listing, todo: list[Item], writer: LineWriter, tally: Tally, *, address: str,
    actors: int, server: ChannelConfig, uri_root: Path | None, encoder: str, timeout: float | None, retries: int,
    budget: float = 0.0,
) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    with open_channel(server) as channel:
        try:
            models = pb_grpc.VideoAnalyticsStub(channel).DescribeModels(
                pb.DescribeModelsRequest(), timeout=DESCRIBE_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise describe_failed(exc) from None
    max_upload = models.max_upload_bytes or (256 << 20)

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        rows = [
            {"id": i.id, "source": i.source, "path": str(i.path) if i.path else "",
             "uri": uri_for(i, uri_root) or ""}
            for i in todo
        ]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 8 * actors)))
        ds = ds.map_batches(
            RayScorer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=0.25,
            fn_constructor_kwargs={
                "server": server, "archive": str(listing.path.resolve()), "encoder": encoder, "budget": budget,
                "timeout": timeout, "retries": retries, "max_upload_bytes": max_upload,
            },
        )
        tally.started = time.monotonic()
        with make_progress() as progress:
            task = progress.add_task("score", total=len(todo), rates=rates(tally))
            for out in ds.iter_rows():
                row = json.loads(out["line"])
                if UNREACHABLE in row:
                    raise GatewayUnreachable(row[UNREACHABLE])
                writer.write(row)
                tally.add(row)
                progress.update(task, advance=1, rates=rates(tally))
    finally:
        ray.shutdown()
