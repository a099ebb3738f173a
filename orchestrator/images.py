"""Images referenced by conversations: the one opener, and the rule that keeps paths inside the image root.

Every stage that touches an image file goes through here: validation checks
that a row's images are usable (`ImageChecker`), training opens them confined
(`open_confined_image`), evaluation opens them (`open_image`), preparation
reads the sizes that a model family's image-token counts depend on
(`image_token_counts`: headers only, no pixel decoded). One place
decides how a path under a local folder or an s3:// prefix becomes a file,
and which paths are refused: a path in a data file is untrusted input, so one
that is absolute, a URL, holds a control character (a NUL byte), or climbs
out with `..` (or, under a local root, leaves it through a symlink) is never
opened, whatever `data.check_images` says.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
from pathlib import Path
from typing import IO

from orchestrator import storage

IMAGE_CHECKS = ("decode", "header", "off")
"""`data.check_images`: decode every pixel, check the header and checksums, or neither (paths are confined anyway)."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def image_check_mode(check_images: str | bool) -> str:
    """`decode`, `header` or `off` (the booleans of earlier versions: true is `decode`, false is `off`)."""
    if isinstance(check_images, bool):
        return "decode" if check_images else "off"
    if check_images not in IMAGE_CHECKS:
        raise ValueError(f"data.check_images={check_images!r}: expected one of {IMAGE_CHECKS}")
    return check_images


class ImagePathError(ValueError):
    """An image path that may not be used under the image root; `reason` is the quarantine reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def relative_image_path(image: str) -> str:
    """`image` normalized (forward slashes, `.` and inner `..` folded) when it stays under a root.

    Purely lexical, no file system is touched: a path that is empty or holds
    a control character raises `ImagePathError` ("invalid_image_path"); one
    that is absolute, a URL, a drive path, or climbs out with `..`,
    "image_outside_root".
    """
    if not isinstance(image, str) or not image:
        raise ImagePathError("invalid_image_path", f"image {image!r} is not a path")
    if _CONTROL.search(image):
        raise ImagePathError("invalid_image_path", f"image {image!r} holds a control character (e.g. a NUL byte)")
    if image.startswith(("/", "\\")) or "://" in image or re.match(r"^[A-Za-z]:", image):
        raise ImagePathError("image_outside_root", f"image {image!r} is not a relative path under data.image_root")
    lexical = posixpath.normpath(image.replace("\\", "/"))
    if lexical == ".." or lexical.startswith("../"):
        raise ImagePathError("image_outside_root", f"image {image!r} escapes data.image_root")
    return lexical


def confined_path(image_root: str, image: str, folders: dict[str, str | None] | None = None) -> str:
    """Where `image` lives under `image_root`, refused (`ImagePathError`) when it would leave the root.

    The lexical rule of `relative_image_path` always; under a local root the
    path is also resolved, symlinks followed, and must stay inside the
    resolved root. Returns the resolved local path or the s3:// URI.

    `folders`: resolved folders kept by the caller between calls (a validation block's images share a few
    folders): a path without `..` or backslashes then costs one `lstat` of its file, which is resolved on
    its own only when it is a symlink, instead of resolving every folder on the way again.
    """
    lexical = relative_image_path(image)
    if storage.is_s3(image_root):
        return storage.join(image_root, lexical)
    root = _resolved_root(image_root)
    folder, name = os.path.split(image)
    if folders is not None and "\\" not in image and ".." not in image.split("/") and name not in ("", "."):
        if folder not in folders:  # its resolved path, or None when it resolves outside the root
            resolved_folder = _resolve(root, root / folder, image)
            folders[folder] = str(resolved_folder) if resolved_folder.is_relative_to(root) else None
        if folders[folder] is None:
            raise _outside_root(image, root)
        candidate = os.path.join(folders[folder], name)
        if not os.path.islink(candidate):  # a file (or nothing) in a folder inside the root: inside the root
            return candidate
        resolved = _resolve(root, Path(candidate), image)
    else:
        resolved = _resolve(root, root / image, image)
    if not resolved.is_relative_to(root):
        raise _outside_root(image, root)
    return str(resolved)


def _outside_root(image: str, root: Path) -> ImagePathError:
    return ImagePathError("image_outside_root", f"image {image!r} resolves outside data.image_root ({root})")


def _resolve(root: Path, path: Path, image: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a name too long
        raise ImagePathError("invalid_image_path", f"image {image!r} can't be resolved under {root}: {error}") from None


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

    It does not check confinement; training opens rows' images with `open_confined_image`.
    """
    from PIL import Image

    with open_image_file(image_location(image_root, path), filesystem) as handle, Image.open(handle) as image:
        return image.convert("RGB")


def open_confined_image(image_root: str | None, path: str, *, filesystem=None):
    """`open_image` after the rule of `confined_path` (lexical only without a root): raises `ImagePathError`
    for a path that leaves the root, whatever happened to the files since preparation."""
    from PIL import Image

    location = confined_path(image_root, path) if image_root else relative_image_path(path)
    with open_image_file(location, filesystem) as handle, Image.open(handle) as image:
        return image.convert("RGB")


