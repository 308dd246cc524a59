"""Uploaded calibration / evaluation text: validated, size-limited, never a traceback.

Pure functions (no Streamlit): the page hands over the upload's name and bytes and shows
:class:`UploadError`'s message when something is wrong.  Formats (the engine's
:mod:`topθ_core.datafiles`): ``.txt`` (documents separated by blank lines), ``.jsonl``
(``{"text": ...}`` per line), ``.csv`` / ``.parquet`` (a ``text`` column).
"""

from __future__ import annotations

from dataclasses import dataclass

from topθ_core.datafiles import SUPPORTED, DataFileError, read_texts_from_bytes

MAX_UPLOAD_MB = 20
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024 * 1024
MAX_DOCUMENTS = 5000
EXTENSIONS = tuple(e.lstrip(".") for e in SUPPORTED)


class UploadError(ValueError):
    """An upload that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class ParsedUpload:
    name: str
    texts: tuple[str, ...]
    size: int

    @property
    def characters(self) -> int:
        return sum(len(t) for t in self.texts)

    def describe(self) -> str:
        return f"{self.name}: {len(self.texts)} documents, {self.characters:,} characters"


def parse_upload(name: str, data: bytes, max_bytes: int = MAX_UPLOAD_BYTES, column: str = "text") -> ParsedUpload:
    """Documents of an uploaded file.  Raises :class:`UploadError` with a one-line reason."""
    size = len(data)
    if size == 0:
        raise UploadError(f"{name}: the file is empty")
    if size > max_bytes:
        raise UploadError(f"{name}: {size / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB limit; "
                          "upload a smaller sample (a few hundred documents are plenty for calibration)")
    try:
        texts = read_texts_from_bytes(data, name, column=column)
    except DataFileError as e:
        raise UploadError(str(e)) from None
    except Exception as e:  # a parser bug must still not reach the page as a traceback
        raise UploadError(f"{name}: could not be read ({type(e).__name__}: {e})") from None
    if len(texts) > MAX_DOCUMENTS:
        texts = texts[:MAX_DOCUMENTS]
    return ParsedUpload(name=name, texts=tuple(texts), size=size)
