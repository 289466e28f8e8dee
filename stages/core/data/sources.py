"""Sources: read ``data.source`` into a DataFrame.

``sklearn:<name>``, a local CSV, TSV, Parquet or JSON Lines file, an ``http(s)://`` URL
(downloaded into a cache and checked against ``data.sha256``) or a folder of images in class
subfolders. For a text dataset (``data.text_column``) bytes that are not UTF-8 are read as
U+FFFD, so that the text gate quarantines their rows instead of the whole file failing. Every
problem a user can fix is one line naming the file, URL, line or param."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from stages.core.common.data_params import DataParams
from stages.core.common.digests import file_sha256
from stages.core.common.errors import DataError, one_line
from stages.core.common.io import write_atomic
from stages.core.common.layout import SOURCE_CACHE
from stages.core.data.text import clean_code_points

SKLEARN_PREFIX = "sklearn:"


URL_SCHEMES = ("http://", "https://")


TABLE_SUFFIXES = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}


# A download is tried 1 + DOWNLOAD_RETRIES times (connection errors, timeouts, HTTP 429/5xx),
# waiting 0 s, then 1 s, 2 s ... between tries.
DOWNLOAD_RETRIES = 2


DOWNLOAD_BACKOFF = 0.5


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def load_source(params: DataParams, root: Path | str = ".") -> pd.DataFrame:
    """Load ``params.source``: ``sklearn:<name>``, a CSV/Parquet file or image folder (relative
    to ``root``), or an http(s) URL downloaded into ``root/.cache/sources`` and checked
    against ``params.sha256``."""
    source = params.source
    if source.startswith(SKLEARN_PREFIX):
        return load_sklearn(source.removeprefix(SKLEARN_PREFIX))
    if source.startswith(URL_SCHEMES):
        if params.sha256 is None:  # params.py requires it; callers may build params by hand
            raise DataError(f"data.sha256: required for the URL {source}")
        kind = table_kind(urlparse(source).path, source)
        path = fetch(source, params.sha256, Path(root) / SOURCE_CACHE, params.download_timeout)
        return read_table(path, source, kind, text=params.text_column is not None)
    scheme = _SCHEME.match(source)
    if scheme:
        raise DataError(
            f"data.source: unknown scheme '{scheme.group(1)}:' in '{source}'; use "
            "sklearn:<name>, a path under data/source/, or an http(s):// URL with data.sha256"
        )
    path = Path(root) / source
    if path.is_dir():
        if params.text_column is not None:
            raise DataError(
                f"data.text_column: {source} is a folder; a text dataset is one CSV, TSV, "
                "Parquet or JSON Lines file"
            )
        if params.sha256 is not None:
            raise DataError(f"data.sha256: checks a file or URL, not the folder {source}")
        return load_image_folder(path, params, source)
    if not path.exists():
        raise DataError(
            f"data.source: file not found: {source}; put the file there or fix data.source"
        )
    kind = table_kind(path.name, source)
    if params.sha256 is not None:
        actual = file_sha256(path)
        if actual != params.sha256:
            raise DataError(_mismatch(source, params.sha256, actual))
    return read_table(path, source, kind, text=params.text_column is not None)


def load_sklearn(name: str) -> pd.DataFrame:
    """One of scikit-learn's bundled datasets, with its target column named ``label``."""
    from sklearn import datasets

    loaders = {
        "digits": datasets.load_digits,
        "iris": datasets.load_iris,
        "wine": datasets.load_wine,
    }
    if name not in loaders:
        raise DataError(f"data.source: unknown sklearn dataset '{name}' (known: {sorted(loaders)})")
    return loaders[name](as_frame=True).frame.rename(columns={"target": "label"})


def table_kind(name: str, source: str) -> str:
    """``csv``, ``tsv``, ``parquet`` or ``jsonl``, from the file name's suffix."""
    kind = TABLE_SUFFIXES.get(Path(name).suffix.lower())
    if kind is None:
        raise DataError(
            f"data.source: '{source}': expected a .csv or .parquet file, a .tsv or .jsonl file, "
            "or a folder of images"
        )
    return kind