class ImageChecker:
    """Checks image paths of rows: inside the image root (always), present and decodable (`check_images`).

    A path that is absolute, climbs out with `..` or holds a control
    character is refused without touching any file system; under a local
    root every path is also resolved (symlinks included) and must stay inside
    the resolved root, whatever `check_images` says. `header` then checks that
    the file exists and its header and checksums are sound (`PIL.verify`),
    `decode` that every pixel decodes to RGB as training will decode it. Each
    distinct path is checked once per checker. S3 roots are checked on a few
    threads (each check is a round trip). Nothing here raises: every failure
    is a (reason, message).
    """

    def __init__(self, image_root: str | None, check_images: str | bool, filesystem=None):
        self.image_root = image_root
        self.mode = image_check_mode(check_images)
        self.s3 = image_root is not None and storage.is_s3(image_root)
        self.filesystem = filesystem
        if self.s3 and filesystem is None and self.mode != "off":
            self.filesystem = storage.filesystem(image_root)[0]
        self._seen: dict[str, tuple[str, str] | None] = {}
        self._folders: dict[str, str | None] = {}  # resolved image folders (`confined_path`)

    @property
    def check_images(self) -> bool:
        """Whether files are opened at all (`header` or `decode`)."""
        return self.mode != "off"

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
        key = image if isinstance(image, str) else repr(image)
        if key not in self._seen:
            self._seen[key] = self._check(image)
        return self._seen[key]

    def _check(self, image: str) -> tuple[str, str] | None:
        try:
            relative_image_path(image)
            if self.image_root is None:
                if self.check_images:
                    return ("no_image_root", f"image {image!r} given but data.image_root is not set")
                return None
            location = confined_path(self.image_root, image, self._folders)
            if not self.check_images:
                return None
            missing = self._missing_s3(image, location) if self.s3 else self._missing_local(image, location)
            return missing or _decode_problem(
                image, lambda: open_image_file(location, self.filesystem), decode=self.mode == "decode"
            )
        except ImagePathError as error:
            return (error.reason, str(error))
        except Exception as error:  # noqa: BLE001 - one odd path must not end the stage: the row says why
            return ("invalid_image_path", f"image {image!r} can't be checked: {type(error).__name__}: {error}")

    def _missing_local(self, image: str, location: str) -> tuple[str, str] | None:
        try:
            found = Path(location).is_file()
        except OSError as error:
            return ("missing_image", f"image {image!r} can't be read under {_resolved_root(self.image_root)}: {error}")
        if not found:
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


def _decode_problem(image: str, opener, decode: bool = True) -> tuple[str, str] | None:
    """(corrupt_image, message) when the bytes `opener()` yields are not an image PIL can read.

    `decode`: every pixel is decoded and converted to RGB, as training does (a PNG with sound checksums
    and a broken data stream passes `verify()` but not this); else only `verify()` (header and checksums).
    """
    from PIL import Image

    try:
        with opener() as handle, Image.open(handle) as img:
            if decode:
                img.convert("RGB")
            else:
                img.verify()
    except Exception as error:  # PIL raises a zoo of types for bad bytes
        return ("corrupt_image", f"image {image!r} can't be decoded: {type(error).__name__}: {error}")
    return None


def check_image(
    image: str, image_root: str | None, filesystem=None, check_images: str = "decode"
) -> tuple[str, str] | None:
    """(reason, message) when one image can't be used: outside the root, missing, corrupt."""
    return ImageChecker(image_root, check_images, filesystem).check(image)


def image_size(image_root: str | None, path: str, *, filesystem=None) -> tuple[int, int]:
    """(width, height) of an image from its header alone (PIL reads no pixels for `.size`), confined as
    `open_confined_image` confines; raises `ImagePathError` or the reader's error."""
    from PIL import Image

    location = confined_path(image_root, path) if image_root else relative_image_path(path)
    with open_image_file(location, filesystem) as handle, Image.open(handle) as image:
        return image.size


def image_token_counts(conversations, model_dir: str, image_root: str | None) -> list | None:
    """Per conversation, the image-token count of each of its images (`workloads.families`) from the images'
    sizes, or the row's `ConversationError` when an image can't be read; None for a family whose count is
    fixed (nothing is opened then)."""
    from workloads.conversations import ConversationError
    from workloads.families import counter_for

    counter = counter_for(model_dir)
    if counter.family.fixed_image_tokens:
        return None
    filesystem = storage.filesystem(image_root)[0] if image_root and storage.is_s3(image_root) else None
    sizes: dict[str, tuple[int, int]] = {}
    out: list = []
    for conversation in conversations:
        try:
            for path in conversation.images:
                if path not in sizes:
                    sizes[path] = image_size(image_root, path, filesystem=filesystem)
            out.append(counter.counts([sizes[path] for path in conversation.images]))
        except ImagePathError as error:
            out.append(ConversationError(error.reason, f"row {conversation.id!r}: {error}"))
        except Exception as error:  # noqa: BLE001 - missing or unreadable: the row says why
            message = f"row {conversation.id!r}: image size unreadable: {type(error).__name__}: {error}"
            out.append(ConversationError("corrupt_image", message))
    return out
