"""Sources: sklearn, local CSV/Parquet, http(s) URLs against real local servers, image folders."""

from __future__ import annotations

import datetime
import hashlib
import http.server
import ipaddress
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages.core.common.data_params import DataParams
from stages.core.common.errors import DataError
from stages.core.common.io import write_parquet
from stages.core.common.layout import SOURCE_CACHE
from stages.core.common.schema import DOMAIN, LABEL
from stages.core.data import sources
from stages.core.data.ingest import build_raw_dataset
from stages.core.data.sources import DOWNLOAD_RETRIES, image_feature_names, load_source

TABLE = pd.DataFrame(
    {
        "height cm": [1.5, 2.5, 3.5, 4.5],
        "größe": [10, 20, 30, 40],
        "label": ["cat", "dog", "cat", "dog"],
        "site": ["A", "A", "B", "B"],
    }
)
CSV_BYTES = TABLE.to_csv(index=False).encode()
CSV_SHA = hashlib.sha256(CSV_BYTES).hexdigest()


def _error(params: DataParams, root: Path | str = ".") -> str:
    with pytest.raises(DataError) as caught:
        load_source(params, root=root)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# --- sklearn and local files ------------------------------------------------------------


def test_sklearn_digits() -> None:
    frame = load_source(DataParams(source="sklearn:digits"))
    assert frame.shape == (1797, 65)
    assert frame.columns[0] == "pixel_0_0" and frame.columns[-1] == LABEL


def test_unknown_sklearn_dataset() -> None:
    assert "unknown sklearn dataset 'mnist'" in _error(DataParams(source="sklearn:mnist"))


@pytest.mark.parametrize("source", ["ftp://example.org/a.csv", "openml:554", "s3://b/a.csv"])
def test_unknown_scheme_is_one_line(source: str) -> None:
    message = _error(DataParams(source=source))
    assert message.startswith(f"data.source: unknown scheme '{source.split(':')[0]}:'")
    assert "http(s)://" in message


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_local_file_with_spaces_and_unicode_in_column_names(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"own{suffix}"
    TABLE.to_csv(path, index=False) if suffix == ".csv" else TABLE.to_parquet(path, index=False)
    frame = load_source(DataParams(source=path.name), root=tmp_path)
    pd.testing.assert_frame_equal(frame, TABLE, check_dtype=False)
    params = DataParams(source=path.name, domain_column="site", base_domain="A", target_domain="B")
    raw = build_raw_dataset(frame, params)
    assert list(raw.columns) == ["height cm", "größe", LABEL, DOMAIN]
    assert raw[LABEL].tolist() == ["cat", "dog", "cat", "dog"]


def test_missing_file() -> None:
    message = _error(DataParams(source="data/source/absent.csv"))
    assert message.startswith("data.source: file not found: data/source/absent.csv;")


def test_unsupported_file_type(tmp_path: Path) -> None:
    (tmp_path / "data.json").write_text("{}")
    assert "expected a .csv or .parquet file" in _error(DataParams(source="data.json"), tmp_path)


def test_unreadable_parquet(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    message = _error(DataParams(source="broken.parquet"), tmp_path)
    assert message.startswith("broken.parquet: not a readable Parquet file (")


def test_zero_byte_csv(tmp_path: Path) -> None:
    (tmp_path / "zero.csv").write_bytes(b"")
    message = _error(DataParams(source="zero.csv"), tmp_path)
    assert message.startswith("zero.csv: the file is empty (no header, no rows)")


def test_ragged_csv_line_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "ragged.csv").write_text("a,b,label\n1,2,0\n3,4,1\n5,6,7,1\n7,8,0\n")
    message = _error(DataParams(source="ragged.csv"), tmp_path)
    assert message.startswith("ragged.csv: line 4 has 4 fields, the header has 3;")


def test_non_utf8_csv_names_the_byte_and_line(tmp_path: Path) -> None:
    (tmp_path / "latin1.csv").write_bytes("a,b,label\n1,2,0\n3,4,caf\xe9\n".encode("latin-1"))
    message = _error(DataParams(source="latin1.csv"), tmp_path)
    assert message == "latin1.csv: not UTF-8 text (byte 0xe9 on line 3); save the file as UTF-8"


def test_local_file_checksum(tmp_path: Path) -> None:
    (tmp_path / "own.csv").write_bytes(CSV_BYTES)
    loaded = load_source(DataParams(source="own.csv", sha256=CSV_SHA), root=tmp_path)
    assert loaded.shape == TABLE.shape
    message = _error(DataParams(source="own.csv", sha256="0" * 64), tmp_path)
    assert message.startswith(f"own.csv: sha256 mismatch: data.sha256 is {'0' * 64}, ")
    assert f"the file has {CSV_SHA}" in message


# --- http(s) against real servers on 127.0.0.1 ------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """``/<name>`` serves ``files[name]``; ``/flaky/<name>`` answers 503 ``fail_first`` times."""

    files: dict[str, bytes] = {}
    fail_first = 0
    hits: Counter

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.hits[self.path] += 1
        name = self.path.removeprefix("/flaky").lstrip("/")
        if self.path.startswith("/flaky/") and self.hits[self.path] <= self.fail_first:
            self.send_error(503, "busy")
            return
        if name not in self.files:
            self.send_error(404, "no such file")
            return
        body = self.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _serve(context: ssl.SSLContext | None = None) -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"hits": Counter(), "files": {}, "fail_first": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    # shutdown() waits up to one poll interval (0.5 s by default) per test
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    scheme = "https" if context else "http"
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch) -> None:
    """Retries without urllib3's back-off sleeps between them (about 1 s per failing download):
    these tests count the tries and read the error line; how long to wait is urllib3's."""
    monkeypatch.setattr(sources, "DOWNLOAD_BACKOFF", 0.0)


