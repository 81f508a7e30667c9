"""Output safety: atomic writers with the user's umask, one-line file-system errors, and output paths checked by
every writing command before any model is loaded."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path

import pytest

from clipheads.errors import OutputError
from clipheads.files import check_output_dir, check_output_file, write_bytes_atomic, write_json_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_results_are_written_with_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        write_bytes_atomic(tmp_path / "b.png", b"\x89PNG\r\n\x1a\n")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o666 & ~umask
    assert _mode(tmp_path / "b.png") == 0o666 & ~umask


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomic(path, {"x": 1})
    path.chmod(0o640)
    write_json_atomic(path, {"x": 2})
    assert _mode(path) == 0o640 and json.loads(path.read_text()) == {"x": 2}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT])
def test_errors_while_writing_are_one_line_and_keep_the_payload(tmp_path, monkeypatch, code):
    def fail(*_):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OutputError) as caught:
        write_json_atomic(tmp_path / "r.json", {"mean_recall": 0.5})
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "r.json") in message and os.strerror(code) in message
    assert json.loads(caught.value.payload) == {"mean_recall": 0.5}
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone


def test_check_output_file_refuses_each_kind_of_bad_path(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "photo.json").write_bytes(b"\xff\xd8\xff\xe0 a JPEG, not JSON")
    with pytest.raises(OutputError, match="it is a folder"):
        check_output_file(tmp_path / "folder")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_file(tmp_path / "file" / "sub" / "r.json")
    with pytest.raises(OutputError, match="is not a JSON file"):
        check_output_file(tmp_path / "photo.json")
    assert (tmp_path / "photo.json").read_bytes().startswith(b"\xff\xd8")
    write_json_atomic(tmp_path / "mine.json", {"x": 1})
    assert check_output_file(tmp_path / "mine.json") == tmp_path / "mine.json"  # its own kind is replaced
    assert check_output_file(tmp_path / "new" / "deeper" / "r.json")  # created later, nothing now
    assert not (tmp_path / "new").exists()


def test_check_output_dir_refuses_each_kind_of_bad_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="it is a file"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file" / "out")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("my notes")
    with pytest.raises(OutputError, match="is not an HTML file"):
        check_output_dir(out, {"report.html": "html"})
    (out / "mask_mine.json").write_text("not json")
    with pytest.raises(OutputError, match="mask_mine.json"):
        check_output_dir(out, {"mask_*.json": "json"})
    with pytest.raises(OutputError, match="holds no training.json"):
        check_output_dir(out, marker="training.json")
    (out / ".config.json.ab12.tmp").write_text("")
    assert check_output_dir(tmp_path / "empty", marker="config.json")


def test_a_results_folder_lists_its_outputs_and_refuses_a_users_file_of_the_same_kind(tmp_path):
    from clipheads.files import MANIFEST, read_manifest

    out = tmp_path / "out"
    products = {"summary.json": "json", "*.png": "png"}
    check_output_dir(out, products)
    write_json_atomic(out / "summary.json", {"x": 1})
    write_bytes_atomic(out / "a.png", b"\x89PNG\r\n\x1a\n")
    assert read_manifest(out) == {"summary.json", "a.png"}
    assert check_output_dir(out, products) == out  # clipheads' own results: replaced on the next run
    (out / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nmine")  # the user's picture under a product name
    with pytest.raises(OutputError, match="b.png.*not on the list of files clipheads wrote") as info:
        check_output_dir(out, products)
    assert "\n" not in str(info.value)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text('{"my": "numbers"}')  # valid JSON, but the user's
    with pytest.raises(OutputError, match="summary.json.*not on the list of files clipheads wrote"):
        check_output_dir(mine, products)
    (mine / "summary.json").unlink()
    (mine / MANIFEST).write_text("my notes")  # a file under the list's name that is not clipheads' list
    with pytest.raises(OutputError, match="not clipheads' list"):
        check_output_dir(mine, products)
    assert (mine / MANIFEST).read_text() == "my notes"
    other = tmp_path / "other"  # a folder never checked as a results folder gets no list
    write_json_atomic(other / "r.json", {"x": 1})
    assert not (other / MANIFEST).exists()


def _deny_writes(monkeypatch, folder: Path) -> None:
    """No permission to write in ``folder``: chmod 0o500, or (as root, who ignores it) a denying ``os.access``."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        return
    access = os.access

    def deny(path, mode, *args, **kwargs):
        if Path(path) == folder and mode & os.W_OK:
            return False
        return access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", deny)