def read_table(path: Path, source: str, kind: str, text: bool = False) -> pd.DataFrame:
    """Read a CSV or TSV (UTF-8), Parquet or JSON Lines file; ``source`` names it in errors.

    ``text`` (a text dataset): bytes that are not UTF-8 become U+FFFD instead of failing the
    file, and only an empty field is missing (a review reading "NA" stays text)."""
    if kind == "jsonl":
        return read_jsonl(path, source, text)
    if kind == "parquet":
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many types; the user needs the file and cause
            raise DataError(
                f"{source}: not a readable Parquet file ({one_line(exc)}); "
                "re-export it or point data.source at another file"
            ) from None
    options: dict = {"sep": "\t"} if kind == "tsv" else {}
    if text:
        options |= {"encoding_errors": "replace", "keep_default_na": False, "na_values": [""]}
    try:
        return pd.read_csv(path, encoding="utf-8", **options)
    except UnicodeDecodeError:
        raise DataError(_not_utf8(path, source)) from None
    except pd.errors.EmptyDataError:
        raise DataError(
            f"{source}: the file is empty (no header, no rows); "
            "write a header line and rows, or point data.source at another file"
        ) from None
    except pd.errors.ParserError as exc:
        ragged = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if ragged:
            expected, line, saw = ragged.groups()
            raise DataError(
                f"{source}: line {line} has {saw} fields, the header has {expected}; fix that "
                "line (a stray separator, or text with commas that needs quotes)"
            ) from None
        raise DataError(f"{source}: cannot parse the CSV ({one_line(exc)})") from None
    except OSError as exc:
        raise DataError(f"{source}: cannot read the file ({exc.strerror or exc})") from None