@pytest.fixture
def http_server() -> Iterator[tuple[str, type[_Handler]]]:
    yield from _serve()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed CA certificate for 127.0.0.1 and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test proxy CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "ca.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture
def https_server(certificate) -> Iterator[tuple[str, type[_Handler]]]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*map(str, certificate))
    yield from _serve(context)


@pytest.fixture(autouse=True)
def no_ca_override(monkeypatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


def _url_params(url: str, sha256: str = CSV_SHA, timeout: float = 5.0) -> DataParams:
    return DataParams(source=url, sha256=sha256, download_timeout=timeout)


def test_url_is_downloaded_verified_and_cached(tmp_path: Path, http_server) -> None:
    base, handler = http_server
    handler.files["own.csv"] = CSV_BYTES
    frame = load_source(_url_params(f"{base}/own.csv"), root=tmp_path)
    pd.testing.assert_frame_equal(frame, TABLE)
    cached = tmp_path / SOURCE_CACHE / f"{CSV_SHA}.csv"
    assert cached.read_bytes() == CSV_BYTES
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name]
    # The second load reads the cache: no request reaches the server.
    again = load_source(_url_params(f"{base}/own.csv"), root=tmp_path)
    pd.testing.assert_frame_equal(again, TABLE)
    assert handler.hits["/own.csv"] == 1


def test_url_checksum_mismatch_keeps_nothing(tmp_path: Path, http_server) -> None:
    base, handler = http_server
    handler.files["own.csv"] = CSV_BYTES.replace(b"cat", b"cow")
    message = _error(_url_params(f"{base}/own.csv"), tmp_path)
    actual = hashlib.sha256(handler.files["own.csv"]).hexdigest()
    assert message.startswith(f"{base}/own.csv: sha256 mismatch: data.sha256 is {CSV_SHA}")
    assert f"the file has {actual}" in message
    cache = tmp_path / SOURCE_CACHE
    assert not cache.exists() or list(cache.iterdir()) == []


def test_a_changed_cache_file_is_downloaded_again(tmp_path: Path, http_server) -> None:
    base, handler = http_server
    handler.files["own.csv"] = CSV_BYTES
    cached = tmp_path / SOURCE_CACHE / f"{CSV_SHA}.csv"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    load_source(_url_params(f"{base}/own.csv"), root=tmp_path)
    assert cached.read_bytes() == CSV_BYTES
    assert handler.hits["/own.csv"] == 1


