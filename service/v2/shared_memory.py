"""Triton's system shared memory extension: clients on the same host hand tensors over in POSIX shared memory.

A client creates an object under /dev/shm (`tritonclient.utils.shared_memory`), registers a region of it by name
(`key`, `offset`, `byte_size`), and then names the region in an `infer` request's input or output parameters
(`shared_memory_region`, `shared_memory_byte_size`, optional `shared_memory_offset`): the server reads the input
from there, or writes the output there and sends no data for it.

Off unless `VITSERVE_SYSTEM_SHARED_MEMORY=true`: a client that may register names host memory, so every route and
parameter answers 403 while it is off. What is checked, and why:

- A key is one POSIX shm name ("/name"): no other path, no "..", opened with O_NOFOLLOW (a symlink planted under
  /dev/shm is refused) and O_NONBLOCK (a FIFO there cannot stall the open), and it must be a regular file.
- Every access checks the tensor's offset and size against the region's registered size (400), and the object's
  size now (fstat, 400): a client may shrink its object after registering.
- The bytes move with pread/pwrite on a file descriptor, not through a mapping: an object shrunk between the
  check and the copy gives a short read (400) or a write that grows the object again, where a mapping would give
  the process SIGBUS.
- Each access opens the object with only the access it needs: reading inputs needs read permission, writing
  outputs needs write permission (an object the server may only read serves inputs).
- Each access also checks that the key still names the object registered (device and inode), so a region means
  the same memory in every process, whichever registered it.
- At most `VITSERVE_SYSTEM_SHARED_MEMORY_MAX_REGIONS` regions, server-wide.

The registry is a directory of one small JSON file per region, under the supervisor's runtime directory in
multi-process mode (`REGISTRY_ENV`), so a region registered through one worker is seen by every other (the kernel
spreads a client's connections over them); in one process, a private temporary directory. Nothing is cached: an
access reads the region's file and opens the object (tens of microseconds), so an unregister through any worker
takes effect in all of them at once.

Protocol front ends call `registry(state)` and `TensorRef.parse` (REST: service.api.shared_memory and
service.api.v2; a gRPC `ModelInfer` can do the same with its tensors' parameters).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from service.errors import BadRequest, NotFound, PayloadTooLarge, ServiceError

if TYPE_CHECKING:
    from service.core.state import ServiceState
    from service.v2.codec import OutputTensor, TensorIn

EXTENSION = "system_shared_memory"  # its name in `GET /v2` extensions
REGION, BYTE_SIZE, OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"
SHM_DIR = Path("/dev/shm")  # where glibc's shm_open, and Python's multiprocessing.shared_memory, keep objects
MAX_NAME_CHARS = 256
# One shm_open name: a leading "/", then up to NAME_MAX bytes without "/" or NUL.
_KEY = re.compile(r"/[^/\x00]{1,255}")
# open(2) flags for every access: never follow a symlink, never block on a FIFO, never leak into a child.
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

Direction = Literal["input", "output"]


class SharedMemoryOff(ServiceError):
    status, code = 403, "forbidden"


class Conflict(ServiceError):
    status, code = 409, "conflict"


OFF_MESSAGE = (
    "system shared memory is off on this server; start it with VITSERVE_SYSTEM_SHARED_MEMORY=true to use "
    "/v2/systemsharedmemory and shared_memory_region parameters (README: System shared memory)"
)


@dataclass(frozen=True)
class Region:
    """A registered region, as its registry file holds it; `device` and `inode` name the object registered."""

    name: str
    key: str
    offset: int
    byte_size: int
    device: int
    inode: int

    def status(self) -> dict[str, Any]:
        """The protocol's status entry."""
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