def read_jsonl(path: Path, source: str, text: bool = False) -> pd.DataFrame:
    """JSON Lines: one JSON object per line (blank lines skipped), one row per object, the
    columns in order of first appearance. ``text`` as in ``read_table``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{source}: cannot read the file ({exc.strerror or exc})") from None
    try:
        # utf-8-sig: a byte order mark at the start (Windows editors write one) is not JSON.
        content = data.decode("utf-8-sig", errors="replace" if text else "strict")
    except UnicodeDecodeError:
        raise DataError(_not_utf8(path, source)) from None
    records = []
    # split("\n"), not splitlines(): U+2028 and friends inside a JSON string are not line ends.
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{source}: line {number} is not valid JSON ({exc.msg} at column {exc.colno}); "
                "write one JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{source}: line {number} is a JSON {type(record).__name__}, not an object; "
                "write one JSON object per line"
            )
        # A lone surrogate ("\ud800" escaped) is valid JSON but no text Parquet can hold.
        records.append(
            {k: clean_code_points(v) if isinstance(v, str) else v for k, v in record.items()}
        )
    if not records:
        raise DataError(
            f"{source}: the file is empty (no JSON objects); "
            "write one JSON object per line, or point data.source at another file"
        )
    return pd.DataFrame.from_records(records)


def _not_utf8(path: Path, source: str) -> str:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return (
            f"{source}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
            "save the file as UTF-8"
        )
    return f"{source}: not UTF-8 text; save the file as UTF-8"


def _mismatch(source: str, expected: str, actual: str) -> str:
    return (
        f"{source}: sha256 mismatch: data.sha256 is {expected}, the file has {actual}; "
        "the file changed or data.sha256 is wrong: check the file, then update data.sha256"
    )


def ca_bundle() -> str | bool:
    """The CA bundle HTTPS is verified against: ``REQUESTS_CA_BUNDLE`` or ``SSL_CERT_FILE``
    when set (a corporate proxy's CA), else the bundled certifi roots."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or True


def fetch(url: str, sha256: str, cache: Path, timeout: float) -> Path:
    """Download ``url`` into ``cache`` (once) and return the file, verified against ``sha256``.

    A cached file whose checksum matches is used without touching the network. ``timeout``
    bounds each connect and each read; failed tries are retried ``DOWNLOAD_RETRIES`` times.
    """
    target = cache / f"{sha256}{Path(urlparse(url).path).suffix.lower()}"
    if target.is_file() and file_sha256(target) == sha256:
        return target
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(
        total=DOWNLOAD_RETRIES,
        backoff_factor=DOWNLOAD_BACKOFF,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=frozenset({"GET"}),
    )
    attempts = DOWNLOAD_RETRIES + 1
    host = urlparse(url).netloc
    with _quiet_retries(), requests.Session() as session:
        adapter = HTTPAdapter(max_retries=retry)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        try:
            with session.get(url, stream=True, timeout=timeout, verify=ca_bundle()) as response:
                if response.status_code >= 400:
                    raise DataError(
                        f"{url}: HTTP {response.status_code} {response.reason}; "
                        "check the URL in data.source"
                    )

                def write(tmp: Path) -> None:
                    digest = hashlib.sha256()
                    with open(tmp, "wb") as handle:
                        for chunk in response.iter_content(1 << 20):
                            digest.update(chunk)
                            handle.write(chunk)
                    if digest.hexdigest() != sha256:
                        raise DataError(_mismatch(url, sha256, digest.hexdigest()))

                return write_atomic(target, write)
        except requests.exceptions.SSLError as exc:
            raise DataError(
                f"{url}: the server's TLS certificate is not trusted ({_ssl_reason(exc)}); "
                "behind a proxy with its own CA, set REQUESTS_CA_BUNDLE or SSL_CERT_FILE to it"
            ) from None
        except requests.exceptions.RetryError:
            raise DataError(
                f"{url}: the server kept failing (HTTP 429/5xx) over {attempts} tries; "
                "try again later or check data.source"
            ) from None
        except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as exc:
            if _timed_out(exc):
                raise DataError(
                    f"{url}: no answer from {host} within {timeout:g} s ({attempts} tries); "
                    "check the URL and the network, or raise data.download_timeout"
                ) from None
            raise DataError(
                f"{url}: cannot connect to {host} ({_socket_reason(exc)}, {attempts} tries); "
                "check the URL and the network"
            ) from None


@contextmanager
def _quiet_retries() -> Iterator[None]:
    """urllib3 logs each retry as a warning, which would print to stderr without logging
    configured: a failed download must stay one line."""
    logger = logging.getLogger("urllib3.connectionpool")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _timed_out(exc: BaseException) -> bool:
    import requests

    return isinstance(exc, requests.exceptions.Timeout) or "timed out" in str(exc).lower()


def _socket_reason(exc: BaseException) -> str:
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    return found.group(1).strip() if found else type(exc).__name__


def _ssl_reason(exc: BaseException) -> str:
    found = re.search(r"certificate verify failed: ([^(')\"]+)", str(exc))
    return found.group(1).strip() if found else "certificate verify failed"


def image_feature_names(shape: list[int]) -> list[str]:
    """Pixel columns in C, H, W order: ``pixel_<h>_<w>`` for ``[H, W]`` (as in sklearn's
    digits), ``pixel_<c>_<h>_<w>`` for ``[C, H, W]``."""
    if len(shape) == 2:
        return [f"pixel_{h}_{w}" for h in range(shape[0]) for w in range(shape[1])]
    channels, height, width = shape
    return [
        f"pixel_{c}_{h}_{w}" for c in range(channels) for h in range(height) for w in range(width)
    ]


def _image_extensions() -> set[str]:
    from PIL import Image

    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def load_image_folder(folder: Path, params: DataParams, source: str) -> pd.DataFrame:
    """A folder of images in class subfolders (``<class>/<image>``, or
    ``<domain>/<class>/<image>`` when ``data.domain_column`` is set) as one row per image.

    Each image is converted to grey (``L``) or RGB (``data.image_mode``), resized to
    ``data.image_shape`` (bilinear) and flattened in C, H, W order; values stay 0-255.
    16-bit grey images (Pillow's ``I;16`` modes, and ``I`` whose values fit 0-65535) are
    scaled by their full range into that 0-255 scale (x * 255 / 65535, kept as floats), not
    clipped; float (``F``) and other wide images, whose range is unknown, stop with one line
    naming the file and its mode. The label column holds the class folder's name; files are
    read in sorted path order.
    """
    from PIL import Image

    if params.image_shape is None:
        raise DataError(
            f"data.image_shape: required to read the image folder {source} "
            "(e.g. [28, 28] for grey, [3, 32, 32] with data.image_mode: rgb)"
        )
    extensions = _image_extensions()
    depth = 3 if params.domain_column else 2  # path parts below the folder
    layout = "<domain>/<class>/<image>" if params.domain_column else "<class>/<image>"
    files = sorted(
        rel
        for rel in (p.relative_to(folder) for p in folder.rglob("*"))
        if rel.suffix.lower() in extensions and not any(p.startswith(".") for p in rel.parts)
    )
    if not files:
        raise DataError(
            f"{source}: no images found; expected {source}/{layout} "
            "(.png, .jpg, .bmp, .tif, ... files)"
        )
    misplaced = [rel for rel in files if len(rel.parts) != depth]
    if misplaced:
        raise DataError(
            f"{source}/{misplaced[0].as_posix()}: not in the {layout} layout "
            f"({len(misplaced)} images); move them into class folders"
        )
    height, width = params.image_shape[-2:]
    mode = "RGB" if params.image_mode == "rgb" else "L"
    names = image_feature_names(params.image_shape)
    pixels = np.empty((len(files), len(names)), dtype=np.float64)
    for row, rel in enumerate(files):
        try:
            with Image.open(folder / rel) as image:
                array = _pixels(image, mode, (width, height), f"{source}/{rel.as_posix()}")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(
                f"{source}/{rel.as_posix()}: Pillow cannot read this image "
                f"({one_line(exc)}); replace or remove it"
            ) from None
        pixels[row] = (array.transpose(2, 0, 1) if mode == "RGB" else array).reshape(-1)
    frame = pd.DataFrame(pixels, columns=names)
    frame[params.label] = [rel.parts[-2] for rel in files]
    if params.domain_column:
        frame[params.domain_column] = [rel.parts[0] for rel in files]
    return frame


# Pillow's modes of 8 bits per channel: convert() maps each of them faithfully to L or RGB.
EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}


