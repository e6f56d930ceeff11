"""MovieLens data sets from GroupLens, verified by checksum.

The data is never shipped with twotower (the MovieLens licences forbid redistribution). :func:`load_movielens`
finds it in this order:

1. ``data_dir`` (argument) or the environment variable ``TWOTOWER_DATA_DIR``: a folder holding the extracted
   folder (``ml-100k/``) or the official zip (``ml-100k.zip``), or the extracted folder itself;
2. the cache (``~/.cache/twotower/data`` or ``$TWOTOWER_CACHE/data``), where a download lands;
3. a download of the official zip from GroupLens, when ``download=True``.

Every file is checked against its published SHA-256 (the official zips' checksums are those of TensorFlow
Datasets; the extracted files' are those of the GroupLens release) and a mismatch is refused.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa

from twotower._files import atomic_write
from twotower.vocabulary import Vocabulary

__all__ = ["DataError", "MovieLens", "Vocabulary", "load_movielens"]

GROUPLENS = "https://files.grouplens.org/datasets/movielens/"


@dataclass(frozen=True)
class _Release:
    folder: str
    zip_sha256: str
    zip_size: int
    #: SHA-256 of the extracted files that are read; a release without them is only accepted as the official zip.
    files: dict[str, str]


RELEASES = {
    "100k": _Release(
        folder="ml-100k",
        zip_sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        zip_size=4924029,
        files={
            "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
            "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
        },
    ),
    "latest-small": _Release(
        folder="ml-latest-small",
        zip_sha256="696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
        zip_size=978202,
        files={
            "ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
            "movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
        },
    ),
    "1m": _Release(
        folder="ml-1m",
        zip_sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        zip_size=5917549,
        files={},
    ),
}


class DataError(ValueError):
    """The data could not be found, downloaded or verified."""


@dataclass(frozen=True)
class MovieLens:
    """One MovieLens release, as the TFDS ``movielens/*-ratings`` and ``*-movies`` data sets present it.

    Attributes:
        name: ``"100k"``, ``"latest-small"`` or ``"1m"``.
        user_ids: ``[n_ratings]`` user ids as strings.
        movie_ids: ``[n_ratings]`` movie ids as strings.
        movie_titles: ``[n_ratings]`` titles of the rated movies.
        ratings: ``[n_ratings]`` float32 ratings.
        timestamps: ``[n_ratings]`` int64 Unix seconds.
        all_movie_ids: ``[n_movies]`` ids of every movie of the release.
        all_movie_titles: ``[n_movies]`` their titles (several ids may share a title).
        all_movie_genres: ``[n_movies]`` their genres joined by ``|`` (``""``: none listed).
    """

    name: str
    user_ids: np.ndarray
    movie_ids: np.ndarray
    movie_titles: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    all_movie_ids: np.ndarray
    all_movie_titles: np.ndarray
    all_movie_genres: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))

    def __len__(self) -> int:
        return int(self.user_ids.shape[0])

    #: The columns of :meth:`catalogue`.
    CATALOGUE_COLUMNS: ClassVar[tuple[str, str, str]] = ("movie_id", "movie_title", "genres")

    def catalogue(self) -> pa.Table:
        """Every movie of the release: ``movie_id``, ``movie_title``, ``genres`` (joined by ``|``)."""
        columns = (self.all_movie_ids, self.all_movie_titles, self.all_movie_genres)
        return pa.table(dict(zip(self.CATALOGUE_COLUMNS, columns, strict=True)))

    def split(self, seed: int = 42, train_fraction: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
        """A seeded shuffle split: ``(train_rows, test_rows)``, index arrays into the ratings."""
        if not 0 < train_fraction < 1:
            raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
        order = np.random.default_rng(seed).permutation(len(self))
        cut = round(train_fraction * len(self))
        return order[:cut], order[cut:]


def _cache_root() -> Path:
    root = os.environ.get("TWOTOWER_CACHE")
    if root:
        return Path(root) / "data"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "twotower" / "data"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_verified_folder(folder: Path, release: _Release) -> dict[str, bytes]:
    if not release.files:
        raise DataError(
            f"{folder} holds an extracted MovieLens {release.folder} whose files have no published checksum: "
            f"use the official {release.folder}.zip instead"
        )
    contents = {}
    for name, expected in release.files.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{folder} is not a complete {release.folder} folder: {name} is missing")
        data = path.read_bytes()
        if sha256_of(data) != expected:
            raise DataError(f"{path} does not match the official release (SHA-256 mismatch): refusing a modified file")
        contents[name] = data
    return contents


def _read_zip(path: Path, release: _Release, official: bool) -> dict[str, bytes]:
    data = path.read_bytes()
    if official and sha256_of(data) != release.zip_sha256:
        raise DataError(f"{path} is not the official {release.folder}.zip (SHA-256 mismatch)")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as error:
        raise DataError(f"{path} is not a valid zip file: {error}") from error
    names = {Path(name).name: name for name in archive.namelist() if name.startswith(release.folder + "/")}
    wanted = release.files or {"ratings.dat": "", "movies.dat": ""}
    contents = {}
    for name, expected in wanted.items():
        if name not in names:
            raise DataError(f"{path} has no {release.folder}/{name}")
        member = archive.read(names[name])
        if expected and sha256_of(member) != expected:
            raise DataError(f"{path}: {name} does not match the official release (SHA-256 mismatch)")
        contents[name] = member
    return contents


def _download(release: _Release, target: Path, opener: Callable[[str], bytes] | None) -> None:
    url = GROUPLENS + release.folder + ".zip"
    try:
        data = opener(url) if opener is not None else _fetch(url)
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        raise DataError(
            f"could not download {url} ({error}). Offline? Point twotower at a local copy: pass data_dir=... or set "
            f"TWOTOWER_DATA_DIR to a folder holding {release.folder}/ or {release.folder}.zip"
        ) from error
    if len(data) != release.zip_size or sha256_of(data) != release.zip_sha256:
        raise DataError(f"the download of {url} does not match its published SHA-256: refusing it")
    atomic_write(target, data)


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        data: bytes = response.read()
    return data


def _locate(
    release: _Release, data_dir: str | os.PathLike[str] | None, download: bool, opener: Callable[[str], bytes] | None
) -> dict[str, bytes]:
    given = data_dir if data_dir is not None else os.environ.get("TWOTOWER_DATA_DIR")
    if given:
        root = Path(given)
        if not root.is_dir():
            raise DataError(f"data directory {root} does not exist")
        if (root / release.folder).is_dir():
            return _read_verified_folder(root / release.folder, release)
        if (root / f"{release.folder}.zip").is_file():
            return _read_zip(root / f"{release.folder}.zip", release, official=not release.files)
        if root.name == release.folder:
            return _read_verified_folder(root, release)
        raise DataError(f"{root} holds neither {release.folder}/ nor {release.folder}.zip")
    cached = _cache_root() / f"{release.folder}.zip"
    if not cached.is_file():
        if not download:
            raise DataError(
                f"MovieLens {release.folder} is not in the cache ({cached}) and download=False: pass data_dir=... or "
                "set TWOTOWER_DATA_DIR"
            )
        _download(release, cached, opener)
    return _read_zip(cached, release, official=True)


def load_movielens(
    name: str = "100k",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    opener: Callable[[str], bytes] | None = None,
) -> MovieLens:
    """Load a MovieLens release (see the module docstring for where it is looked for).

    Args:
        name: ``"100k"``, ``"latest-small"`` or ``"1m"``.
        data_dir: a folder with the extracted release or its official zip; defaults to ``$TWOTOWER_DATA_DIR``.
        download: download the official zip into the cache when it is not found.
        opener: ``url -> bytes`` used for the download (tests pass a local one); defaults to ``urllib``.

    Returns:
        The ratings with their users, movies and titles.
    """
    if name not in RELEASES:
        raise ValueError(f"name must be one of {sorted(RELEASES)}, got {name!r}")
    contents = _locate(RELEASES[name], data_dir, download, opener)
    if name == "100k":
        return _parse_100k(contents)
    if name == "latest-small":
        return _parse_latest_small(contents)
    return _parse_1m(contents)


#: The genres of MovieLens 100K's ``u.item`` flag columns, in order (its ``u.genre``).
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def _assemble(
    name: str, rows: list[tuple[str, str, float, int]], movies: dict[str, str], genres: dict[str, str]
) -> MovieLens:
    users = np.array([row[0] for row in rows], dtype=str)
    movie_ids = np.array([row[1] for row in rows], dtype=str)
    missing = set(movie_ids.tolist()) - set(movies)
    if missing:
        raise DataError(f"ratings refer to {len(missing)} movie id(s) absent from the movie list")
    return MovieLens(
        name=name,
        user_ids=users,
        movie_ids=movie_ids,
        movie_titles=np.array([movies[movie] for movie in movie_ids.tolist()], dtype=str),
        ratings=np.array([row[2] for row in rows], dtype=np.float32),
        timestamps=np.array([row[3] for row in rows], dtype=np.int64),
        all_movie_ids=np.array(list(movies), dtype=str),
        all_movie_titles=np.array(list(movies.values()), dtype=str),
        all_movie_genres=np.array([genres.get(movie, "") for movie in movies], dtype=str),
    )


def _parse_100k(contents: dict[str, bytes]) -> MovieLens:
    movies, genres = {}, {}
    # u.item is Latin-1 and pipe-separated (the README wrongly says tab); its last 19 fields flag the genres.
    for line in contents["u.item"].decode("latin-1").splitlines():
        if line:
            fields = line.split("|")
            movies[fields[0]] = fields[1]
            flags = fields[-len(GENRES_100K) :]
            genres[fields[0]] = "|".join(genre for genre, flag in zip(GENRES_100K, flags, strict=True) if flag == "1")
    rows = []
    for line in contents["u.data"].decode("ascii").splitlines():
        if line:
            user, movie, rating, timestamp = line.split("\t")
            rows.append((user, movie, float(rating), int(timestamp)))
    return _assemble("100k", rows, movies, genres)


def _parse_latest_small(contents: dict[str, bytes]) -> MovieLens:
    listed = list(csv.DictReader(io.StringIO(contents["movies.csv"].decode())))
    movies = {row["movieId"]: row["title"] for row in listed}
    none = "(no genres listed)"
    genres = {row["movieId"]: "" if row["genres"] == none else row["genres"] for row in listed}
    rows = [
        (row["userId"], row["movieId"], float(row["rating"]), int(row["timestamp"]))
        for row in csv.DictReader(io.StringIO(contents["ratings.csv"].decode()))
    ]
    return _assemble("latest-small", rows, movies, genres)


def _parse_1m(contents: dict[str, bytes]) -> MovieLens:
    movies, genres = {}, {}
    for line in contents["movies.dat"].decode("latin-1").splitlines():
        if line:
            movie, title, listed = line.split("::")
            movies[movie], genres[movie] = title, listed
    rows = []
    for line in contents["ratings.dat"].decode("latin-1").splitlines():
        if line:
            user, movie, rating, timestamp = line.split("::")
            rows.append((user, movie, float(rating), int(timestamp)))
    return _assemble("1m", rows, movies, genres)