def test_no_permission_is_refused_before_work(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    _deny_writes(monkeypatch, locked)
    try:
        with pytest.raises(OutputError, match="no permission to write in"):
            check_output_dir(locked / "out")
        with pytest.raises(OutputError, match="no permission to write in"):
            check_output_file(locked / "r.json")
    finally:
        locked.chmod(0o700)


# every command that writes, with a bad output path; {bad} is replaced by the path
COMMANDS = {
    "eval": ["eval", "--task", "retrieval", "--data", "d.json", "--out", "{bad}"],
    "eval --cache-dir": ["eval", "--task", "retrieval", "--data", "d.json", "--out", "{ok}/r.json",
                         "--cache-dir", "{bad}"],
    "mask": ["mask", "--heads", "L0.H0", "--out", "{bad}"],
    "describe": ["describe", "--data", "images", "--out", "{bad}"],
    "ccs": ["ccs", "--data", "images", "--out", "{bad}"],
    "prune": ["prune", "--ccs", "ccs.json", "--top", "1", "--out", "{bad}"],
    "finetune": ["finetune", "--data", "d.json", "--out", "{bad}"],
    "scan": ["scan", "--data", "d.json", "--out", "{bad}"],
    "search": ["search", "--data", "d.json", "--out", "{bad}"],
    "layers": ["layers", "--data", "d.json", "--out", "{bad}"],
    "captioner train": ["captioner", "train", "--data", "d.json", "--out", "{bad}"],
    "captioner generate": ["captioner", "generate", "-c", "cap", "--images", "images", "--out", "{bad}"],
    "world make": ["world", "make", "--out", "{bad}", "--n-train", "0"],
    "world train": ["world", "train", "--data", "world", "--out", "{bad}"],
    "demo": ["demo", "--quick", "--out", "{bad}"],
}
FILE_OUTPUTS = ("eval", "mask", "captioner generate")


PROGRESS = re.compile(r"\d+%\||^\[\d+/\d+\] .+ done in ")  # tqdm bars and finished stages on stderr


def _one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture()
def inputs(tmp_path, monkeypatch):
    """The commands' input paths of COMMANDS, present in the working folder: input paths are checked while the
    command line is parsed, so the output check is reached only when they exist."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.json").write_text("{}")
    (tmp_path / "ccs.json").write_text("{}")
    for folder in ("images", "world", "cap"):
        (tmp_path / folder).mkdir()


def _args(name: str, bad: Path, ok: Path) -> list[str]:
    return [part.replace("{bad}", str(bad)).replace("{ok}", str(ok)) for part in COMMANDS[name]]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_writing_command_refuses_a_path_under_a_file(tmp_path, run_main, inputs, name):
    (tmp_path / "file").write_text("mine")
    code, _, err = run_main(*_args(name, tmp_path / "file" / "out", tmp_path), forbid_load=True)
    assert "is a file, not a folder" in _one_error_line(code, err)
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_writing_command_refuses_an_unwritable_folder(tmp_path, run_main, inputs, monkeypatch, name):
    locked = tmp_path / "locked"
    locked.mkdir()
    _deny_writes(monkeypatch, locked)
    try:
        code, _, err = run_main(*_args(name, locked / "out", tmp_path), forbid_load=True)
    finally:
        locked.chmod(0o700)
    assert "no permission" in _one_error_line(code, err)


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "eval --cache-dir"])
def test_a_folder_where_a_file_is_expected_and_a_file_where_a_folder_is(tmp_path, run_main, inputs, name):
    if name in FILE_OUTPUTS:
        (tmp_path / "bad").mkdir()
        expected = "it is a folder"
    else:
        (tmp_path / "bad").write_text("mine")
        expected = "it is a file"
    code, _, err = run_main(*_args(name, tmp_path / "bad", tmp_path), forbid_load=True)
    assert expected in _one_error_line(code, err)


def test_a_full_disk_at_the_end_of_an_evaluation_prints_the_result(tmp_path, run_main, monkeypatch):
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i, colour in enumerate([(220, 30, 30), (30, 200, 40), (40, 60, 220)]):
        Image.new("RGB", (32, 32), colour).save(tmp_path / "img" / f"{i}.png")
    images = [{"filename": f"{i}.png", "filepath": "img", "split": "test", "sentences": [{"raw": f"colour {i}"}]}
              for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps({"images": images}))

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    code, out, err = run_main("eval", "--task", "retrieval", "--data", tmp_path / "d.json", "--split", "test",
                              "--out", tmp_path / "r.json")
    line = _one_error_line(code, err)
    assert str(tmp_path / "r.json") in line and "disk is full" in line and "printed on standard output" in line
    report = json.loads(out[out.index("{\n"):])
    assert report["task"] == "retrieval" and "mean_recall" in report["metrics"]
    assert not (tmp_path / "r.json").exists()


def test_a_write_outside_files_py_that_fails_is_one_line(tmp_path, run_main, monkeypatch):
    def full(self, data):  # as a library's own save function meets a full disk (the world's images are plain writes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    code, _, err = run_main("world", "make", "--out", tmp_path / "w", "--n-train", "0", "--n-val", "1", "--n-test",
                            "0", "--n-pairs", "0", "--n-groups", "0")
    line = _one_error_line(code, err)
    assert "file-system error at" in line and "val_ood_00000.png" in line and "disk is full" in line


def test_a_read_only_file_system_is_named(tmp_path, monkeypatch, run_main):
    access, statvfs = os.access, os.statvfs

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if mode & os.W_OK else access(p, mode, *a, **k))
    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly() if Path(p) == tmp_path else statvfs(p))
    code, _, err = run_main("mask", "--heads", "L0.H0", "--out", tmp_path / "m.json", forbid_load=True)
    assert "the file system is read-only" in _one_error_line(code, err)
    assert not (tmp_path / "m.json").exists()