@dataclass(frozen=True)
class TensorRef:
    """Where in a region a tensor lies: an input to read or an output to write."""

    direction: Direction
    tensor: str
    region: str
    offset: int
    byte_size: int

    @classmethod
    def parse(cls, direction: Direction, tensor: str, parameters: Mapping[str, Any]) -> TensorRef:
        """The tensor's place from its parameters (`names_region` says whether it has one); a bad one is a 400."""
        region, size, offset = parameters.get(REGION), parameters.get(BYTE_SIZE), parameters.get(OFFSET, 0)
        where = f"{direction} {tensor!r}"
        if not isinstance(region, str) or not region:
            raise BadRequest(f"{where}: {REGION} must be a region name, with {BYTE_SIZE}; got {region!r}")
        for parameter, value in ((BYTE_SIZE, size), (OFFSET, offset)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BadRequest(f"{where}: {parameter} must be a non-negative integer, got {value!r}")
        assert isinstance(size, int) and isinstance(offset, int)
        return cls(direction, tensor, region, offset, size)

    @property
    def where(self) -> str:
        return f"{self.direction} {self.tensor!r}"


_PARAMETERS = frozenset((REGION, BYTE_SIZE, OFFSET))


def names_region(parameters: Mapping[str, Any]) -> bool:
    """Whether a tensor's parameters put it in a shared memory region (all three are the extension's)."""
    return not _PARAMETERS.isdisjoint(parameters)  # in C: every input and output of every V2 request asks


class Registry:
    """The server's registered regions, kept in `directory` (shared by every process of the server)."""

    def __init__(self, directory: Path, max_regions: int) -> None:
        self.directory = directory
        self.max_regions = max_regions

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        _check_name(name)
        path = _object_path(key)
        if offset < 0 or byte_size < 1:
            raise BadRequest(f"region {name!r}: offset must be >= 0 and byte_size >= 1; got {offset}, {byte_size}")
        with _open_object(path, os.O_RDONLY, f"region {name!r}") as fd:
            info = os.fstat(fd)
        if offset + byte_size > info.st_size:
            raise BadRequest(
                f"region {name!r}: offset {offset} + byte_size {byte_size} = {offset + byte_size} bytes, but the "
                f"shared memory object {key} holds {info.st_size}"
            )
        region = Region(name, key, offset, byte_size, info.st_dev, info.st_ino)
        with self._locked():
            entry = self._entry(name)
            if entry.exists():
                raise Conflict(
                    f"a system shared memory region named {name!r} is already registered; unregister it first"
                )
            count = sum(1 for _ in self.directory.glob("*.json"))
            if count >= self.max_regions:
                raise BadRequest(
                    f"{count} system shared memory regions are registered, the limit "
                    "(VITSERVE_SYSTEM_SHARED_MEMORY_MAX_REGIONS); unregister some first"
                )
            temporary = entry.with_suffix(".tmp")
            temporary.write_text(json.dumps(dataclasses.asdict(region)))
            temporary.replace(entry)  # atomic: a reader sees the whole record or none
        return region

    def unregister(self, name: str | None) -> None:
        """One region, or every region (None). An unknown name is not an error, as in Triton."""
        with self._locked():
            entries = [self._entry(name)] if name is not None else list(self.directory.glob("*.json"))
            for entry in entries:
                entry.unlink(missing_ok=True)

    def status(self, name: str | None) -> list[Region]:
        """One region (404 when not registered), or every region, by name."""
        if name is not None:
            region = self.region(name)
            if region is None:
                raise NotFound(f"no system shared memory region named {name!r} is registered")
            return [region]
        regions = [r for entry in self.directory.glob("*.json") if (r := _read_entry(entry)) is not None]
        return sorted(regions, key=lambda r: r.name)

    def region(self, name: str) -> Region | None:
        return _read_entry(self._entry(name))

    def check(self, ref: TensorRef) -> Region:
        """The region `ref` lies in; a 400 unless it is registered and `ref` lies inside it."""
        region = self.region(ref.region)
        if region is None:
            raise BadRequest(
                f"{ref.where}: no system shared memory region named {ref.region!r} is registered; register it "
                f"first (POST /v2/systemsharedmemory/region/{ref.region}/register)"
            )
        if ref.offset + ref.byte_size > region.byte_size:
            raise BadRequest(
                f"{ref.where}: {OFFSET} {ref.offset} + {BYTE_SIZE} {ref.byte_size} = {ref.offset + ref.byte_size} "
                f"passes the end of region {ref.region!r} ({region.byte_size} bytes)"
            )
        return region

    def read(self, ref: TensorRef) -> bytes:
        """The `ref.byte_size` bytes of an input."""
        with self._access(ref, os.O_RDONLY) as (fd, start):
            data = os.pread(fd, ref.byte_size, start)
        if len(data) != ref.byte_size:  # the object shrank after the size check
            raise BadRequest(f"{ref.where}: the shared memory object of region {ref.region!r} shrank while being read")
        return data

    def write(self, ref: TensorRef, data: bytes) -> None:
        """An output's bytes, at the start of the tensor's place (which must hold them)."""
        if len(data) > ref.byte_size:
            raise BadRequest(
                f"{ref.where} is {len(data)} bytes; {BYTE_SIZE} {ref.byte_size} cannot hold it (send a larger one)"
            )
        with self._access(ref, os.O_WRONLY) as (fd, start):
            view = memoryview(data)
            while view:  # pwrite may write less than asked
                written = os.pwrite(fd, view, start)
                view, start = view[written:], start + written

    @contextlib.contextmanager
    def _access(self, ref: TensorRef, mode: int) -> Iterator[tuple[int, int]]:
        """The object's descriptor, checked still to be the registered object and large enough, and where the
        tensor starts in it."""
        region = self.check(ref)
        with _open_object(_object_path(region.key), mode, f"{ref.where} (region {ref.region!r})") as fd:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) != (region.device, region.inode):
                raise BadRequest(
                    f"{ref.where}: the shared memory object {region.key} was removed or replaced after region "
                    f"{ref.region!r} was registered; unregister the region and register it again"
                )
            start = region.offset + ref.offset
            if info.st_size < start + ref.byte_size:
                raise BadRequest(
                    f"{ref.where}: the shared memory object {region.key} is now {info.st_size} bytes; region "
                    f"{ref.region!r} needs {start + ref.byte_size} (it shrank after registration)"
                )
            yield fd, start

    def _entry(self, name: str) -> Path:
        # A hash, not the name: a region name is any string (slashes, dots), a file name is not.
        return self.directory / f"{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()}.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Registration and unregistration one at a time across every process (the cap needs a stable count)."""
        with open(self.directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def _read_entry(entry: Path) -> Region | None:
    try:
        return Region(**json.loads(entry.read_text()))
    except FileNotFoundError:
        return None


def _check_name(name: str) -> None:
    if not name or len(name) > MAX_NAME_CHARS:
        raise BadRequest(f"a region name must be 1 to {MAX_NAME_CHARS} characters; got {len(name)}")


def _object_path(key: str) -> Path:
    """The file of a POSIX shm key ("/name"); anything else (a path, "..", a name too long) is a 400."""
    if not isinstance(key, str) or not _KEY.fullmatch(key) or key in ("/.", "/.."):
        raise BadRequest(
            f"key {key!r} is not a POSIX shared memory name: give \"/name\" (one '/' then up to 255 characters "
            f"without '/'), the name shm_open and multiprocessing.shared_memory use, of an object under {SHM_DIR}"
        )
    return SHM_DIR / key[1:]


@contextlib.contextmanager
def _open_object(path: Path, mode: int, what: str) -> Iterator[int]:
    key = f"/{path.name}"
    try:
        fd = os.open(path, mode | _OPEN_FLAGS)
    except FileNotFoundError:
        raise BadRequest(f"{what}: no shared memory object {key} exists (under {SHM_DIR})") from None
    except PermissionError:
        access = "read" if mode == os.O_RDONLY else "write to"
        raise BadRequest(f"{what}: the server may not {access} the shared memory object {key}") from None
    except OSError as e:  # ELOOP: a symlink; ENXIO: a socket; and the like
        raise BadRequest(f"{what}: {key} is not a shared memory object the server can open ({e.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadRequest(f"{what}: {key} is not a shared memory object (not a regular file)")
        yield fd
    finally:
        os.close(fd)


# One registry per running service (the app's state), made on first use.
_REGISTRIES: weakref.WeakKeyDictionary[ServiceState, Registry] = weakref.WeakKeyDictionary()


def registry(state: ServiceState) -> Registry:
    """The service's registry; 403 while the extension is off."""
    settings = state.settings
    if not settings.system_shared_memory:
        raise SharedMemoryOff(OFF_MESSAGE)
    found = _REGISTRIES.get(state)
    if found is None:
        if state.shm_registry_dir is not None:  # one for every worker (multi-process mode)
            directory = state.shm_registry_dir
        else:  # one process: a directory of its own, removed with the service
            directory = Path(tempfile.mkdtemp(prefix="vitserve-shm-"))
            weakref.finalize(state, shutil.rmtree, directory, ignore_errors=True)
        found = _REGISTRIES[state] = Registry(directory, settings.system_shared_memory_max_regions)
    return found


async def read_input(state: ServiceState, tensor: TensorIn) -> tuple[TensorIn, bytes] | None:
    """An input given by region, as the binary data extension would carry it: the tensor (its parameters now
    `binary_data_size`) and its bytes. None when the input names no region."""
    if not names_region(tensor.parameters):
        return None
    regions = registry(state)  # first: while the extension is off, that is the answer
    ref = TensorRef.parse("input", tensor.name, tensor.parameters)
    if tensor.data is not None or "binary_data_size" in tensor.parameters:
        raise BadRequest(f"{ref.where} names a shared memory region and also carries data; send one or the other")
    # The region stands in for the request body: the same limit bounds what the server copies out of it.
    limit = state.settings.max_body_bytes
    if ref.byte_size > limit:
        raise PayloadTooLarge(
            f"{ref.where}: {BYTE_SIZE} {ref.byte_size} is over the {limit}-byte limit (VITSERVE_MAX_BODY_BYTES)"
        )
    data = await state.run_sized(ref.byte_size, regions.read, ref)
    return tensor.model_copy(update={"parameters": {"binary_data_size": len(data)}}), data


def output_refs(state: ServiceState, outputs: list[Any]) -> dict[str, TensorRef]:
    """The requested outputs to be written into regions, by name, each checked to lie in a registered region
    (before any inference: a typo costs no model run). `outputs` are V2 output requests (name, parameters)."""
    refs = {}
    for out in outputs:
        if not names_region(out.parameters):
            continue
        regions = registry(state)  # first: while the extension is off, that is the answer
        ref = TensorRef.parse("output", out.name, out.parameters)
        if out.parameters.get("classification") is not None:
            raise BadRequest(f"{ref.where}: a classification output cannot go into a shared memory region")
        regions.check(ref)
        refs[out.name] = ref
    return refs


async def write_outputs(
    state: ServiceState, refs: dict[str, TensorRef], tensors: list[OutputTensor]
) -> list[OutputTensor]:
    """Each output named in `refs` written into its region; the tensors, those marked as placed there (the
    response then carries their shape and parameters, and no data)."""
    placed = []
    for tensor in tensors:
        ref = refs.get(tensor.request.name)
        if ref is not None:
            assert not isinstance(tensor.value, list), "output_refs refuses classification (BYTES) outputs"
            data = tensor.value.tobytes()
            await state.run_sized(len(data), registry(state).write, ref, data)
            parameters: dict[str, Any] = {REGION: ref.region, BYTE_SIZE: len(data)}
            if ref.offset:
                parameters[OFFSET] = ref.offset
            tensor = dataclasses.replace(tensor, placed=parameters)
        placed.append(tensor)
    return placed
