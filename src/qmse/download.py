"""Fetch a dataset's official files, and list which datasets are present and verified.

`download` fetches the files of `qmse.sources.SOURCES` from their mirrors, resumes an
interrupted transfer with an HTTP Range request, checks the published MD5 and renames the
file into place, so a kill never leaves a half file under the real name.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from qmse.data import check_name, locate, resolve_data_dir, verify
from qmse.errors import QmseError, UserError
from qmse.runs import progress
from qmse.sources import DATASETS, MEMBER_MD5, SOURCES, file_md5

RETRY_WAIT_S = 1.0  # retry k of a mirror waits k * RETRY_WAIT_S seconds first
_USER_AGENT = "qmse-data (python urllib)"


class DownloadError(QmseError, RuntimeError):
    """No mirror delivered a file with the published MD5; the message says what to do."""


def status(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """One row per dataset for `qmse data list`: name, present, verified (True/False, or
    None where no checksum is published), location, detail. An extracted CIFAR folder is
    checked member by member."""
    rows = []
    for name in DATASETS:
        try:
            location, paths = locate(name, data_dir)
        except FileNotFoundError:
            folder = resolve_data_dir(data_dir) / name
            rows.append(
                dict(
                    name=name,
                    present=False,
                    verified=False,
                    location=str(folder),
                    detail=f"run `qmse data download {name}`",
                )
            )
            continue
        files = [p / m for p in paths if p.is_dir() for m in MEMBER_MD5.get(name, {})]
        files += [p for p in paths if not p.is_dir()]
        checks = {p: p.is_file() and verify(name, p) for p in files}
        bad = [p.name for p, ok in checks.items() if ok is False]
        if bad:
            verified, detail = False, f"MD5 mismatch: {', '.join(bad)}"
        elif None in checks.values():
            verified, detail = None, "no published MD5 to check"
        else:
            verified, detail = True, f"{len(files)} file(s) match the published MD5"
        rows.append(
            dict(name=name, present=True, verified=verified, location=str(location), detail=detail)
        )
    return rows


def _receive(response: http.client.HTTPResponse, part: Path, have: int) -> None:
    """Append the response body to `part` (a 206 continuing at byte `have`), or restart it
    (a 200: the server ignored the Range). Raises IncompleteRead if the body is short."""
    if response.status == 206:
        start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        if start is None or int(start.group(1)) != have:
            part.unlink(missing_ok=True)
            raise http.client.HTTPException(
                f"Content-Range {response.headers.get('Content-Range')!r} does not continue "
                f"at byte {have}"
            )
    else:
        have = 0
    length = response.headers.get("Content-Length")
    total = have + int(length) if length is not None else None
    with (
        open(part, "ab" if have else "wb") as f,
        progress(total=total, initial=have, unit="B", unit_scale=True, desc=part.name) as bar,
    ):
        while chunk := response.read(1 << 20):
            f.write(chunk)
            bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size < total:
        raise http.client.IncompleteRead(b"", total - size)


def _fetch(
    name: str, filename: str, md5: str, dest: Path, urls: list[str], retries: int, timeout: float
) -> None:
    """Download one file into `dest` via `.<filename>.part`, trying mirrors in order."""
    part = dest.with_name(f".{filename}.part")
    if part.is_file() and file_md5(part) == md5:  # a run killed just before its rename
        os.replace(part, dest)
        return
    errors = []
    for base in urls:
        url = f"{base.rstrip('/')}/{filename}"
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(RETRY_WAIT_S * attempt)
            have = part.stat().st_size if part.exists() else 0
            headers = {"User-Agent": _USER_AGENT}
            if have:
                headers["Range"] = f"bytes={have}-"
            try:
                response = urllib.request.urlopen(
                    urllib.request.Request(url, headers=headers), timeout=timeout
                )
            except urllib.error.HTTPError as e:
                errors.append(f"{url}: HTTP {e.code} {e.reason}")
                if e.code == 416:  # our partial file is no prefix of theirs: start over
                    part.unlink(missing_ok=True)
                    continue
                if e.code < 500 and e.code != 429:
                    break  # permanent on this mirror (404, 403, ...)
                continue
            except (OSError, http.client.HTTPException) as e:  # DNS, refused, timeout, bad reply
                errors.append(f"{url}: unreachable ({getattr(e, 'reason', e)})")
                if attempt == 0:
                    break
                continue
            try:
                with response:
                    _receive(response, part, have)
            except (OSError, http.client.HTTPException) as e:  # keep the part, resume it
                errors.append(f"{url}: interrupted ({type(e).__name__}: {e})")
                continue
            got = file_md5(part)
            if got == md5:
                os.replace(part, dest)
                return
            part.unlink()
            errors.append(f"{url}: MD5 {got}, expected {md5} (corrupt transfer or wrong file)")
    raise DownloadError(
        f"could not download {filename} for {name}:\n  "
        + "\n  ".join(errors)
        + f"\nPut the official files by hand in {dest.parent}/: "
        + ", ".join(f"{f} (MD5 {m})" for f, m in SOURCES[name].files.items())
        + f", from {SOURCES[name].mirrors[0]} or another mirror; `qmse data list` checks them."
        + (
            " On Debian/Ubuntu `apt install dataset-fashion-mnist` also works."
            if name == "fashion-mnist"
            else ""
        )
    )


def download(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    mirrors: list[str] | None = None,
    retries: int = 3,
    timeout: float = 10.0,
) -> Path:
    """Fetch dataset `name`'s official files into `<data dir>/<name>/` and return that folder.

    Files already there with the right MD5 are kept. Each other file is tried on `mirrors`
    (base URLs; default the official ones) in order: written to a hidden `.part` file that
    an interrupted transfer resumes with an HTTP Range request (or restarts if the server
    ignores it), checked against the published MD5, then renamed into place atomically. A
    mirror is retried `retries` times after a failed transfer, but dropped at once when it
    cannot be reached, so with no network this fails in about `timeout` seconds per mirror
    (`timeout` also bounds each wait for data), with a DownloadError that says where to put
    the files by hand.
    """
    check_name(name)
    if retries < 0:
        raise UserError(f"retries={retries} must be >= 0")
    if not timeout > 0:
        raise UserError(f"timeout={timeout} must be > 0 seconds")
    urls = list(mirrors) if mirrors else list(SOURCES[name].mirrors)
    folder = resolve_data_dir(data_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    for filename, md5 in SOURCES[name].files.items():
        dest = folder / filename
        if dest.is_file() and verify(name, dest):
            continue
        _fetch(name, filename, md5, dest, urls, retries, timeout)
    return folder
