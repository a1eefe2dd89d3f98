"""What travels to a GPU machine for docker/gpu_check.py, and how it is put back together there.

The GPU machine has no package registry and is reached only through the device tool, which copies the working
tree plus named ignored paths (`carry`), at most 64 MiB a call, the tree included. So everything the check needs
that the machine lacks goes into one tar, written straight into parts of at most `part_bytes` each, one folder per
part (`part-01/bundle.tar.01`, ...), each folder with a copy of the manifest (every part's size and sha256). One
device call carries as many part folders as fit its budget; `plan` lists the calls.

There, each call's parts are checked against the manifest and moved out of the checkout into a stash (`receive`),
since the tool may replace the checkout's ignored paths on a later call. Once every part is there, the tar is read
through the parts in order, never joined on disk, and extracted (`unpack`); `install` puts the wheels into a
private folder with pip and no index, a wheel kept as `NAME.whl.xz` decompressed first.

Standard library only: this runs on the GPU machine before anything is installed there.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

MIB = 2**20
CALL_BYTES = 64 * MIB  # the device tool's limit on what one call carries, the working tree included
MAX_PART_BYTES = 60 * MIB  # no file that travels is larger (the limit; a part is a file)
MAX_CARRY = 8  # paths a call may carry
MANIFEST = "manifest.json"
PART_PREFIX = "part-"


@dataclass(frozen=True)
class Part:
    folder: str  # part-01
    file: str  # bundle.tar.01
    bytes: int
    sha256: str

    @property
    def path(self) -> str:
        return f"{self.folder}/{self.file}"


class _PartWriter(io.RawIOBase):
    """A write-only stream that fills part files of `limit` bytes in turn, hashing each."""

    def __init__(self, out: Path, limit: int) -> None:
        self.out, self.limit = out, limit
        self.parts: list[Part] = []
        self._file: IO[bytes] | None = None
        self._written = 0
        self._hash = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            if self._file is None or self._written == self.limit:
                self._next()
            assert self._file is not None
            take = min(len(view) - done, self.limit - self._written)
            chunk = view[done : done + take]
            self._file.write(chunk)
            self._hash.update(chunk)
            self._written += take
            done += take
        return done

    def _next(self) -> None:
        self._finish()
        number = len(self.parts) + 1
        folder = self.out / f"{PART_PREFIX}{number:02d}"
        folder.mkdir(parents=True)
        self._file = (folder / f"bundle.tar.{number:02d}").open("wb")
        self._written, self._hash = 0, hashlib.sha256()

    def _finish(self) -> None:
        if self._file is None:
            return
        self._file.close()
        name = Path(self._file.name)
        self.parts.append(Part(name.parent.name, name.name, self._written, self._hash.hexdigest()))
        self._file = None

    def close(self) -> None:
        self._finish()
        super().close()


def build(out: Path, members: dict[str, Path], part_bytes: int, meta: dict[str, Any]) -> dict[str, Any]:
    """Write `members` (name in the tar -> file or folder here) into `out` as parts of at most `part_bytes`, with
    the manifest (also returned); anything in `out` before is removed."""
    if not 0 < part_bytes <= MAX_PART_BYTES:
        raise ValueError(f"a part must be 1 byte to {MAX_PART_BYTES // MIB} MiB, not {part_bytes} bytes")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    writer = _PartWriter(out, part_bytes)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, source in sorted(members.items()):
            tar.add(source, arcname=name, filter=_plain)
    writer.close()
    manifest = {
        "parts": [vars(p) for p in writer.parts],
        "bytes": sum(p.bytes for p in writer.parts),
        "members": sorted(members),
        "meta": meta,
    }
    text = json.dumps(manifest, indent=2) + "\n"
    for part in writer.parts:
        (out / part.folder / MANIFEST).write_text(text)
    (out / MANIFEST).write_text(text)
    return manifest


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """No owner or time of this machine in the tar: the same inputs make the same bytes."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def parts(manifest: dict[str, Any]) -> list[Part]:
    return [Part(**p) for p in manifest["parts"]]


