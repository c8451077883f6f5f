"""Where bytes live: fsspec URLs for a local path, ``file://``, ``s3://`` and ``memory://``.

S3 goes through s3fs. The endpoint is ``DUMO_S3_ENDPOINT_URL`` when set; otherwise botocore resolves it
itself from the standard ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables or the AWS config file
(this module only names them in messages). Credentials come from the environment or the standard AWS
config files and are never taken as parameters, logged or written into artifacts.

The first use of an S3 bucket in a process checks the setup with one request (``check_s3``): no
credentials, an endpoint that cannot be reached or does not answer like S3, or refused credentials fail
within seconds, in one line that names the variables to set, instead of surfacing as retried I/O errors.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.errors import S3SetupError, is_transient

PROJECT_ENDPOINT_ENV = "DUMO_S3_ENDPOINT_URL"  # the project's own override, passed to s3fs as endpoint_url
# Read by botocore itself (and so by s3fs); named here only to say where an endpoint came from.
ENDPOINT_ENV_VARS = (PROJECT_ENDPOINT_ENV, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
CREDENTIAL_HINT = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or ~/.aws/credentials)"
ENDPOINT_HINT = "set DUMO_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL) to your S3 endpoint, or unset it for AWS itself"
_checked: set[tuple[str | None, str, str | None]] = set()
_check_lock = threading.Lock()


def s3_endpoint() -> str | None:
    """``DUMO_S3_ENDPOINT_URL``, or None: then botocore finds the endpoint (AWS_ENDPOINT_URL_S3,
    AWS_ENDPOINT_URL, the AWS config file, else AWS itself)."""
    return os.environ.get(PROJECT_ENDPOINT_ENV) or None


def _endpoint_words(resolved: str) -> str:
    """The endpoint a client resolved, and the variable it came from."""
    name = next((n for n in ENDPOINT_ENV_VARS if os.environ.get(n)), None)
    return f"{resolved} (from {name})" if name else f"{resolved} (no endpoint variable set)"


def check_s3(url: str) -> None:
    """Raise S3SetupError, in one line naming the variables to set, when the S3 setup for ``url`` cannot
    work. One request per bucket, endpoint and access key per process (one retry, 3 s to connect); a
    transient failure of the check itself is left to the real request, whose retries deal with it."""
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import ClientError, EndpointConnectionError
    from botocore.parsers import ResponseParserError

    bucket = url.split("://", 1)[1].split("/", 1)[0]
    endpoint = s3_endpoint()
    session = botocore.session.get_session()
    creds = session.get_credentials()
    if creds is None:
        raise S3SetupError(f"no S3 credentials found for {url}: {CREDENTIAL_HINT}")
    key = (tuple(os.environ.get(n) for n in ENDPOINT_ENV_VARS), bucket, creds.access_key)
    if key in _checked:
        return
    with _check_lock:
        if key in _checked:
            return
        config = Config(connect_timeout=3, read_timeout=20, retries={"mode": "standard", "max_attempts": 2})
        client = session.create_client("s3", endpoint_url=endpoint, config=config)
        where = _endpoint_words(client.meta.endpoint_url)
        try:
            client.list_objects_v2(Bucket=bucket, MaxKeys=1)
        except EndpointConnectionError as exc:
            raise S3SetupError(f"cannot reach the S3 endpoint {where}: {ENDPOINT_HINT}") from exc
        except ResponseParserError as exc:
            raise S3SetupError(f"the endpoint {where} does not answer like S3: {ENDPOINT_HINT}") from exc
        except ClientError as exc:
            if is_transient(exc):
                return
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("AccessDenied", "403"):  # may only lack s3:ListBucket: the real request will tell
                _checked.add(key)
                return
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
                msg = f"{where} refused the credentials for s3://{bucket} ({code}): {CREDENTIAL_HINT}"
            elif code == "NoSuchBucket":
                msg = f"no bucket {bucket!r} at {where}: create it, or check the URL and endpoint"
            elif not code or code.isdigit():  # an HTTP error without S3's error document: not an S3 server
                msg = f"the endpoint {where} does not answer like S3 (HTTP {code}): {ENDPOINT_HINT}"
            else:
                raise
            raise S3SetupError(msg) from exc
        except Exception as exc:
            if is_transient(exc):
                return
            raise
        finally:
            client.close()
        _checked.add(key)


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: auto_mkdir for local files, the endpoint for S3. No secrets. Every S3
    access of the project comes through here, so here the S3 setup is checked (once per bucket)."""
    protocol = protocol_of(url)
    if protocol == "s3":
        check_s3(url)
        opts: dict[str, Any] = {}
        endpoint = s3_endpoint()
        if endpoint:
            opts["endpoint_url"] = endpoint
        return opts
    if protocol == "file":
        return {"auto_mkdir": True}
    return {}


def protocol_of(url: str) -> str:
    """'file' for plain paths and file:// URLs, else the URL scheme ('s3', 'memory', ...)."""
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0]


def normalize(url: str) -> str:
    """A canonical URL: plain paths become absolute ``file://`` paths; no trailing slash."""
    url = str(url)
    if protocol_of(url) == "file":
        path = url[len("file://") :] if url.startswith("file://") else url
        return "file://" + os.path.abspath(os.path.expanduser(path))
    return url.rstrip("/")


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with '/', the one way paths are built in the project."""
    out = str(url).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(normalize(url), **storage_options(url))
    return fs, path


def is_local(url: str) -> bool:
    return protocol_of(url) == "file"


def local_path(url: str) -> str:
    """The OS path of a local URL; a clear error for remote ones."""
    if not is_local(url):
        raise ValueError(f"{url!r} is not a local path")
    fs, path = filesystem(url)
    assert isinstance(fs, LocalFileSystem)
    return path


def display(url: str) -> str:
    """A URL as a person would type it: the plain path of a local file, any other URL as it is."""
    return local_path(url) if is_local(url) else str(url)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object. On local disks it goes to a temporary name first, then is renamed, so a
    reader never sees half a file; object stores give that guarantee for single PUTs themselves."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def listdir(url: str) -> list[str]:
    """Names (not paths) directly under ``url``; empty when it does not exist."""
    fs, path = filesystem(url)
    try:
        entries = fs.ls(path, detail=False, refresh=True) if fs.protocol != "file" else fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(os.path.basename(str(e).rstrip("/")) for e in entries)


def remove(url: str, recursive: bool = True) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def upload_dir(local_dir: str, url: str) -> None:
    """Copy a local directory tree to ``url`` (any filesystem). fsspec's recursive put; the trailing '/' on
    the source copies its contents into ``url`` (not a folder named like it), the same on a second call."""
    fs, path = filesystem(url)
    fs.put(local_dir.rstrip("/") + "/", path, recursive=True)


def download_dir(url: str, local_dir: str) -> None:
    """Copy the tree under ``url`` into ``local_dir`` (fsspec's recursive get, contents as in upload_dir)."""
    fs, path = filesystem(url)
    os.makedirs(local_dir, exist_ok=True)
    fs.get(path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
