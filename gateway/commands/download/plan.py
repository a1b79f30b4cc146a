"""What a download fetches: which repositories, which of their files, and into which folder.

Each repository goes into ``<path>/<name>`` (``Qwen/Qwen2.5-7B-Instruct`` → ``/models/Qwen2.5-7B-Instruct``),
the layout docs/DESIGN.md's example config uses, so ``models_dir`` finds it and ``model:`` can name it.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gateway.commands.download.hub_api import DownloadError, RepoFile
from gateway.config.loader import Config

DEFAULT_ROOT = "./models"
# Hub repository names: letters, digits and . _ - (no leading dot or dash), one slash between org and name.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# When a repository has safetensors, these are the same weights again in another format (Meta's
# original/*.pth, PyTorch .bin, TF, Flax, ONNX, GGUF): engines load the safetensors, so they are skipped.
OTHER_WEIGHT_FORMATS = (
    "*.bin",
    "*.pt",
    "*.pth",
    "*.h5",
    "*.msgpack",
    "*.ot",
    "*.onnx",
    "*.onnx_data",
    "*.tflite",
    "*.gguf",
)


@dataclass(frozen=True)
class Target:
    repo_id: str
    revision: str
    local_dir: Path


def is_hub_id(value: str) -> bool:
    """``org/name`` that is not an existing local path (a relative ``models/x`` folder stays a path)."""
    return _HUB_ID.fullmatch(value) is not None and ".." not in value and "--" not in value and not Path(value).exists()


def targets(repo_ids: list[tuple[str, str]], root: Path) -> list[Target]:
    """``(repo_id, revision)`` pairs → targets, refusing two repositories that would share one folder."""
    found: dict[Path, Target] = {}
    for repo_id, revision in repo_ids:
        if not is_hub_id(repo_id):
            raise DownloadError(f"{repo_id!r} is not a hub id (org/name)")
        target = Target(repo_id, revision, root / repo_id.split("/", 1)[1])
        other = found.get(target.local_dir)
        if other is not None and other != target:
            raise DownloadError(
                f"{other.repo_id}@{other.revision} and {repo_id}@{revision} would both go into "
                f"{target.local_dir}; download them with separate --path folders"
            )
        found[target.local_dir] = target
    return list(found.values())


def from_config(config: Config) -> tuple[list[tuple[str, str]], list[str]]:
    """The hub ids of the config's models (with ``args.revision`` when given) and the names left out."""
    wanted: list[tuple[str, str]] = []
    skipped: list[str] = []
    for spec in config.models:
        if spec.engine == "openai" or not spec.model or not is_hub_id(spec.model):
            skipped.append(spec.name)  # a remote server, or a local path
            continue
        revision = spec.args.get("revision")
        pair = (spec.model, str(revision) if revision else "main")
        if pair not in wanted:
            wanted.append(pair)
    return wanted, skipped


def safe_path(path: str) -> bool:
    """A hub file name that stays inside the target folder (a hostile or broken hub cannot write elsewhere)."""
    pure = PurePosixPath(path)
    return (
        bool(path)
        and not pure.is_absolute()
        and "\\" not in path
        and "\0" not in path
        and all(part not in ("", ".", "..") for part in path.split("/"))
    )


def select(files: tuple[RepoFile, ...], *, include: list[str], exclude: list[str], all_files: bool) -> list[RepoFile]:
    """The files to fetch: ``--include`` globs (all when none), minus ``--exclude``; without either
    ``--include`` or ``--all-files``, minus weights that duplicate the safetensors."""
    for file in files:
        if not safe_path(file.path):
            raise DownloadError(f"the hub lists a file outside the repository folder: {file.path!r}")
    chosen = [f for f in files if not include or any(fnmatch.fnmatch(f.path, p) for p in include)]
    chosen = [f for f in chosen if not any(fnmatch.fnmatch(f.path, p) for p in exclude)]
    if not all_files and not include and any(f.path.endswith(".safetensors") for f in chosen):
        chosen = [f for f in chosen if not any(fnmatch.fnmatch(f.path, p) for p in OTHER_WEIGHT_FORMATS)]
    return chosen
