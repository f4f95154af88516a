"""Where the rows are: data.path's files (local or `s3://`, one file or a folder of them) and their format."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from jobs.config import DataConfig
from jobs.data.errors import DataError, not_found
from jobs.data.formats import DEMOS, FILE_FORMATS, SUFFIXES, resolve_format
from jobs.data.readers import is_saved_dataset


def source_files(cfg: DataConfig, fmt: str) -> dict[str, int]:
    """data.path's files and their sizes in bytes: the file itself, or every file of the format under the folder
    (sorted). The sizes come with the listing: on S3 another request per object would be needed."""
    fs, root = _filesystem(cfg.path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return {_uri(cfg.path, root): info.size}
    if info.type != pafs.FileType.Directory:
        raise not_found(cfg.path)
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = [i for i in found if i.type == pafs.FileType.File and i.path.lower().endswith(SUFFIXES[fmt])]
    if not files:
        raise DataError(f"data.path = {cfg.path!r}: no {'/'.join(SUFFIXES[fmt])} files in this folder")
    return {_uri(cfg.path, i.path): i.size for i in sorted(files, key=lambda i: i.path)}


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(path if "://" in path else str(Path(path).resolve()))


def _uri(path: str, fs_path: str) -> str:
    return f"{path.split('://', 1)[0]}://{fs_path}" if "://" in path else fs_path


def folder_format(cfg: DataConfig) -> str:
    """The files' format: data.format, else the extension of data.path or of the folder's first data file."""
    if cfg.format in FILE_FORMATS or cfg.path in DEMOS:
        return resolve_format(cfg)
    if "://" not in cfg.path and Path(cfg.path).is_file():
        return resolve_format(cfg)
    fs, root = _filesystem(cfg.path)
    if fs.get_file_info(root).type == pafs.FileType.File:
        return resolve_format(cfg.model_copy(update={"path": Path(root).name}))
    if "://" not in cfg.path and is_saved_dataset(cfg.path):
        return "hf"
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        for fmt in ("jsonl", "parquet", "csv"):
            if info.path.lower().endswith(SUFFIXES[fmt]):
                return fmt
    raise DataError(f"data.path = {cfg.path!r}: no JSONL, Parquet or CSV files found; set data.format")
