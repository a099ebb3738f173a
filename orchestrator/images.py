"""Images referenced by conversations: the one opener, and the rule that keeps paths inside the image root.

Every stage that touches an image file goes through here: validation checks
that a row's images are usable (`ImageChecker`), training and evaluation
open them (`open_image`). One place decides how a path under a local folder
or an s3:// prefix becomes a file, and which paths are refused: a path in a
data file is untrusted input, so one that is absolute, a URL, or climbs out
with `..` (or, under a local root, leaves it through a symlink) is never
opened.
"""

from __future__ import annotations

import functools
import posixpath
import re
from pathlib import Path
from typing import IO

from orchestrator import storage


class ImagePathError(ValueError):
    """An image path that may not be used under the image root; `reason` is the quarantine reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def relative_image_path(image: str) -> str:
    """`image` normalized (forward slashes, `.` and inner `..` folded) when it stays under a root.

    Purely lexical, no file system is touched: a path that is empty,
    absolute, a URL, a drive path, or climbs out with `..` raises
    `ImagePathError` ("image_outside_root").
    """
    if not image or image.startswith(("/", "\\")) or "://" in image or re.match(r"^[A-Za-z]:", image):
        raise ImagePathError("image_outside_root", f"image {image!r} is not a relative path under data.image_root")
    lexical = posixpath.normpath(image.replace("\\", "/"))
    if lexical == ".." or lexical.startswith("../"):
        raise ImagePathError("image_outside_root", f"image {image!r} escapes data.image_root")
    return lexical


def confined_path(image_root: str, image: str) -> str:
    """Where `image` lives under `image_root`, refused (`ImagePathError`) when it would leave the root.

    The lexical rule of `relative_image_path` always; under a local root the
    path is also resolved, symlinks followed, and must stay inside the
    resolved root. Returns the resolved local path or the s3:// URI.
    """
    lexical = relative_image_path(image)
    if storage.is_s3(image_root):
        return storage.join(image_root, lexical)
    root = _resolved_root(image_root)
    resolved = (root / image).resolve()
    if not resolved.is_relative_to(root):
        raise ImagePathError("image_outside_root", f"image {image!r} resolves outside data.image_root ({root})")
    return str(resolved)


@functools.lru_cache(maxsize=16)
def _resolved_root(image_root: str) -> Path:
    return Path(image_root).resolve()


def image_location(image_root: str | None, path: str) -> str:
    """The local path or s3:// URI of an image path from the data (an s3:// path is taken as is)."""
    if storage.is_s3(path):
        return path
    if storage.is_s3(image_root or ""):
        return storage.join(image_root, path)
    return str(Path(image_root or ".", path))


def open_image_file(location: str, filesystem=None) -> IO[bytes]:
    """A binary handle on a local path or s3:// URI (`filesystem`: an S3 filesystem to reuse)."""
    if not storage.is_s3(location):
        return open(location, "rb")
    if filesystem is None:
        filesystem, inner = storage.filesystem(location)
    else:
        inner = location[len("s3://") :].rstrip("/")
    return filesystem.open_input_file(inner)


def open_image(image_root: str | None, path: str, *, filesystem=None):
    """The image at `path` (relative to `image_root`, a local folder or s3:// prefix) as an RGB `PIL.Image`.

    For rows that passed validation; it does not re-check confinement (see
    `confined_path`).
    """
    from PIL import Image

    with open_image_file(image_location(image_root, path), filesystem) as handle, Image.open(handle) as image:
        return image.convert("RGB")


class ImageChecker:
    """Checks image paths of rows: inside the image root (always), present and decodable (`check_images`).

    A path that is absolute or climbs out with `..` is refused without
    touching any file system; with `check_images` the path is also resolved
    (symlinks included) and must stay inside the root, exist and decode. Each
    distinct path is checked once per checker. S3 roots are checked on a few
    threads (each check is a round trip).
    """

    def __init__(self, image_root: str | None, check_images: bool, filesystem=None):
        self.image_root = image_root
        self.check_images = check_images
        self.s3 = image_root is not None and storage.is_s3(image_root)
        self.filesystem = filesystem
        if self.s3 and filesystem is None:
            self.filesystem = storage.filesystem(image_root)[0]
        self._seen: dict[str, tuple[str, str] | None] = {}

    def prefetch(self, images: list[str]) -> None:
        """Check many paths at once (threads for S3); results are cached for `check`."""
        todo = [image for image in dict.fromkeys(images) if image not in self._seen]
        if not (self.s3 and self.check_images and len(todo) > 1):
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(16, len(todo)), thread_name_prefix="l2t-image-check") as pool:
            for image, result in zip(todo, pool.map(self._check, todo)):
                self._seen[image] = result

    def check(self, image: str) -> tuple[str, str] | None:
        """(reason, message) when the image can't be used, else None."""
        if image not in self._seen:
            self._seen[image] = self._check(image)
        return self._seen[image]

    def _check(self, image: str) -> tuple[str, str] | None:
        try:
            relative_image_path(image)
            if not self.check_images:
                return None
            if self.image_root is None:
                return ("no_image_root", f"image {image!r} given but data.image_root is not set")
            location = confined_path(self.image_root, image)
        except ImagePathError as error:
            return (error.reason, str(error))
        missing = self._missing_s3(image, location) if self.s3 else self._missing_local(image, location)
        return missing or _decode_problem(image, lambda: open_image_file(location, self.filesystem))

    def _missing_local(self, image: str, location: str) -> tuple[str, str] | None:
        if not Path(location).is_file():
            return ("missing_image", f"image {image!r} not found under {_resolved_root(self.image_root)}")
        return None

    def _missing_s3(self, image: str, location: str) -> tuple[str, str] | None:
        import pyarrow.fs as pafs

        try:
            if self.filesystem.get_file_info(location[len("s3://") :]).type != pafs.FileType.File:
                return ("missing_image", f"image {image!r} not found under {self.image_root}")
        except OSError as error:
            return ("missing_image", f"image {image!r} can't be reached under {self.image_root}: {error}")
        return None


def _decode_problem(image: str, opener) -> tuple[str, str] | None:
    """(corrupt_image, message) when the bytes `opener()` yields are not an image PIL can read."""
    from PIL import Image

    try:
        with opener() as handle, Image.open(handle) as img:
            img.verify()
    except Exception as error:  # PIL raises a zoo of types for bad bytes
        return ("corrupt_image", f"image {image!r} can't be decoded: {type(error).__name__}: {error}")
    return None


def check_image(image: str, image_root: str | None, filesystem=None) -> tuple[str, str] | None:
    """(reason, message) when one image can't be used: outside the root, missing, corrupt."""
    return ImageChecker(image_root, True, filesystem).check(image)
