"""Where images come from and how they are decoded: one interface over both record forms.

A record source maps an index to ``(name, label, payload)``, from a folder (:class:`FolderRecords`) or
from ``prepare``'s ArrayRecord shards (:class:`PackedRecords`); a payload is an encoded image (``'jpeg'``)
or the uint8 pixels themselves (``'raw'``). :class:`DecodedSource` turns it into ``{'image', 'label',
'mask'}`` and never raises mid-epoch: an unreadable image is replaced (training) or masked out
(evaluation), and always named in a warning.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections.abc import Sequence

import numpy as np
import simplejpeg
from PIL import Image

from alexnet_jax.data.layout import EXPECTED_LAYOUT, SplitFiles
from alexnet_jax.errors import DatasetError, DecodeError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Decoding


def decode_image(data: bytes, size: int, warp: bool = False) -> np.ndarray:
    """Any Pillow-readable image's bytes (CMYK, grey, palette too) -> uint8 ``(size, size, 3)`` RGB.

    The paper's shorter side to ``size`` and central square, or with ``warp`` the whole image to
    ``size x size`` (Caffe's test-time resize). A JPEG already ``size x size`` (every packed record) goes
    through libjpeg-turbo straight into NumPy: Pillow's pixels in half the time (Pillow copies twice more).
    A truncated or corrupt file raises :class:`DecodeError`.
    """
    img_HWC = _decode_square_jpeg(data, size)
    return img_HWC if img_HWC is not None else decode_with_pillow(data, size, warp)


def _decode_square_jpeg(data: bytes, size: int) -> np.ndarray | None:
    """The fast path; None for anything else (another size, CMYK, not a JPEG, damaged): Pillow decides."""
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if (h, w) != (size, size) or colorspace not in ("YCbCr", "Gray"):
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB")  # strict: a libjpeg warning raises
    except ValueError:
        return None


def decode_with_pillow(data: bytes, size: int, warp: bool = False) -> np.ndarray:
    """:func:`decode_image` through Pillow alone, for every input it accepts."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4, 1/8 scale when the image is
                # much larger than needed: same result class, much cheaper.
                im.draft("RGB", (size, size))
            im.load()
            img_HWC = rescale_center_square(im, size, warp)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError...
        raise DecodeError(f"{type(e).__name__}: {e}") from e
    if img_HWC.shape != (size, size, 3):
        raise DecodeError(f"unexpected decoded shape {img_HWC.shape}")
    return img_HWC


def rescale_center_square(im: Image.Image, size: int, warp: bool = False) -> np.ndarray:
    """A loaded Pillow image -> uint8 ``(size, size, 3)`` RGB: shorter side to ``size``, central square
    (``warp``: the whole image resized to ``size x size``).

    Shared by decoding and by inference on in-memory images, so both see the same pixels.
    """
    img = im.convert("RGB") if im.mode != "RGB" else im
    w, h = img.size
    if (w, h) != (size, size) and warp:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    elif (w, h) != (size, size):
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def encode_jpeg(img_HWC: np.ndarray, quality: int = 95, subsampling: str = "420") -> bytes:
    """uint8 HWC -> JPEG bytes (what the packed form stores).

    ``subsampling`` '420' (half-resolution chroma, fastest to decode) or '444' (~1.3x slower to decode,
    closer to the source: colour edges are not blurred a second time).
    """
    codes = {"444": 0, "422": 1, "420": 2}
    if subsampling not in codes:
        raise ValueError(f"subsampling must be one of {sorted(codes)}, got {subsampling!r}")
    buf = io.BytesIO()
    Image.fromarray(img_HWC).save(buf, format="JPEG", quality=quality, subsampling=codes[subsampling])
    return buf.getvalue()


# ---------------------------------------------------------------------------
# Record payloads: an encoded image, or the pixels themselves

RECORD_FORMATS = ("jpeg", "raw")


def raw_record_bytes(size: int) -> int:
    """Payload bytes of one ``'raw'`` record: ``size * size * 3`` (196,608 at 256 px)."""
    return size * size * 3


def encode_raw(img_HWC: np.ndarray) -> bytes:
    """uint8 ``(size, size, 3)`` -> the ``'raw'`` payload: its bytes in row-major (H, W, C) order."""
    if img_HWC.dtype != np.uint8 or img_HWC.ndim != 3 or img_HWC.shape[2] != 3 or img_HWC.shape[0] != img_HWC.shape[1]:
        raise ValueError(f"a raw record holds a uint8 (size, size, 3) image, got {img_HWC.dtype} {img_HWC.shape}")
    return np.ascontiguousarray(img_HWC).tobytes()


def decode_record_pixels(
    payload: bytes, size: int, records: str = "jpeg", *, warp: bool = False, name: str | None = None
) -> np.ndarray:
    """One record's payload -> uint8 ``(size, size, 3)`` RGB, for either record format.

    ``'jpeg'``: :func:`decode_image`. ``'raw'``: a read-only view of ``payload`` (no copy; ``warp`` does
    not apply, the square is already cut); a wrong length is a :class:`DecodeError` naming ``name``, so a
    damaged record is handled like a corrupt JPEG.
    """
    if records == "jpeg":
        return decode_image(payload, size, warp)
    if records != "raw":
        raise ValueError(f"records must be one of {RECORD_FORMATS}, got {records!r}")
    expected = raw_record_bytes(size)
    if len(payload) != expected:
        what = f"raw record {name!r}" if name is not None else "raw record"
        raise DecodeError(f"{what} holds {len(payload)} bytes, expected {expected} ({size}x{size}x3 uint8)")
    return np.frombuffer(payload, np.uint8).reshape(size, size, 3)


# ---------------------------------------------------------------------------
# Record sources: index -> (name, label, payload)

_MAGIC = b"AXJ1"


def pack_record(name: str, label: int, payload: bytes) -> bytes:
    """One packed example: magic, int32 label, uint16 name length, name, payload (JPEG bytes or raw pixels)."""
    name_b = name.encode("utf-8")
    return _MAGIC + struct.pack("<iH", label, len(name_b)) + name_b + payload


def unpack_record(rec: bytes) -> tuple[str, int, bytes]:
    """Inverse of :func:`pack_record`; a foreign record is a :class:`DecodeError`, skipped like a bad image."""
    if rec[:4] != _MAGIC:
        raise DecodeError("not an alexnet_jax packed record")
    label, n = struct.unpack_from("<iH", rec, 4)
    name = rec[10 : 10 + n].decode("utf-8")
    return name, label, rec[10 + n :]


class FolderRecords:
    """Index -> (path, label, file bytes) for a :class:`SplitFiles`."""

    def __init__(self, files: SplitFiles):
        self.root = files.root
        self.rel_paths = files.rel_paths
        self.labels = files.labels

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __getitem__(self, i: int) -> tuple[str, int, bytes | None]:
        path = os.path.join(self.root, self.rel_paths[i])
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            log.warning("cannot read %s: %s", path, e)
            data = None
        return path, int(self.labels[i]), data


class PackedRecords:
    """Index -> (name, label, payload) from ArrayRecord shards written by ``prepare``.

    ``records``: the payload format, ``'jpeg'`` or ``'raw'``, as the folder's ``metadata.json`` says
    (``packed_records(dst, split)`` reads it and builds this).
    """

    def __init__(self, shard_paths: Sequence[str], records: str = "jpeg"):
        import grain  # Imported lazily: sources.py must stay importable in prepare's workers.

        if not shard_paths:
            raise DatasetError(f"no ArrayRecord shards given; {EXPECTED_LAYOUT}")
        if records not in RECORD_FORMATS:
            raise ValueError(f"records must be one of {RECORD_FORMATS}, got {records!r}")
        self.record_format = records
        self.shard_paths = list(shard_paths)
        self._source = grain.sources.ArrayRecordDataSource(self.shard_paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> tuple[str, int, bytes | None]:
        try:
            return unpack_record(self._source[i])
        except DecodeError as e:
            log.warning("packed record %d: %s", i, e)
            return f"record {i}", -1, None


class DecodedSource:
    """Random-access source of decoded ``{'image', 'label', 'mask'}`` examples.

    on_error='substitute' (training): an unreadable image becomes the next readable one, with *its* label,
    so batches stay full and no label is wrong. on_error='mask' (evaluation): a zero image with
    ``mask=False``, neither counted nor duplicated. Both warn once per file and process; ``failures`` maps
    each to its error. Raw images are read-only views of the record bytes: transforms must never write.
    """

    def __init__(self, records, size: int, on_error: str = "substitute", warp: bool = False):
        if on_error not in ("substitute", "mask"):
            raise ValueError(f"on_error must be substitute or mask, got {on_error!r}")
        self.records = records
        self.size = size
        self.on_error = on_error
        self.warp = warp
        self.record_format = getattr(records, "record_format", "jpeg")
        self.failures: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _try(self, i: int):
        name, label, data = self.records[i]
        if data is None or label < 0:
            err = "unreadable record"
        else:
            try:
                return decode_record_pixels(data, self.size, self.record_format, warp=self.warp, name=name), label
            except DecodeError as e:
                err = str(e)
        if name not in self.failures:
            self.failures[name] = err
            log.warning("skipping unreadable image %s (%s)", name, err)
        return None, label

    def __getitem__(self, i: int) -> dict:
        n = len(self.records)
        i = int(i) % n
        img, label = self._try(i)
        if img is not None:
            return {"image": img, "label": np.int32(label), "mask": np.bool_(True)}
        if self.on_error == "mask":
            return {
                "image": np.zeros((self.size, self.size, 3), np.uint8),
                "label": np.int32(max(label, 0)),
                "mask": np.bool_(False),
            }
        for k in range(1, n):
            img, label = self._try((i + k) % n)
            if img is not None:
                return {"image": img, "label": np.int32(label), "mask": np.bool_(True)}
        raise DatasetError("no readable image in the whole dataset")
