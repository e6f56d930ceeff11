"""MovieLens loaders on the local copies in ../shared/data (never committed), with checksum refusals."""

from __future__ import annotations

import functools
import http.server
import io
import shutil
import threading
import urllib.error
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from twotower.data.movielens import DataError, Vocabulary, _fetch, load_movielens

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (SHARED / "ml-100k").is_dir(), reason=f"no local MovieLens copy at {SHARED}")


def test_100k_from_the_extracted_folder() -> None:
    data = load_movielens("100k", data_dir=SHARED)
    assert len(data) == 100_000
    assert len(set(data.user_ids.tolist())) == 943
    assert data.all_movie_ids.shape == (1682,)
    assert len(set(data.all_movie_titles.tolist())) == 1664
    assert data.ratings.mean() == pytest.approx(3.52986, abs=1e-5)
    # Latin-1 titles decode: item 543.
    assert "Misérables, Les (1995)" in set(data.all_movie_titles.tolist())


def test_environment_variable_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWOTOWER_DATA_DIR", str(SHARED))
    data = load_movielens("100k")
    train, test = data.split(seed=42)
    assert (len(train), len(test)) == (80_000, 20_000)
    assert len(set(train.tolist()) | set(test.tolist())) == 100_000
    again, _ = data.split(seed=42)
    np.testing.assert_array_equal(train, again)
    other, _ = data.split(seed=43)
    assert not np.array_equal(train, other)


def test_vocabulary_has_an_out_of_vocabulary_row() -> None:
    vocabulary = Vocabulary(["b", "a", "c", "a"])
    assert len(vocabulary) == 4
    np.testing.assert_array_equal(vocabulary.lookup(["a", "b", "c", "zzz", ""]), [1, 2, 3, 0, 0])


def test_a_modified_file_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "ml-100k"
    shutil.copytree(SHARED / "ml-100k", copy)
    data = bytearray((copy / "u.data").read_bytes())
    data[10] = ord("5") if data[10] != ord("5") else ord("4")
    (copy / "u.data").write_bytes(bytes(data))
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        load_movielens("100k", data_dir=tmp_path)
    shutil.copy(SHARED / "ml-100k" / "u.data", copy / "u.data")
    (copy / "u.item").unlink()
    with pytest.raises(DataError, match=r"u\.item is missing"):
        load_movielens("100k", data_dir=tmp_path)


def _zip_of(folder: Path, prefix: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"{prefix}/{path.name}")
    return buffer.getvalue()


def test_a_local_zip_is_read_and_its_members_verified(tmp_path: Path) -> None:
    (tmp_path / "ml-100k.zip").write_bytes(_zip_of(SHARED / "ml-100k", "ml-100k"))
    from_zip = load_movielens("100k", data_dir=tmp_path)
    from_folder = load_movielens("100k", data_dir=SHARED)
    np.testing.assert_array_equal(from_zip.movie_titles, from_folder.movie_titles)
    np.testing.assert_array_equal(from_zip.user_ids, from_folder.user_ids)


def test_latest_small_from_folder_and_official_zip(tmp_path: Path) -> None:
    data = load_movielens("latest-small", data_dir=SHARED)
    assert len(data) == 100_836
    assert len(set(data.user_ids.tolist())) == 610
    shutil.copy(SHARED / "ml-latest-small.zip", tmp_path / "ml-latest-small.zip")
    zipped = load_movielens("latest-small", data_dir=tmp_path)
    np.testing.assert_array_equal(zipped.ratings, data.ratings)


@pytest.fixture
def loopback_server() -> Iterator[str]:
    """Serve ../shared/data over HTTP on 127.0.0.1 (a bounded, local-only server)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SHARED))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_download_verifies_the_official_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loopback_server: str
) -> None:
    monkeypatch.delenv("TWOTOWER_DATA_DIR", raising=False)
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))
    requested: list[str] = []

    def opener(url: str) -> bytes:
        requested.append(url)
        return _fetch(loopback_server + url.rsplit("/", 1)[1])

    data = load_movielens("latest-small", opener=opener)
    assert requested == ["https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"]
    assert len(data) == 100_836
    assert (tmp_path / "cache" / "data" / "ml-latest-small.zip").is_file()
    load_movielens("latest-small", opener=opener)
    assert len(requested) == 1, "the second load must come from the cache"


def test_download_refuses_a_wrong_file_and_explains_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TWOTOWER_DATA_DIR", raising=False)
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))
    not_official = _zip_of(SHARED / "ml-100k", "ml-100k")
    with pytest.raises(DataError, match="does not match its published SHA-256"):
        load_movielens("100k", opener=lambda url: not_official)
    assert not (tmp_path / "cache" / "data" / "ml-100k.zip").exists()

    def offline(url: str) -> bytes:
        raise urllib.error.URLError("Name or service not known")

    with pytest.raises(DataError, match="TWOTOWER_DATA_DIR"):
        load_movielens("100k", opener=offline)
    with pytest.raises(DataError, match="download=False"):
        load_movielens("100k", download=False)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="name must be one of"):
        load_movielens("10m")
    with pytest.raises(DataError, match="does not exist"):
        load_movielens("100k", data_dir="/nonexistent/folder")
    with pytest.raises(DataError, match="holds neither"):
        load_movielens("100k", data_dir=SHARED / "ml-latest-small")


def test_1m_format_is_parsed_and_only_the_official_zip_accepted(tmp_path: Path) -> None:
    from twotower.data.movielens import _parse_1m

    contents = {
        "movies.dat": "1::Toy Story (1995)::Animation\n2::Jumanji (1995)::Adventure\n".encode("latin-1"),
        "ratings.dat": b"1::1::5::978300760\n1::2::3::978302109\n2::1::4::978301968\n",
    }
    data = _parse_1m(contents)
    assert data.user_ids.tolist() == ["1", "1", "2"]
    assert data.movie_titles.tolist() == ["Toy Story (1995)", "Jumanji (1995)", "Toy Story (1995)"]
    assert data.ratings.tolist() == [5.0, 3.0, 4.0]
    # No published checksums exist for the extracted 1M files: only the official zip is accepted.
    (tmp_path / "ml-1m").mkdir()
    with pytest.raises(DataError, match="no published checksum"):
        load_movielens("1m", data_dir=tmp_path)
    (tmp_path / "ml-1m").rmdir()
    (tmp_path / "ml-1m.zip").write_bytes(b"PK not the official archive")
    with pytest.raises(DataError, match=r"not the official ml-1m\.zip"):
        load_movielens("1m", data_dir=tmp_path)
