"""Fetching Microsoft's public PetImages archive: resumable, size-checked, renamed into place when whole.

The archive is used where it lands: `asirra.data.scan` reads its members in place, so there is no
unpacking step and no 25,000 loose files to keep track of.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from tqdm import tqdm

from asirra.errors import UserError

PETIMAGES_URL = (
    "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/"
    "kagglecatsanddogs_5340.zip"
)
DEFAULT_DEST = Path("data")
CHUNK_BYTES = 1 << 20


class DownloadError(UserError):
    """A download that did not produce the expected file; the message says what to do next."""


def archive_path(url: str = PETIMAGES_URL, dest: str | os.PathLike = DEFAULT_DEST) -> Path:
    """Where `download(url, dest)` puts the file: dest / the URL's file name."""
    name = PurePosixPath(urlsplit(url).path).name
    if not name:
        raise DownloadError(f"cannot tell a file name from the URL {url!r}")
    return Path(dest) / name


def download(
    url: str = PETIMAGES_URL,
    dest: str | os.PathLike = DEFAULT_DEST,
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Fetch `url` into `dest` and return the file's path; a finished file is not fetched again.

    Bytes go to `<name>.part` first, which a later call resumes with an HTTP Range request, and
    the file gets its final name only once its size (and `expected_size` / `sha256`, if given) match.
    """
    final = archive_path(url, dest)
    if final.exists():
        _verify(final, expected_size, sha256, remove_on_mismatch=False)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    _fetch(url, part, progress=progress, timeout=timeout)
    _verify(part, expected_size, sha256, remove_on_mismatch=True)
    os.replace(part, final)
    return final


def _fetch(url: str, part: Path, *, progress: bool, timeout: float) -> None:
    """Append the missing bytes of `url` to `part`; DownloadError if they did not all arrive."""
    import httpx

    offset = part.stat().st_size if part.exists() else 0
    # identity: the byte counts below must be the bytes on the wire, as Content-Length counts them
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=timeout) as response:
            if response.status_code == 416 and offset:
                _check_already_complete(response, part, offset)
                return
            if response.status_code >= 400:
                raise DownloadError(f"HTTP {response.status_code} from {url}")
            if response.status_code != 206:
                offset = 0  # the server ignored the Range request: start again from the first byte
            total = _expected_total(response, offset)
            with part.open("ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.name.removesuffix(".part"), file=sys.stderr, disable=not progress,
            ) as bar:
                for chunk in response.iter_raw():  # as the bytes arrive: an interruption loses none
                    out.write(chunk)
                    bar.update(len(chunk))
    except httpx.HTTPError as exc:
        raise DownloadError(f"download interrupted ({exc}); run the same command again to resume") from None
    got = part.stat().st_size
    if total is not None and got != total:
        raise DownloadError(f"incomplete download: {got:,} of {total:,} bytes; run the same command again to resume")


def _expected_total(response, offset: int) -> int | None:
    """The whole file's size from Content-Range (206) or Content-Length (200); None if not sent."""
    if response.status_code == 206:
        unit_range, _, total = response.headers.get("content-range", "").partition("/")
        start = unit_range.removeprefix("bytes ").partition("-")[0]
        if start != str(offset):
            raise DownloadError(f"server resumed at byte {start or '?'} instead of {offset}; delete the .part file and run again")
        return int(total) if total.isdigit() else None
    length = response.headers.get("content-length", "")
    return int(length) if length.isdigit() else None


def _check_already_complete(response, part: Path, offset: int) -> None:
    """416 to a Range request: fine if the .part already holds the whole file, else it is bad."""
    total = response.headers.get("content-range", "").rpartition("/")[2]
    if total != str(offset):
        part.unlink()
        raise DownloadError(f"partial file {part} did not match the remote file; removed it, run the same command again")


def _verify(path: Path, expected_size: int | None, sha256: str | None, *, remove_on_mismatch: bool) -> None:
    problem = _mismatch(path, expected_size, sha256)
    if problem is None:
        return
    if remove_on_mismatch:
        path.unlink()
        raise DownloadError(f"{problem}; removed the download")
    raise DownloadError(f"{path} exists but {problem}; delete it and run again")


def _mismatch(path: Path, expected_size: int | None, sha256: str | None) -> str | None:
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"size mismatch: got {size:,} bytes, expected {expected_size:,}"
    if sha256 is not None and _sha256(path) != sha256.lower():
        return "sha256 mismatch"
    # An HTML error page served with status 200 is the classic way a download "succeeds".
    if path.name.removesuffix(".part").lower().endswith(".zip") and not zipfile.is_zipfile(path):
        return "the file is not a zip archive"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