def travelling_bytes(root: Path) -> int:
    """Bytes of the working tree the device tool sends with every call: tracked files and untracked ones git does
    not ignore, and a `shared/` folder in the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    files = {root / name for name in listed.decode().split("\0") if name}
    shared = root / "shared"
    if shared.is_dir():
        files |= {p for p in shared.rglob("*") if p.is_file()}
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


def part_size(tree_bytes: int, margin: int = 2 * MIB) -> int:
    """The largest part that fits one call beside the working tree (and `margin` for the tree to grow)."""
    room = CALL_BYTES - tree_bytes - margin
    if room < MIB:
        raise ValueError(
            f"the working tree alone is {tree_bytes / MIB:.1f} MiB of the {CALL_BYTES // MIB} MiB a device call "
            "carries: nothing would fit beside it"
        )
    return min(MAX_PART_BYTES, room)


def plan(manifest: dict[str, Any], bundle: str, tree_bytes: int) -> list[list[str]]:
    """The part folders each device call carries (as paths from the repository root), in order: as many as fit
    beside the working tree, at most MAX_CARRY."""
    calls: list[list[str]] = []
    room = 0
    for part in parts(manifest):
        size = part.bytes + len(json.dumps(manifest)) + 4096  # the folder's copy of the manifest, and slack
        if not calls or len(calls[-1]) == MAX_CARRY or size > room:
            calls.append([])
            room = CALL_BYTES - tree_bytes
        if size > room:
            raise ValueError(f"{part.path} ({part.bytes / MIB:.1f} MiB) does not fit a call beside the working tree")
        calls[-1].append(f"{bundle}/{part.folder}")
        room -= size
    return calls


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(*folders: Path) -> dict[str, Any]:
    """The manifest from the first of `folders` (or their part folders) that holds one."""
    for folder in folders:
        for candidate in [folder / MANIFEST, *sorted(folder.glob(f"{PART_PREFIX}*/{MANIFEST}"))]:
            if candidate.is_file():
                return json.loads(candidate.read_text())
    raise FileNotFoundError(f"no {MANIFEST} in {', '.join(map(str, folders))}: carry a part folder first")


def receive(bundle: Path, stash: Path) -> dict[str, Any]:
    """Move every part under `bundle` that the manifest lists into `stash`, each checked (size and sha256) on the
    way; a part that fails the check stays where it is. Returns which parts the stash holds and which are missing."""
    manifest = read_manifest(bundle, stash)
    stash.mkdir(parents=True, exist_ok=True)
    (stash / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    damaged = []
    for part in parts(manifest):
        arrived, kept = bundle / part.path, stash / part.file
        if not arrived.is_file() or _kept(kept, part):
            continue
        if arrived.stat().st_size != part.bytes or sha256_file(arrived) != part.sha256:
            damaged.append(part.path)
            continue
        shutil.move(str(arrived), kept.with_suffix(".moving"))
        kept.with_suffix(".moving").replace(kept)  # whole or absent, should the call end mid-move
    have = [p.path for p in parts(manifest) if _kept(stash / p.file, p)]
    missing = [p.path for p in parts(manifest) if p.path not in have]
    return {"parts": len(manifest["parts"]), "have": have, "missing": missing, "damaged": damaged}


def _kept(path: Path, part: Part) -> bool:
    """A part in the stash: checked when it was moved there, so its size says it is whole."""
    return path.is_file() and path.stat().st_size == part.bytes


class _Joined(io.RawIOBase):
    """The parts read as one stream, in order."""

    def __init__(self, files: Iterable[Path]) -> None:
        self._files = iter(files)
        self._current: io.BufferedReader | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            if self._current is None:
                path = next(self._files, None)
                if path is None:
                    return 0
                self._current = path.open("rb")
            n = self._current.readinto(buffer)
            if n:
                return n
            self._current.close()
            self._current = None


def unpack(stash: Path, dest: Path) -> list[str]:
    """Extract the tar the stash's parts make into `dest` (every part must be there); returns the members."""
    manifest = read_manifest(stash)
    files = [stash / p.file for p in parts(manifest)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"parts not received yet: {missing}")
    dest.mkdir(parents=True, exist_ok=True)
    stream = io.BufferedReader(_Joined(files), buffer_size=MIB)
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        tar.extractall(dest, filter="data")
    return list(manifest["members"])


def pack_wheel(wheel: Path, out: Path) -> Path:
    """`wheel` re-stored without zip compression and then xz-compressed, as `out/NAME.whl.xz`: xz finds what
    deflate leaves (onnxruntime-gpu: 256 MB as published, 186 MB so), and the wheel pip gets there is the same
    files with the same RECORD."""
    target = out / f"{wheel.name}.xz"
    stored = out / f"{wheel.name}.stored"
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as copy:
        for info in source.infolist():
            with source.open(info) as member, copy.open(_stored(info), "w") as written:
                shutil.copyfileobj(member, written, MIB)
    xz = shutil.which("xz")
    if xz:  # several threads; python's lzma has one (it reads the result either way)
        with target.open("wb") as f:
            subprocess.run([xz, "-T0", "-6", "-c", str(stored)], stdout=f, check=True)
    else:
        with stored.open("rb") as src, lzma.open(target, "wb", preset=6) as dst:
            shutil.copyfileobj(src, dst, MIB)
    stored.unlink()
    return target


def _stored(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    copy = zipfile.ZipInfo(info.filename, info.date_time)
    copy.external_attr = info.external_attr
    copy.compress_type = zipfile.ZIP_STORED
    return copy


def install(wheels: Path, site: Path) -> list[str]:
    """Every wheel in `wheels` (`*.whl.xz` decompressed first) into `site` with pip, no index and no
    dependencies (the bundle holds each one it needs; the rest is the machine's); returns their names."""
    for packed in sorted(wheels.glob("*.whl.xz")):
        with lzma.open(packed) as src, (wheels / packed.name.removesuffix(".xz")).open("wb") as dst:
            shutil.copyfileobj(src, dst, MIB)
        packed.unlink()
    names = sorted(str(w) for w in wheels.glob("*.whl"))
    if names:
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        command += ["--disable-pip-version-check", "--target", str(site), *names]
        subprocess.run(command, check=True, env={**os.environ, "PIP_NO_CACHE_DIR": "1"})
    return [Path(n).name for n in names]
