"""Image access by manifest path, and the per-image facts ingest records.

Manifest paths are relative to raw_dir. Images stored inside a MedMNIST-style .npz use
the form "<file>.npz::<split>/<index>" (e.g. "bloodmnist.npz::train/00012"), so every
manifest row names one image that `read_image` can load, whatever the source.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path

import cv2
import imagehash
import numpy as np
from PIL import Image

NPZ_SEP = "::"
JPEG_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif"}
PHASH_SIDE = 32       # imagehash.phash input: hash_size 8 x highfreq_factor 4
PHASH_REDUCING_GAP = 3.0  # PIL: box-reduce to >= 3x the target before Lanczos


def safe_relpath(item_id: str) -> str:
    """An item id as a relative output path: sub-folders kept, anything that could leave the
    output folder ('..', a leading '/') or trouble a file system (':', spaces) replaced."""

    parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", p) for p in str(item_id).replace("\\", "/").split("/")]
    parts = [p.replace("..", "_") for p in parts if p not in ("", ".")]
    return "/".join(parts) or "_"


BOX_RE = re.compile(r"^(?P<file>.+)#(?P<x0>\d+),(?P<y0>\d+),(?P<x1>\d+),(?P<y1>\d+)$")


def box_path(file_rel: str, box: tuple[int, int, int, int]) -> str:
    """Manifest path of one annotated object of an image: 'JPEGImages/a.jpg#78,336,184,435'."""
    return f"{file_rel}#{box[0]},{box[1]},{box[2]},{box[3]}"


def parse_box_path(rel_path: str) -> tuple[str, tuple[int, int, int, int]] | None:
    """('JPEGImages/a.jpg', (78, 336, 184, 435)) for an object path; None for a plain path."""
    m = BOX_RE.match(rel_path)
    if m is None:
        return None
    return m["file"], (int(m["x0"]), int(m["y0"]), int(m["x1"]), int(m["y1"]))


def crop_box(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray | None:
    """The box's pixels (clipped to the image); None if nothing of it lies inside."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], w), min(box[3], h)
    return np.ascontiguousarray(img[y0:y1, x0:x1]) if x1 > x0 and y1 > y0 else None


def npz_path(npz_rel: str, split: str, index: int) -> str:
    """Manifest path of row `index` of `<split>_images` in an npz archive."""
    return f"{npz_rel}{NPZ_SEP}{split}/{index:05d}"


def parse_npz_path(rel_path: str) -> tuple[str, str, int] | None:
    """("bloodmnist.npz", "train", 12) for "bloodmnist.npz::train/00012"; None for a plain file path."""
    if NPZ_SEP not in rel_path:
        return None
    archive, _, member = rel_path.partition(NPZ_SEP)
    split, _, index = member.rpartition("/")
    if not split or not index.isdigit():
        return None
    return archive, split, int(index)


@lru_cache(maxsize=8)
def _open_npz(path: str, mtime_ns: int):
    from hemaflow.readers.npz import NpzArchive
    return NpzArchive(Path(path))


def open_npz(path: Path):
    """The archive opened once per process (and re-opened if the file changes)."""
    return _open_npz(str(path), path.stat().st_mtime_ns)


def to_bgr8(img: np.ndarray, rgb: bool = False) -> np.ndarray:
    """Any decoded image (gray, BGR(A)/RGB, 8 or 16 bit) as a 3-channel uint8 BGR image."""
    if img.dtype != np.uint8:
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(float(img.max()), 1.0)) if img.dtype.kind == "f" \
            else (img >> (8 * (img.dtype.itemsize - 1))).astype(np.uint8)
    if img.ndim == 2 or img.shape[2] == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_RGBA2BGR if rgb else cv2.COLOR_BGRA2BGR)
    return cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if rgb else np.ascontiguousarray(img)