def test_url_retries_server_errors(tmp_path: Path, http_server) -> None:
    base, handler = http_server
    handler.files["own.csv"] = CSV_BYTES
    handler.fail_first = DOWNLOAD_RETRIES  # fails on every try but the last
    frame = load_source(_url_params(f"{base}/flaky/own.csv"), root=tmp_path)
    assert len(frame) == 4
    assert handler.hits["/flaky/own.csv"] == DOWNLOAD_RETRIES + 1


def test_url_retries_are_bounded(tmp_path: Path, http_server) -> None:
    base, handler = http_server
    handler.files["own.csv"] = CSV_BYTES
    handler.fail_first = 100
    message = _error(_url_params(f"{base}/flaky/own.csv"), tmp_path)
    assert "the server kept failing (HTTP 429/5xx) over 3 tries" in message
    assert handler.hits["/flaky/own.csv"] == DOWNLOAD_RETRIES + 1


def test_url_not_found(tmp_path: Path, http_server) -> None:
    base, _ = http_server
    message = _error(_url_params(f"{base}/absent.csv"), tmp_path)
    assert message.startswith(f"{base}/absent.csv: HTTP 404 ")


def test_refused_connection(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    message = _error(_url_params(f"http://127.0.0.1:{port}/own.csv"), tmp_path)
    assert message.startswith(f"http://127.0.0.1:{port}/own.csv: cannot connect to 127.0.0.1:")
    assert "Connection refused" in message


def test_silent_host_is_one_line_within_the_timeout(tmp_path: Path) -> None:
    """A host that accepts the connection and never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        url = f"http://127.0.0.1:{port}/own.csv"
        start = time.monotonic()
        message = _error(_url_params(url, timeout=0.3), tmp_path)
        elapsed = time.monotonic() - start
    assert message == (
        f"{url}: no answer from 127.0.0.1:{port} within 0.3 s (3 tries); "
        "check the URL and the network, or raise data.download_timeout"
    )
    # 3 tries of 0.3 s: it gives up instead of hanging.
    assert elapsed < 20


def test_https_with_an_untrusted_certificate(tmp_path: Path, https_server) -> None:
    base, handler = https_server
    handler.files["own.csv"] = CSV_BYTES
    message = _error(_url_params(f"{base}/own.csv"), tmp_path)
    assert message.startswith(f"{base}/own.csv: the server's TLS certificate is not trusted (")
    assert "set REQUESTS_CA_BUNDLE or SSL_CERT_FILE" in message


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"])
def test_https_trusted_through_a_ca_bundle_variable(
    tmp_path: Path, https_server, certificate, monkeypatch, variable: str
) -> None:
    base, handler = https_server
    handler.files["own.csv"] = CSV_BYTES
    monkeypatch.setenv(variable, str(certificate[0]))
    frame = load_source(_url_params(f"{base}/own.csv"), root=tmp_path)
    pd.testing.assert_frame_equal(frame, TABLE)


def test_url_of_unknown_file_type(tmp_path: Path) -> None:
    message = _error(_url_params("http://127.0.0.1:9/data.json"), tmp_path)
    assert "expected a .csv or .parquet file" in message


# --- image folders ----------------------------------------------------------------------


def _write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def _image_folder(root: Path, per_class: int = 3, size: int = 6) -> Path:
    folder = root / "scans"
    rng = np.random.default_rng(0)
    for label in ("circle", "square"):
        for i in range(per_class):
            _write_image(folder / label / f"{i}.png", rng.integers(0, 256, (size, size)))
    (folder / "README.md").write_text("not an image: ignored\n")
    (folder / "circle" / ".DS_Store").write_bytes(b"\0")
    return folder


def test_image_feature_names_are_in_c_h_w_order() -> None:
    assert image_feature_names([2, 3]) == [
        "pixel_0_0",
        "pixel_0_1",
        "pixel_0_2",
        "pixel_1_0",
        "pixel_1_1",
        "pixel_1_2",
    ]
    names = image_feature_names([3, 2, 2])
    assert names[:4] == ["pixel_0_0_0", "pixel_0_0_1", "pixel_0_1_0", "pixel_0_1_1"]
    assert names[4] == "pixel_1_0_0" and len(names) == 12


def test_grey_image_folder(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path)
    params = DataParams(source="scans", image_shape=[6, 6])
    frame = load_source(params, root=tmp_path)
    assert list(frame.columns) == [*image_feature_names([6, 6]), LABEL]
    assert frame[LABEL].tolist() == ["circle"] * 3 + ["square"] * 3
    first = np.asarray(Image.open(folder / "circle" / "0.png"), dtype=np.float64)
    np.testing.assert_array_equal(frame.iloc[0, :36].to_numpy(), first.reshape(-1))
    raw = build_raw_dataset(frame, params, feature_range=(0, 255))
    target = raw[DOMAIN] == "target"
    assert target.sum() == 4  # round(0.5 * 3) == 2 per class
    row = int(np.flatnonzero(target)[0])
    np.testing.assert_array_equal(raw.iloc[row, :36], 255.0 - frame.iloc[row, :36])


def test_rgb_image_is_flattened_channel_first(tmp_path: Path) -> None:
    height, width = 2, 3
    array = np.zeros((height, width, 3), dtype=np.uint8)
    for c in range(3):
        array[:, :, c] = (c + 1) * 10 + np.arange(height * width).reshape(height, width)
    _write_image(tmp_path / "rgb" / "a" / "x.png", array)
    params = DataParams(source="rgb", image_mode="rgb", image_shape=[3, height, width])
    frame = load_source(params, root=tmp_path)
    assert frame.loc[0, "pixel_0_0_0"] == 10 and frame.loc[0, "pixel_0_1_2"] == 15
    assert frame.loc[0, "pixel_2_0_0"] == 30 and frame.loc[0, "pixel_1_1_1"] == 24
    np.testing.assert_array_equal(
        frame.iloc[0, :18].to_numpy(), array.transpose(2, 0, 1).reshape(-1)
    )


def test_images_are_converted_and_resized(tmp_path: Path) -> None:
    colour = np.zeros((20, 10, 3), dtype=np.uint8)
    colour[..., 0] = 255  # pure red: grey level 76 under ITU-R 601-2 luma
    _write_image(tmp_path / "imgs" / "red" / "a.png", colour)
    frame = load_source(DataParams(source="imgs", image_shape=[4, 2]), root=tmp_path)
    assert frame.shape == (1, 4 * 2 + 1)
    assert set(frame.iloc[0, :8]) == {76.0}


def _sixteen_bit_gradient(path: Path, top: int, height: int = 2, width: int = 16) -> np.ndarray:
    """A grey 16-bit PNG (Pillow mode I;16) whose columns rise from 0 to ``top``."""
    row = np.linspace(0, top, width).round().astype(np.uint16)
    values = np.tile(row, (height, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"  # what Pillow reads a 16-bit grey PNG as
    return values


@pytest.mark.parametrize("top", [4000, 65535])
def test_a_16_bit_gradient_is_scaled_not_clipped(tmp_path: Path, top: int) -> None:
    values = _sixteen_bit_gradient(tmp_path / "deep" / "a" / "g.png", top)
    frame = load_source(DataParams(source="deep", image_shape=[2, 16]), root=tmp_path)
    pixels = frame.iloc[0, :16].to_numpy(np.float64)
    # convert("L") made this [0, 255, 255, ...]: every level above 255 clipped.
    np.testing.assert_allclose(pixels, values[0].astype(np.float64) * 255 / 65535, rtol=1e-6)
    assert (np.diff(pixels) > 0).all()
    assert pixels[0] == 0 and pixels[-1] == pytest.approx(top * 255 / 65535, rel=1e-6)


def test_a_16_bit_image_is_scaled_then_resized_and_read_as_rgb(tmp_path: Path) -> None:
    _sixteen_bit_gradient(tmp_path / "deep" / "a" / "g.png", 65535, height=4, width=16)
    params = DataParams(source="deep", image_mode="rgb", image_shape=[3, 2, 8])
    pixels = load_source(params, root=tmp_path).iloc[0, :48].to_numpy(np.float64)
    channels = pixels.reshape(3, 2, 8)
    np.testing.assert_array_equal(channels[0], channels[1])  # grey: the same in R, G and B
    assert (np.diff(channels[0, 0]) > 0).all()
    assert channels.min() >= 0 and channels.max() <= 255 and channels.max() > 200


def test_a_float_image_is_refused_naming_file_and_mode(tmp_path: Path) -> None:
    (tmp_path / "floats" / "a").mkdir(parents=True)
    Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)).save(
        tmp_path / "floats" / "a" / "f.tif"
    )
    message = _error(DataParams(source="floats", image_shape=[4, 4]), tmp_path)
    assert message.startswith("floats/a/f.tif: Pillow reads this image as mode F")


def test_a_32_bit_image_beyond_16_bits_is_refused(tmp_path: Path) -> None:
    (tmp_path / "wide" / "a").mkdir(parents=True)
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "wide" / "a" / "i.tif")
    message = _error(DataParams(source="wide", image_shape=[1, 2]), tmp_path)
    assert message.startswith(
        "wide/a/i.tif: Pillow reads this image as mode I with values 0 to 70000"
    )


def test_image_folder_with_domains(tmp_path: Path) -> None:
    for domain, level in (("scanner_a", 10), ("scanner_b", 200)):
        for label in ("0", "1"):
            _write_image(tmp_path / "scans" / domain / label / "i.png", np.full((4, 4), level))
    params = DataParams(
        source="scans",
        image_shape=[4, 4],
        domain_column="scanner",
        base_domain="scanner_a",
        target_domain="scanner_b",
    )
    raw = build_raw_dataset(load_source(params, root=tmp_path), params)
    assert raw[DOMAIN].tolist() == ["scanner_a"] * 2 + ["scanner_b"] * 2
    assert raw[LABEL].tolist() == ["0", "1", "0", "1"]
    assert raw["pixel_0_0"].tolist() == [10.0, 10.0, 200.0, 200.0]


def test_image_folder_needs_image_shape(tmp_path: Path) -> None:
    _image_folder(tmp_path)
    message = _error(DataParams(source="scans"), tmp_path)
    assert message.startswith("data.image_shape: required to read the image folder scans")


def test_image_outside_a_class_folder(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path)
    _write_image(folder / "stray.png", np.zeros((6, 6)))
    message = _error(DataParams(source="scans", image_shape=[6, 6]), tmp_path)
    assert message.startswith("scans/stray.png: not in the <class>/<image> layout (1 images)")


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path)
    (folder / "square" / "broken.png").write_bytes(b"\x89PNG but not really")
    message = _error(DataParams(source="scans", image_shape=[6, 6]), tmp_path)
    assert message.startswith("scans/square/broken.png: Pillow cannot read this image (")


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    message = _error(DataParams(source="empty", image_shape=[6, 6]), tmp_path)
    assert message.startswith("empty: no images found; expected empty/<class>/<image>")


def test_checksum_of_a_folder_is_an_error(tmp_path: Path) -> None:
    _image_folder(tmp_path)
    message = _error(DataParams(source="scans", image_shape=[6, 6], sha256="0" * 64), tmp_path)
    assert message.startswith("data.sha256: checks a file or URL, not the folder scans")


# --- same source and params, byte-identical raw table -----------------------------------


def _raw_bytes(params: DataParams, root: Path, name: str) -> bytes:
    raw = build_raw_dataset(load_source(params, root=root), params, feature_range=(0, 255))
    return write_parquet(root / f"{name}.parquet", raw).read_bytes()


def test_raw_table_is_byte_identical(tmp_path: Path, http_server) -> None:
    base, handler = http_server
    handler.files["own.csv"] = CSV_BYTES
    (tmp_path / "own.csv").write_bytes(CSV_BYTES)
    TABLE.to_parquet(tmp_path / "own.parquet", index=False)
    _image_folder(tmp_path)
    cases = {
        "sklearn": DataParams(),
        "csv": DataParams(source="own.csv"),
        "parquet": DataParams(source="own.parquet"),
        "url": _url_params(f"{base}/own.csv"),
        "images": DataParams(source="scans", image_shape=[6, 6]),
    }
    for name, params in cases.items():
        first = _raw_bytes(params, tmp_path, f"{name}-1")
        if name == "url":  # the second read comes from the cache: download afresh
            for cached in (tmp_path / SOURCE_CACHE).iterdir():
                cached.unlink()
        assert _raw_bytes(params, tmp_path, f"{name}-2") == first, name
    assert handler.hits["/own.csv"] == 2