# 16-bit grey: convert("L") clips these at 255 (a 0..4000 gradient became 0, 255, 255, ...).
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


SIXTEEN_BIT_MAX = 65535


def _pixels(image, mode: str, size: tuple[int, int], name: str) -> np.ndarray:
    """One image as an (H, W) or (H, W, 3) float array on the 0-255 scale, resized to ``size``."""
    from PIL import Image

    if image.mode in EIGHT_BIT_MODES:
        resized = image.convert(mode).resize(size, Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.float64)
    values = np.asarray(image, dtype=np.float64) if image.mode != "F" else None
    wide = image.mode in SIXTEEN_BIT_MODES or (
        image.mode == "I" and values.min() >= 0 and values.max() <= SIXTEEN_BIT_MAX
    )
    if not wide:
        found = "" if values is None else f" with values {values.min():g} to {values.max():g}"
        raise DataError(
            f"{name}: Pillow reads this image as mode {image.mode}{found}, which has no known "
            "range to scale to 0-255; save it as 8- or 16-bit grey or RGB (e.g. PNG)"
        )
    # Scaled in float (mode F) and resized there: rounding to 8 bits first would keep only
    # 256 of the 65536 levels, and a faint 16-bit image would collapse to a few grey values.
    scaled = Image.fromarray((values * (255 / SIXTEEN_BIT_MAX)).astype(np.float32))
    grey = np.asarray(scaled.resize(size, Image.Resampling.BILINEAR), dtype=np.float64)
    return np.repeat(grey[:, :, None], 3, axis=2) if mode == "RGB" else grey
