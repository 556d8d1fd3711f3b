"""The checkpoint manifest: what a committed checkpoint holds and where.

A tier commits a checkpoint by writing ``step-<N>/manifest.msgpack`` last.
The manifest is msgpack (never pickle) inside a versioned envelope carrying
an xxh64 of the body, so a flipped bit in the manifest itself is caught.
Everything read back is validated before it is trusted.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import msgpack
import xxhash

from tiers.base import Tier, validate_key

from .errors import ManifestError
from .layout import committed_in, manifest_key
from .state import dtype_from_name

FORMAT = "asymcheck"
VERSION = 1
_MAX_BYTES = 1 << 50  # no single tensor or file is this large; larger claims are hostile


def checksum(data: Any) -> int:
    return xxhash.xxh64_intdigest(data)


class ChunkMeta(NamedTuple):
    """``raw_len`` decoded bytes of a tensor, stored as ``stored_len`` bytes in ``file``.

    A tuple (not a dataclass): a checkpoint holds tens of thousands, packed as msgpack arrays.
    """

    file: str
    offset: int
    stored_len: int
    raw_offset: int
    raw_len: int
    xxh64: int  # of the decoded bytes
    codec: str = "raw"
    elem_size: int = 1
    base_step: int | None = None  # delta chunks name the checkpoint they apply to
    stored_xxh64: int | None = None  # of the stored bytes, when they differ from the decoded


_new_tuple = tuple.__new__


def raw_chunk(file: str, offset: int, nbytes: int, raw_offset: int, xxh64: int) -> ChunkMeta:
    """A chunk stored as it is (``codec = "raw"``): built without the keyword handling of
    ``ChunkMeta(...)``, at half its cost; a save's chunk table makes one per chunk."""
    return _new_tuple(ChunkMeta, (file, offset, nbytes, raw_offset, nbytes, xxh64, "raw", 1,
                                  None, None))


class TensorMeta(NamedTuple):
    """One tensor of a checkpoint and its chunks.

    A tuple, as ``ChunkMeta`` is: a save builds one per tensor, at half the cost of a frozen
    dataclass, and a manifest packs them as they are, without a list per tensor each time.
    """

    path: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: tuple[ChunkMeta, ...]


@dataclass(frozen=True)
class FileMeta:
    key: str  # relative to the step directory
    size: int


class Segment(NamedTuple):
    """Bytes [src_start, src_end) of the host file ``src_file`` live in ``file`` at ``offset``.

    A flush copies runs of raw tensors verbatim into batch files; segments map the host
    layout's (file, offset) onto them, so those tensors' chunk tables are reused as they are.
    """

    src_file: str
    src_start: int
    src_end: int
    file: str
    offset: int


@dataclass(frozen=True)
class Manifest:
    step: int
    created_s: float
    job: str
    objects: bytes  # msgpack skeleton of the non-tensor state
    tensors: tuple[TensorMeta, ...]
    files: tuple[FileMeta, ...]
    world_size: int = 1
    info: dict[str, Any] = field(default_factory=dict)
    segments: tuple[Segment, ...] = ()

    @functools.cached_property
    def _segment_index(self) -> dict[str, tuple[list[int], list[Segment]]]:
        index: dict[str, list[Segment]] = {}
        for seg in self.segments:
            index.setdefault(seg.src_file, []).append(seg)
        out = {}
        for src, segs in index.items():
            segs.sort(key=lambda g: g.src_start)
            out[src] = ([g.src_start for g in segs], segs)
        return out

    def locate(self, chunk: ChunkMeta) -> tuple[str, int]:
        """Where a chunk's stored bytes are: (file, offset), through the segment map."""
        found = self._segment_index.get(chunk.file)
        if found is None:
            return chunk.file, chunk.offset
        starts, segs = found
        i = bisect.bisect_right(starts, chunk.offset) - 1
        seg = segs[i] if i >= 0 else None
        if seg is None or chunk.offset + chunk.stored_len > seg.src_end:
            raise ManifestError(f"chunk {chunk.file}@{chunk.offset} is in no segment")
        return seg.file, seg.offset + chunk.offset - seg.src_start

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def stored_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def with_layout(self, tensors: tuple[TensorMeta, ...], files: tuple[FileMeta, ...],
                    segments: tuple[Segment, ...] = (), **info: Any) -> Manifest:
        """The same checkpoint stored with another layout (another tier, codec or batching)."""
        return replace(self, tensors=tensors, files=files, segments=segments,
                       info={**self.info, **info})

    def to_bytes(self) -> bytes:
        body = msgpack.packb({
            "step": self.step, "created_s": self.created_s, "job": self.job,
            "objects": self.objects, "world_size": self.world_size, "info": self.info,
            "files": [[f.key, f.size] for f in self.files],
            "segments": self.segments,
            # each TensorMeta packs as [path, dtype, shape, nbytes, chunks], as it is
            "tensors": self.tensors,
        }, use_bin_type=True)
        return msgpack.packb({"format": FORMAT, "version": VERSION, "body": body,
                              "xxh64": checksum(body)}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "manifest") -> Manifest:
        try:
            return _decode(data)
        except ManifestError as e:
            raise ManifestError(f"{source}: {e}") from None
        except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException) as e:
            raise ManifestError(f"{source}: malformed manifest ({type(e).__name__}: {e})") from e


