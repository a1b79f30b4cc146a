"""The pieces of ``gateway download`` that need no server: hub ids, file choice, config, token, progress."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from gateway.commands.download.hub_api import DownloadError, RepoFile, _parse_files, find_token
from gateway.commands.download.plan import from_config, is_hub_id, safe_path, select, targets
from gateway.commands.download.progress import Progress, human
from gateway.config.loader import build_config


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", True),
        ("meta-llama/Llama-3.1-8B", True),
        ("a/b_c.d", True),
        ("/models/Qwen2.5-7B-Instruct", False),
        ("./org/name", False),
        ("org/name/extra", False),
        ("name-only", False),
        ("org/..", False),
        ("-org/name", False),
        ("org/na--me", False),
        ("org/na me", False),
    ],
)
def test_hub_ids(value: str, expected: bool) -> None:
    assert is_hub_id(value) is expected


def test_an_existing_local_folder_shaped_like_a_hub_id_is_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert not is_hub_id("models/tiny")
    assert is_hub_id("models/other")


def _f(path: str) -> RepoFile:
    return RepoFile(path, 1, None, None)


def test_select_skips_duplicate_weight_formats_only_when_safetensors_exist() -> None:
    files = tuple(
        _f(p)
        for p in (
            "config.json",
            "model-00001-of-00002.safetensors",
            "pytorch_model.bin",
            "original/consolidated.00.pth",
            "original/params.json",
            "training_args.bin",
        )
    )
    chosen = [f.path for f in select(files, include=[], exclude=[], all_files=False)]
    assert chosen == ["config.json", "model-00001-of-00002.safetensors", "original/params.json"]
    assert len(select(files, include=[], exclude=[], all_files=True)) == len(files)
    bin_only = (_f("config.json"), _f("pytorch_model.bin"))
    assert len(select(bin_only, include=[], exclude=[], all_files=False)) == 2
    # An explicit --include is taken as asked; --exclude always applies.
    assert [f.path for f in select(files, include=["*.bin"], exclude=["training*"], all_files=False)] == [
        "pytorch_model.bin"
    ]


@pytest.mark.parametrize("path", ["../x", "a/../../x", "/etc/passwd", "a\\..\\x", "a//b", "./x", ""])
def test_paths_outside_the_folder_are_refused(path: str) -> None:
    assert not safe_path(path)
    with pytest.raises(DownloadError, match="outside the repository folder"):
        select((_f(path),), include=[], exclude=[], all_files=False)


def test_targets_go_into_root_slash_name_and_refuse_collisions(tmp_path: Path) -> None:
    [t] = targets([("Qwen/Qwen2.5-7B-Instruct", "main")], tmp_path)
    assert t.local_dir == tmp_path / "Qwen2.5-7B-Instruct"
    assert len(targets([("a/x", "main"), ("a/x", "main")], tmp_path)) == 1
    with pytest.raises(DownloadError, match="would both go into"):
        targets([("a/x", "main"), ("b/x", "main")], tmp_path)


def test_from_config_takes_hub_ids_with_their_revision(tmp_path: Path) -> None:
    config = build_config(
        {
            "models": {
                "a": {"engine": "vllm", "model": "org/a"},
                "a2": {"engine": "lmdeploy", "model": "org/a"},  # the same weights served twice: fetched once
                "b": {"engine": "vllm", "model": "org/b", "args": {"revision": "v2"}},
                "local": {"engine": "vllm", "model": str(tmp_path)},
                "remote": {"engine": "openai", "url": "http://h:1/v1", "model": "org/c"},
            }
        }
    )
    assert from_config(config) == ([("org/a", "main"), ("org/b", "v2")], ["local", "remote"])


def test_token_from_the_environment_then_the_login_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert find_token() is None
    (tmp_path / "token").write_text("hf_file\n")
    assert find_token() == "hf_file"
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_legacy")
    assert find_token() == "hf_legacy"
    monkeypatch.setenv("HF_TOKEN", "hf_new")
    assert find_token() == "hf_new"


def test_file_list_parsing_prefers_lfs_sizes_and_hashes() -> None:
    files = _parse_files(
        [
            {"rfilename": "config.json", "size": 10, "blobId": "abc"},
            {"rfilename": "w.safetensors", "size": 130, "blobId": "ptr", "lfs": {"sha256": "ff", "size": 999}},
        ]
    )
    assert files == (RepoFile("config.json", 10, "abc", None), RepoFile("w.safetensors", 999, "ptr", "ff"))
    assert files[1].etag == "ff" and files[0].etag == "abc"
    with pytest.raises(DownloadError):
        _parse_files({"not": "a list"})


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    tty = _Tty()
    bar = Progress("org/m@abc", 2_000_000, 2, stream=tty)
    bar.have(1_000_000)
    bar.advance(500_000)
    bar.file_done("a.safetensors", 1_500_000, "downloaded")
    bar.close()
    text = tty.getvalue()
    assert "\r\x1b[K" in text and "[##################......]  75%" in text and "1/2 files" in text
    assert "  a.safetensors  1.5 MB  downloaded\n" in text

    plain = io.StringIO()
    lines = Progress("org/m@abc", 2_000_000, 2, stream=plain)
    lines.advance(2_000_000)
    lines.file_done("a.safetensors", 2_000_000, "resumed")
    lines.close()
    assert plain.getvalue() == "  a.safetensors  2.0 MB  resumed\n"


def test_human_sizes() -> None:
    assert [human(n) for n in (12, 1_500, 16_100_000_000)] == ["12 B", "1.5 kB", "16.1 GB"]
