"""Run outputs on `ray.storage_path`.

Ray Train writes its checkpoints there itself. When it is an object store (s3://, gs://), the
finished output folders (adapter, report, sweep results) are copied there too, to
`<storage_path>/<folder name>/`, so other nodes and later jobs (Serve replicas, eval) find them;
they fetch a remote adapter into a local cache. Credentials and endpoints come from the usual
environment (AWS_* incl. AWS_ENDPOINT_URL for MinIO-style stores, GOOGLE_APPLICATION_CREDENTIALS).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs
import ray.train

from jobs import adapter
from jobs.packaged import lorafleet_cache

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")


def is_remote(path: str | Path) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def adapter_cache() -> Path:
    return lorafleet_cache() / "adapters"


def publish(local_dir: Path, storage_path: str, skip: tuple[str, ...] = ()) -> str | None:
    """Copy a finished output folder (less the top-level entries in `skip`) to `<storage_path>/<its name>/`;
    the URI, or None when storage is local.

    The old contents under that URI are removed first, so a reader never mixes two runs' files;
    during the upload the adapter is absent (a clean "not found"), never half there.
    """
    if not is_remote(storage_path):
        return None
    uri = f"{storage_path.rstrip('/')}/{local_dir.name}"
    upload(local_dir, uri, skip)
    return uri


def upload(local_dir: Path, uri: str, skip: tuple[str, ...] = ()) -> None:
    """Replace the remote folder `uri` with `local_dir` (less the top-level entries in `skip`), adapter config last."""
    fs, target = pafs.FileSystem.from_uri(uri)
    fs.delete_dir_contents(target, missing_dir_ok=True)
    files = [p for p in local_dir.rglob("*") if p.is_file() and p.relative_to(local_dir).parts[0] not in skip]
    files.sort(key=adapter.last_is_config)
    for path in files:
        pafs.copy_files(
            str(path), f"{target.rstrip('/')}/{path.relative_to(local_dir).as_posix()}", destination_filesystem=fs
        )


def has_files(uri: str, names: tuple[str, ...]) -> bool:
    """Whether the remote folder `uri` holds every file in `names` (nothing is downloaded)."""
    fs, root = pafs.FileSystem.from_uri(uri)
    return all(
        info.type == pafs.FileType.File for info in fs.get_file_info([f"{root.rstrip('/')}/{name}" for name in names])
    )


def _fingerprint(fs: pafs.FileSystem, root: str) -> list[tuple[str, int, str]]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted((i.path, i.size, str(i.mtime_ns)) for i in infos if i.type == pafs.FileType.File)


def fetch(uri: str, cache: Path | None = None) -> Path:
    """A local copy of the remote folder `uri`, downloaded once per version of its files
    (a version: the files' names, sizes and modification times).

    FileNotFoundError when nothing is there. The copy is staged and renamed into place, so a
    download that dies halfway is never used.
    """
    fs, root = pafs.FileSystem.from_uri(uri)
    files = _fingerprint(fs, root) if fs.get_file_info(root).type == pafs.FileType.Directory else []
    if not files:
        raise FileNotFoundError(f"{uri}: no files there")
    cache = cache or adapter_cache()
    target = cache / hashlib.sha256(repr((uri, files)).encode()).hexdigest()[:24]
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".fetch-"))
    try:
        pafs.copy_files(root, str(staging), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        staging.rename(target)
    except OSError:
        if not target.is_dir():  # not a concurrent fetch of the same version that won the rename
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextmanager
def checkpoint_dir(path: str, storage_path: str) -> Iterator[Path]:
    """A local folder with the Ray checkpoint at `path` (no scheme) on `storage_path`'s filesystem."""
    filesystem = pafs.FileSystem.from_uri(storage_path)[0] if is_remote(storage_path) else None
    with ray.train.Checkpoint(path, filesystem=filesystem).as_directory() as folder:
        yield Path(folder)