def _int(value: Any, what: str, lo: int = 0, hi: int = _MAX_BYTES) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ManifestError(f"{what} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def _decode(data: bytes) -> Manifest:
    env = msgpack.unpackb(data, raw=False, strict_map_key=True)
    if not isinstance(env, dict) or env.get("format") != FORMAT:
        raise ManifestError("not an asymcheck manifest")
    if env.get("version") != VERSION:
        raise ManifestError(f"manifest format version {env.get('version')!r} is not supported "
                            f"(this build reads version {VERSION})")
    body = env["body"]
    if not isinstance(body, bytes) or checksum(body) != env.get("xxh64"):
        raise ManifestError("manifest checksum mismatch (corrupt manifest)")
    b = msgpack.unpackb(body, raw=False, strict_map_key=False)
    files = tuple(FileMeta(validate_key(k), _int(s, f"file {k!r} size")) for k, s in b["files"])
    sizes = {f.key: f.size for f in files}
    segments = []
    for src, start, end, file, off in b.get("segments", []):
        validate_key(src)
        _int(start, "segment start")
        _int(end, "segment end")
        _int(off, "segment offset")
        if end < start or file not in sizes or off + end - start > sizes[file]:
            raise ManifestError(f"segment {src}@[{start}, {end}) -> {file!r}@{off} does not fit "
                                "the files")
        segments.append(Segment(src, start, end, file, off))
    index: dict[str, list[tuple[int, int]]] = {}
    for seg in segments:
        index.setdefault(seg.src_file, []).append((seg.src_start, seg.src_end))
    bounds = {src: (sorted(r), [a for a, _ in sorted(r)]) for src, r in index.items()}
    tensors = []
    for path, dtype, shape, nbytes, chunks in b["tensors"]:
        if not isinstance(path, str) or "\x00" in path:
            raise ManifestError(f"bad tensor path {path!r}")
        torch_dtype = dtype_from_name(dtype)
        shape_t = tuple(_int(d, f"{path}: dimension") for d in shape)
        _int(nbytes, f"{path}: nbytes")
        elem = torch_dtype.itemsize
        if math.prod(shape_t) * elem != nbytes:
            raise ManifestError(f"{path}: shape {shape_t} of {dtype} is not {nbytes} bytes")
        metas, expect = [], 0
        for f, off, slen, roff, rlen, h, codec, esize, base, stored_h in chunks:
            _int(off, f"{path}: chunk offset")
            _int(slen, f"{path}: chunk stored length")
            if f in sizes:
                if off + slen > sizes[f]:
                    raise ManifestError(f"{path}: chunk [{off}, {off + slen}) lies outside "
                                        f"{f!r} of {sizes[f]} bytes")
            elif f in bounds:
                ranges, starts = bounds[f]
                i = bisect.bisect_right(starts, off) - 1
                if i < 0 or off + slen > ranges[i][1]:
                    raise ManifestError(f"{path}: chunk {f}@{off} lies in no segment")
            else:
                raise ManifestError(f"{path}: chunk refers to unknown file {f!r}")
            if roff != expect:
                raise ManifestError(f"{path}: chunks do not tile the tensor at byte {expect}")
            expect += _int(rlen, f"{path}: chunk length")
            if not isinstance(codec, str):
                raise ManifestError(f"{path}: bad codec {codec!r}")
            if base is not None:
                _int(base, f"{path}: base step", hi=10**12)
            if stored_h is not None:
                _int(stored_h, "stored checksum", hi=2**64 - 1)
            elif codec != "raw":
                raise ManifestError(f"{path}: a {codec} chunk needs a stored checksum")
            if codec == "raw" and slen != rlen:
                raise ManifestError(f"{path}: a raw chunk stores {slen} of {rlen} bytes")
            metas.append(ChunkMeta(f, off, slen, roff, rlen, _int(h, "checksum", hi=2**64 - 1),
                                   codec, _int(esize, "element size", 1, 16), base, stored_h))
        if expect != nbytes:
            raise ManifestError(f"{path}: chunks hold {expect} bytes, tensor has {nbytes}")
        tensors.append(TensorMeta(path, dtype, shape_t, nbytes, tuple(metas)))
    info = b.get("info", {})
    if not isinstance(info, dict):
        raise ManifestError("info must be a map")
    objects = b["objects"]
    if not isinstance(objects, bytes):
        raise ManifestError("objects must be bytes")
    job = b["job"]
    if not isinstance(job, str):
        raise ManifestError("job must be a string")
    return Manifest(step=_int(b["step"], "step", hi=10**12 - 1),
                    created_s=float(b["created_s"]), job=job, objects=objects,
                    tensors=tuple(tensors), files=files,
                    world_size=_int(b.get("world_size", 1), "world_size", 1, 1 << 20), info=info,
                    segments=tuple(segments))


async def committed_steps(tier: Tier) -> list[int]:
    """Steps with a manifest on ``tier``, ascending."""
    return committed_in(await tier.list("step-"))


async def read_manifest(tier: Tier, step: int) -> Manifest:
    key = manifest_key(step)
    data = await tier.get(key)
    manifest = Manifest.from_bytes(data, source=f"{tier.name}:{key}")
    if manifest.step != step:
        raise ManifestError(f"{tier.name}:{key}: manifest is for step {manifest.step}")
    return manifest
