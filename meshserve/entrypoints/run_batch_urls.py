"""`run-batch -i URL` and `-o URL` (vLLM's run-batch): the input downloaded by GET, the output uploaded by PUT.

vLLM (vllm/entrypoints/openai/run_batch.py) GETs the input once the engine is up (stream_file_lines,
raise_for_status) and writes the output to a temporary file that upload_data PUTs at the end: five tries five
seconds apart, any status but 200 a failure, the temporary file deleted either way; the output URL is not looked
at before the batch runs. Here the input is downloaded, and both URLs' form checked, before the model loads. The
output URL is not probed: a test PUT would create the object, and a presigned URL signs the PUT method only, so
HEAD or OPTIONS proves nothing. Any 2xx answers the PUT (201 and 204 are PUT's too). Connection errors, 408, 429
and 5xx are tried again as vLLM does; another 4xx (an expired signature's 403) fails at once. A failed upload
keeps the spooled output lines and names their file, so a long batch's results are not lost.

URLs in messages lose their query and user info: a presigned URL's signature is a credential.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator

import httpx

from meshserve.errors import InvalidArgumentError, MeshserveError

logger = logging.getLogger(__name__)

UPLOAD_TRIES = 5
UPLOAD_RETRY_DELAY_S = 5.0
_TIMEOUT = httpx.Timeout(60.0, connect=30.0)  # each socket operation; a large upload streams in chunks
_CHUNK = 1 << 20
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_RETRIED_STATUS = {408, 429}


def is_url(path: str | None) -> bool:
    """path has the form scheme://...: a URL (http or https, else refused), not a local file."""
    return bool(path) and _SCHEME.match(path) is not None


def shown(url: str) -> str:
    """url fit for a message or a log line: no user info, no query (a presigned URL's signature)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or not parsed.host:
        return url.split("?", 1)[0]
    text = str(parsed.copy_with(userinfo=b"", query=None, fragment=None))
    return text + ("?..." if parsed.query else "")


def check_url(url: str, flag: str, param: str) -> None:
    """url is an http(s) URL with a host; else a one-line error naming flag."""
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme not in ("http", "https"):
        raise InvalidArgumentError(f"{flag} {shown(url)}: {scheme}:// is not supported (a local path, '-', or "
                                   "an http:// or https:// URL)", param=param)
    try:
        host = httpx.URL(url).host
    except httpx.InvalidURL as e:
        raise InvalidArgumentError(f"{flag} {shown(url)}: not a valid URL ({e})", param=param) from None
    if not host:
        raise InvalidArgumentError(f"{flag} {shown(url)}: the URL names no host", param=param)


def _status(response: httpx.Response) -> str:
    return f"HTTP {response.status_code} {response.reason_phrase}".rstrip()


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def download(url: str, flag: str, param: str) -> bytes:
    """The body of GET url (redirects followed); a one-line error for a refused URL, a failed connection or a
    status of 400 and up."""
    check_url(url, flag, param)
    try:
        response = httpx.get(url, follow_redirects=True, timeout=_TIMEOUT)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise InvalidArgumentError(f"{flag} {shown(url)}: cannot download it ({_one_line(e)})",
                                   param=param) from None
    if response.status_code >= 400:
        raise InvalidArgumentError(f"{flag} {shown(url)}: the download failed with {_status(response)}",
                                   param=param)
    return response.content


def new_spool(tmp_dir: str | None) -> str:
    """An empty local file for output lines bound for a URL (in tmp_dir, else the system's temporary folder)."""
    if tmp_dir:
        os.makedirs(tmp_dir, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="meshserve-batch-", suffix=".jsonl", dir=tmp_dir or None)
    os.close(fd)
    return path


def _chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def upload(path: str, url: str, flag: str) -> None:
    """PUT the file at path to url, tried again on connection errors, 408, 429 and 5xx (UPLOAD_TRIES in all,
    UPLOAD_RETRY_DELAY_S apart); path is removed once uploaded, kept (and named in the error) otherwise."""
    size = os.path.getsize(path)
    why = ""
    for attempt in range(1, UPLOAD_TRIES + 1):
        try:
            # Content-Length, not chunked: object stores (S3 presigned PUTs among them) refuse chunked uploads
            response = httpx.put(url, content=_chunks(path), headers={"content-length": str(size)},
                                 timeout=_TIMEOUT)
        except httpx.HTTPError as e:
            why, again = _one_line(e), True
        else:
            if 200 <= response.status_code < 300:
                os.remove(path)
                return
            why = _status(response)
            again = response.status_code >= 500 or response.status_code in _RETRIED_STATUS
        if not again or attempt == UPLOAD_TRIES:
            break
        logger.warning("run-batch: uploading to %s failed (%s), try %d of %d in %.0f s", shown(url), why, attempt,
                       UPLOAD_TRIES, UPLOAD_RETRY_DELAY_S)
        time.sleep(UPLOAD_RETRY_DELAY_S)
    tries = f" after {attempt} tries" if attempt > 1 else ""
    raise MeshserveError(f"{flag} {shown(url)}: the upload failed with {why}{tries}; the output lines are kept "
                         f"in {path}")
