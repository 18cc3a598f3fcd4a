"""What `vqs score` reads: the videos of a folder, a tar or zip archive, or a text list of paths.

`open_listing(path)` picks the kind from the path (a folder, `.tar`/`.tar.gz`/`.tgz`/`.tar.bz2`/
`.tar.xz`, `.zip`, anything else is a list of paths, one a line). Every kind gives `items()`, the
videos with a stable id (path relative to the folder, member name, or the line as written), and
`read(ids)`, which yields `(item, bytes | OSError)` for the wanted ids in listing order. Archive
members are read one at a time into memory, never extracted to disk; a `.tar.gz` is streamed.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

VIDEO_SUFFIXES = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg",
    ".flv", ".wmv", ".3gp", ".ogv", ".h264", ".264", ".hevc", ".h265", ".y4m",
})
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def is_video_name(name: str) -> bool:
    return Path(name).suffix.lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class Item:
    id: str
    # Where it comes from, for people: a path, or "archive::member".
    source: str
    # A file on this machine (folder and list items); None for archive members.
    path: Path | None
    size: int | None


class Listing:
    kind = ""

    def __init__(self, path: Path):
        self.path = path

    def items(self) -> list[Item]:
        raise NotImplementedError

    def read_one(self, item_id: str, path: str | None) -> bytes:
        """One item's bytes by id (random access, e.g. from a Ray actor); raises OSError."""
        if path is None:
            raise OSError(f"{item_id}: no path to read")
        return Path(path).read_bytes()

    def read(self, ids: set[str]) -> Iterator[tuple[Item, bytes | OSError]]:
        """The wanted items' bytes (or why they could not be read), in listing order."""
        for item in self.items():
            if item.id in ids:
                try:
                    yield item, item.path.read_bytes()
                except OSError as exc:
                    yield item, exc


class FolderListing(Listing):
    kind = "folder"

    def items(self) -> list[Item]:
        out = []
        for p in sorted(self.path.rglob("*")):
            if p.is_file() and is_video_name(p.name):
                out.append(Item(p.relative_to(self.path).as_posix(), str(p), p, p.stat().st_size))
        return out


class PathListListing(Listing):
    """A text file of paths, one a line; blank lines and lines starting with '#' are skipped;
    relative paths are relative to the list's folder. A path listed twice is scored once."""

    kind = "list"

    def items(self) -> list[Item]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                f"{self.path} is not a folder, a .tar/.tar.gz/.zip archive or a UTF-8 text file of "
                "paths; give one of those"
            ) from None
        out, seen = [], set()
        for line in text.splitlines():
            name = line.strip()
            if not name or name.startswith("#") or name in seen:
                continue
            seen.add(name)
            p = Path(name).expanduser()
            if not p.is_absolute():
                p = self.path.parent / p
            try:
                size = p.stat().st_size
            except OSError:
                size = None  # reported per item when it is read
            out.append(Item(name, str(p), p, size))
        return out


class TarListing(Listing):
    kind = "tar"

    def items(self) -> list[Item]:
        with tarfile.open(self.path, "r:*") as tar:
            return [
                Item(m.name, f"{self.path}::{m.name}", None, m.size)
                for m in tar.getmembers() if m.isfile() and is_video_name(m.name)
            ]

    def read_one(self, item_id: str, path: str | None) -> bytes:
        # Random access: cheap for a plain .tar; a compressed one is decompressed up to the member.
        if getattr(self, "_tar", None) is None:
            self._tar = tarfile.open(self.path, "r:*")
        try:
            f = self._tar.extractfile(item_id)
        except KeyError:
            raise OSError(f"no member {item_id} in {self.path}") from None
        if f is None:
            raise OSError(f"{item_id} is not a regular file in {self.path}")
        return f.read()

    def read(self, ids: set[str]) -> Iterator[tuple[Item, bytes | OSError]]:
        # "r|*": one forward pass over the (possibly compressed) stream, no seeking.
        with tarfile.open(self.path, "r|*") as tar:
            for m in tar:
                if m.isfile() and m.name in ids:
                    item = Item(m.name, f"{self.path}::{m.name}", None, m.size)
                    f = tar.extractfile(m)
                    yield item, f.read() if f is not None else OSError(f"cannot read {m.name}")


class ZipListing(Listing):
    kind = "zip"

    def items(self) -> list[Item]:
        with zipfile.ZipFile(self.path) as z:
            return [
                Item(i.filename, f"{self.path}::{i.filename}", None, i.file_size)
                for i in z.infolist() if not i.is_dir() and is_video_name(i.filename)
            ]

    def read_one(self, item_id: str, path: str | None) -> bytes:
        if getattr(self, "_zip", None) is None:
            self._zip = zipfile.ZipFile(self.path)
        try:
            return self._zip.read(item_id)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise OSError(f"cannot read {item_id} from {self.path}: {exc}") from None

    def read(self, ids: set[str]) -> Iterator[tuple[Item, bytes | OSError]]:
        with zipfile.ZipFile(self.path) as z:
            for info in z.infolist():
                if info.filename in ids:
                    item = Item(info.filename, f"{self.path}::{info.filename}", None, info.file_size)
                    try:
                        yield item, z.read(info)
                    except (OSError, zipfile.BadZipFile) as exc:
                        yield item, OSError(f"cannot read {info.filename} from the zip: {exc}")


def open_listing(path: Path) -> Listing:
    """The listing for ARCHIVE; raises ValueError with what to do when it is none of the kinds."""
    name = path.name.lower()
    if path.is_dir():
        return FolderListing(path)
    if name.endswith(TAR_SUFFIXES):
        if not tarfile.is_tarfile(path):
            raise ValueError(f"{path} is named like a tar archive but is not one")
        return TarListing(path)
    if name.endswith(".zip"):
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is named like a zip archive but is not one")
        return ZipListing(path)
    if is_video_name(name):
        raise ValueError(
            f"{path} is a video, not an archive: use `vqs analyze {path}`, or list it in a text file"
        )
    return PathListListing(path)