# Decoding guard: a 30000x30000 PNG is a few KB on disk and 2.7 GB decoded. The header is
# read first (PIL reads only the header on open) and anything above these limits is never
# decoded. ingest takes its limits from params (ingest.max_pixels / max_file_mb).
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_FILE_BYTES = 256 * 2**20


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header without decoding pixels; None if PIL cannot identify it.

    PIL refuses to even open an image above twice its MAX_IMAGE_PIXELS (a decompression bomb);
    that refusal is itself the answer "too large", reported as an infinite size.
    """
    import io
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning: we judge the size ourselves
            with Image.open(io.BytesIO(data)) as im:
                return int(im.size[0]), int(im.size[1])
    except Image.DecompressionBombError:
        return (BOMB, BOMB)
    except Exception:  # PIL raises many types for unknown or damaged headers
        return None


BOMB = 1 << 31  # header_size's answer for an image PIL calls a decompression bomb


def oversize(data: bytes, max_pixels: int | None, max_bytes: int | None) -> str | None:
    """Why an encoded image must not be decoded (too many bytes or header pixels), or None."""
    if max_bytes is not None and len(data) > max_bytes:
        return f"the file has {len(data) / 2**20:.1f} MB, above the limit of {max_bytes / 2**20:.0f} MB"
    if max_pixels is not None:
        size = header_size(data)
        if size == (BOMB, BOMB):
            return f"the header declares over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} M pixels (a decompression bomb); not decoded"
        if size is not None and size[0] * size[1] > max_pixels:
            return (f"the header says {size[0]}x{size[1]} = {size[0] * size[1] / 1e6:.0f} M pixels, above the "
                    f"limit of {max_pixels / 1e6:.0f} M; not decoded")
    return None


def read_image(raw_dir: Path, rel_path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               max_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> np.ndarray | None:
    """BGR uint8 image for a manifest path (file or npz row); None if it cannot be decoded.

    None means the content is bad (or over the decoding guard's limits). A failure to read
    the file at all (permission denied, I/O error on a mount) is not a content problem: it
    raises SourceReadError naming the file.
    """
    from hemaflow.errors import SourceReadError

    raw_dir = Path(raw_dir)
    obj = parse_box_path(rel_path)
    if obj is not None:  # one annotated object of an image file
        img = read_image(raw_dir, obj[0], max_pixels, max_bytes)
        return None if img is None else crop_box(img, obj[1])
    npz = parse_npz_path(rel_path)
    try:
        if npz is not None:
            archive, split, index = npz
            arc = open_npz(raw_dir / archive)
            key = f"{split}_images"
            if key not in arc.headers or not 0 <= index < arc.shape(key)[0]:
                return None
            return to_bgr8(np.asarray(arc.row(key, index)), rgb=True)
        path = raw_dir / rel_path
        if not path.resolve().is_relative_to(raw_dir.resolve()):
            return None  # never read outside the data folder (ingest flags such rows)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SourceReadError(path, exc) from None
        if not data or oversize(data, max_pixels, max_bytes):
            return None
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        return None if img is None else to_bgr8(img)
    except SourceReadError:
        raise
    except (OSError, ValueError, KeyError, cv2.error):
        return None


def gray8(img: np.ndarray, rgb: bool = False) -> np.ndarray:
    """Single-channel uint8 view of a decoded image, for the perceptual hash."""
    if img.dtype != np.uint8 or img.ndim == 3 and img.shape[2] not in (1, 3):
        img = to_bgr8(img, rgb=rgb)
        rgb = False
    if img.ndim == 2:
        return img
    if img.shape[2] == 1:
        return img[:, :, 0]
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY if rgb else cv2.COLOR_BGR2GRAY)


def phash_hex(gray: np.ndarray) -> str:
    """imagehash.phash of a grayscale image as 16 lowercase hex chars (its str() form).

    phash shrinks the image to 32x32 with Lanczos, which on a full 360x363 cell costs more
    than decoding the JPEG. Shrinking first with PIL's reducing_gap=3 (a box reduce that
    keeps >= 3x the target, then the same Lanczos) is ~5x cheaper. On PBC the result
    equals the plain imagehash.phash for ~94% of images and is never more than 2 of 64
    bits away, far inside any near-duplicate threshold.
    """
    pil = Image.fromarray(gray)
    if min(pil.size) > PHASH_SIDE * PHASH_REDUCING_GAP:
        pil = pil.resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS, reducing_gap=PHASH_REDUCING_GAP)
    bits = imagehash.phash(pil).hash
    return np.packbits(bits.ravel()).tobytes().hex()


def describe_pixels(img: np.ndarray, rgb: bool = False) -> dict:
    """Facts of an already-decoded image (npz rows): hash of its bytes, size, channels, phash."""
    img = np.ascontiguousarray(img)
    return {"sha256": hashlib.sha256(img.tobytes()).hexdigest(), "width": int(img.shape[1]),
            "height": int(img.shape[0]), "channels": 1 if img.ndim == 2 else int(img.shape[2]),
            "phash": phash_hex(gray8(img, rgb=rgb)), "error": None}


def _signature(data: bytes) -> str:
    return repr(data[:8]) if data else "nothing"


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's start-of-frame header; None if there is none."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        if marker in _SOF:
            if i + 10 > n:
                return None
            return (data[i + 7] << 8 | data[i + 8], data[i + 5] << 8 | data[i + 6], data[i + 9])
        i += 2 + (data[i + 2] << 8 | data[i + 3])
    return None


def _decode(buf: np.ndarray, flags: int) -> np.ndarray | None:
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error:
        return None
    return None if img is None or img.size == 0 else img


def describe_bytes(data: bytes, suffix: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                   max_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> dict:
    """Hash and decode one file's bytes (read once): sha256, size, channels, phash, or the fault.

    A JPEG is decoded straight to grayscale at full size: libjpeg still entropy-decodes
    every block (so damage is found as in a colour decode) but skips chroma upsampling and
    colour conversion, ~40% cheaper, and the phash needs the grayscale anyway. Its channel
    count comes from the frame header. Other formats are decoded as stored.
    """
    info: dict = {"sha256": hashlib.sha256(data).hexdigest(), "phash": None, "width": None, "height": None,
                  "channels": None, "error": None}
    if not data:
        info["error"] = "empty_file: the file has zero bytes"
        return info
    too_big = oversize(data, max_pixels, max_bytes)
    if too_big:
        info["error"] = f"image_too_large: {too_big}"
        return info
    is_jpeg = data[:3] == b"\xff\xd8\xff"
    if is_jpeg and suffix in JPEG_SUFFIXES and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        info["error"] = "truncated_jpeg: no end-of-image marker, the file was cut short"
        return info
    buf = np.frombuffer(data, np.uint8)
    frame = jpeg_frame(data) if is_jpeg else None
    if frame is not None:
        gray = _decode(buf, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
        channels = 1 if frame[2] == 1 else 3  # OpenCV decodes YCbCr, RGB, CMYK and YCCK JPEGs to BGR
    else:
        img = _decode(buf, cv2.IMREAD_UNCHANGED)
        gray = None if img is None else gray8(img)
        channels = None if img is None else (1 if img.ndim == 2 else int(img.shape[2]))
    if gray is None:
        info["error"] = f"unreadable_image: OpenCV cannot decode it (content starts with {_signature(data)})"
        return info
    info["height"], info["width"] = int(gray.shape[0]), int(gray.shape[1])
    info["channels"] = channels
    info["phash"] = phash_hex(gray)
    return info
