"""``gateway download``: arguments, the loop over repositories, one-line errors and exit codes.

Exit codes: 0 all fetched; 1 a download failed (hub unreachable, access denied, disk full...); 2 bad
arguments or config; 130 interrupted. Errors are single lines on stderr, never tracebacks, and never
carry the token.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command's modules load only when it runs: `gateway serve` does not pay for them
    from gateway.commands.download.hub_api import Hub, RepoFile, Snapshot
    from gateway.commands.download.manifest import Manifest
    from gateway.commands.download.plan import Target
    from gateway.commands.download.progress import Progress

_SNAPSHOT_TRIES = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", metavar="ID", default=[], help="hub ids (org/name)")
    parser.add_argument("--all", action="store_true", help="every model of the config given by hub id")
    parser.add_argument(
        "--config", help="the gateway config: its models for --all, its models_dir (default: $GATEWAY_CONFIG)"
    )
    parser.add_argument("--path", help="folder for the models (default: models_dir of the config, else ./models)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit for --model ids (default: main)")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB", help="only files matching")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip files matching")
    parser.add_argument(
        "--all-files",
        action="store_true",
        help="also weights in other formats when safetensors exist (.bin, .pth, ...)",
    )
    parser.add_argument("--workers", type=int, default=4, help="files fetched at once (default: 4)")
    parser.add_argument("--retries", type=int, default=5, help="attempts per file after a cut transfer")


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"gateway download: {message}\n")
    return code


def run(args: argparse.Namespace) -> int:
    from gateway.commands.download.hub_api import DownloadError, Hub, HubUnreachable, find_token
    from gateway.commands.download.plan import DEFAULT_ROOT, from_config, targets
    from gateway.config.loader import ConfigError, load_config

    if not args.model and not args.all:
        return _fail("name models with --model ID [ID ...] or take the config's with --all", 2)
    if args.workers < 1 or args.retries < 0:
        return _fail("--workers must be at least 1 and --retries at least 0", 2)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return _fail("HF_HUB_OFFLINE is set; unset it to download")
    wanted = [(repo_id, args.revision or "main") for repo_id in args.model]
    config_path = args.config or os.environ.get("GATEWAY_CONFIG")
    if config_path and not args.config and not args.all and not Path(config_path).is_file():
        config_path = None  # GATEWAY_CONFIG only lends its models_dir to --model, when it is there
    models_dir = None
    if args.all and not config_path:
        return _fail("--all needs --config PATH (or GATEWAY_CONFIG)", 2)
    if config_path:
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            return _fail(str(exc), 2)
        models_dir = config.models_dir
        if args.all:
            from_cfg, skipped = from_config(config)
            if skipped:
                _say(f"not hub ids (local paths or remote servers), skipped: {', '.join(skipped)}")
            wanted += [pair for pair in from_cfg if pair not in wanted]
            if not wanted:
                _say("nothing to download: no model of the config is given by hub id")
                return 0
    root = Path(args.path or models_dir or DEFAULT_ROOT).expanduser()
    try:
        plan = targets(wanted, root)
    except DownloadError as exc:
        return _fail(str(exc), 2)

    failed = 0
    with Hub(token=find_token()) as hub:
        for target in plan:
            try:
                _download(hub, target, args)
            except HubUnreachable as exc:
                return _fail(str(exc))  # every other repository would fail the same way
            except KeyboardInterrupt:
                return _fail("interrupted; run the same command again to resume", 130)
            except DownloadError as exc:
                failed += 1
                _fail(str(exc))
            except OSError as exc:  # disk full, permissions: the path and the reason, no traceback
                failed += 1
                _fail(f"{target.repo_id}: {exc.strerror or exc} ({exc.filename or target.local_dir})")
    return 1 if failed else 0


def _snapshot(hub: Hub, target: Target, stop: threading.Event) -> Snapshot:
    from gateway.commands.download.hub_api import Retryable

    for attempt in range(_SNAPSHOT_TRIES):
        try:
            return hub.snapshot(target.repo_id, target.revision)
        except Retryable as exc:
            if attempt == _SNAPSHOT_TRIES - 1:
                raise
            stop.wait(exc.retry_after if exc.retry_after is not None else 1.0 + attempt)
    raise AssertionError("unreachable")


def _download(hub: Hub, target: Target, args: argparse.Namespace) -> None:
    from gateway.commands.download.hub_api import DownloadError
    from gateway.commands.download.manifest import Manifest, folder_lock
    from gateway.commands.download.plan import select
    from gateway.commands.download.progress import Progress, human
    from gateway.commands.download.transfer import is_complete

    stop = threading.Event()  # set when this repository's download must end early (Ctrl-C, a failed file)
    snapshot = _snapshot(hub, target, stop)
    files = select(snapshot.files, include=args.include, exclude=args.exclude, all_files=args.all_files)
    if not files:
        raise DownloadError(f"{target.repo_id}: no file matches (check --include/--exclude)")
    label = f"{target.repo_id}@{snapshot.commit[:12]}"
    local_dir = target.local_dir
    with folder_lock(local_dir):
        manifest = Manifest(local_dir, target.repo_id)
        unknown = [f for f in files if manifest.recorded(f) is None and (local_dir / f.path).is_file()]
        if unknown:  # files this command did not write: hashed once (minutes for a big model), then recorded
            _say(f"{label}: checking {len(unknown)} file(s) already in {local_dir}")
        todo: list[RepoFile] = []
        for f in files:
            if not is_complete(local_dir / f.path, f, manifest):
                todo.append(f)
            elif manifest.recorded(f) is None:  # just hashed: record it, so the next run skips it cheaply
                manifest.record(f, (local_dir / f.path).stat().st_size, snapshot.commit)
        total = sum(f.size or 0 for f in files)
        _check_space(local_dir, sum(_remaining(local_dir, f) for f in todo))
        _say(f"{label} -> {local_dir}: {len(files)} files, {human(total)}, {len(files) - len(todo)} already there")
        progress = Progress(label, total, len(files))
        progress.have(total - sum(f.size or 0 for f in todo))
        progress.done_files = len(files) - len(todo)
        try:
            _fetch_all(
                todo,
                args,
                stop,
                lambda f: _fetch_one(hub, snapshot, f, local_dir, progress, manifest, args.retries, stop),
            )
        finally:
            progress.close()
        manifest.set_commit(target.revision, snapshot.commit)
    _say(f"{label}: done, in {local_dir}")


def _fetch_one(
    hub: Hub,
    snapshot: Snapshot,
    file: RepoFile,
    local_dir: Path,
    progress: Progress,
    manifest: Manifest,
    retries: int,
    stop: threading.Event,
) -> None:
    from gateway.commands.download.transfer import FileFetch

    how = FileFetch(hub, snapshot, file, local_dir, progress, stop).run(retries)
    manifest.record(file, (local_dir / file.path).stat().st_size, snapshot.commit)
    progress.file_done(file.path, file.size, how)


def _fetch_all(
    todo: list[RepoFile], args: argparse.Namespace, stop: threading.Event, one: Callable[[RepoFile], None]
) -> None:
    """Files in parallel; the first failure (or Ctrl-C) stops the others at their next chunk."""
    from gateway.commands.download.transfer import Interrupted

    if not todo:
        return
    pool = ThreadPoolExecutor(max_workers=min(args.workers, len(todo)), thread_name_prefix="download")
    try:
        futures = [pool.submit(one, f) for f in todo]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        errors = [e for e in (f.exception() for f in done) if e is not None]
        if errors:
            # A worker stopped by another's failure says "interrupted": report the failure that caused it.
            raise next((e for e in errors if not isinstance(e, Interrupted)), errors[0])
    except BaseException:
        stop.set()  # partial files stay, as .incomplete, for the next run
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _remaining(local_dir: Path, file: RepoFile) -> int:
    from gateway.commands.download.transfer import PARTIAL_SUFFIX

    size = file.size or 0
    try:
        return max(size - (local_dir / (file.path + PARTIAL_SUFFIX)).stat().st_size, 0)
    except OSError:
        return size


def _check_space(local_dir: Path, needed: int) -> None:
    from gateway.commands.download.hub_api import DownloadError
    from gateway.commands.download.progress import human

    free = shutil.disk_usage(local_dir).free
    if needed > free:
        raise DownloadError(f"not enough disk space in {local_dir}: {human(needed)} to fetch, {human(free)} free")
