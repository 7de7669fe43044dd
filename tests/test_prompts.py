"""Prompt files: one prompt a line, UTF-8; errors name the file and the line."""

import pytest

from selfforcing.data.prompts import read_prompt_file, write_prompt_file


def test_round_trip_and_stripping(tmp_path):
    prompts = ["the digit 3 moves right", "  une vidéo d'un chat  ", "数字 7 向上移动"]
    path = write_prompt_file(tmp_path / "sub" / "p.txt", prompts)  # parent folders created
    assert read_prompt_file(path) == [p.strip() for p in prompts]
    assert open(path, encoding="utf-8").read() == "".join(p.strip() + "\n" for p in prompts)


def test_blank_lines_whitespace_crlf_and_bom_are_ignored(tmp_path):
    path = tmp_path / "q.txt"
    path.write_bytes("\ufeff\n  first  \r\n\n\t \n second\tline\nlast".encode("utf-8"))
    assert read_prompt_file(path) == ["first", "second\tline", "last"]


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("good line\n\nstill fine é\n".encode() + b"caf\xe9 latin-1\nmore\n")
    with pytest.raises(ValueError, match=r"bad\.txt:4: not valid UTF-8"):
        read_prompt_file(path)


def test_missing_empty_and_directory_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n \n\t\n")
    for name in ("empty.txt", "blank.txt"):
        with pytest.raises(ValueError, match=rf"{name}: no prompts"):
            read_prompt_file(tmp_path / name)
    with pytest.raises(ValueError, match="is a directory"):
        read_prompt_file(tmp_path)


def test_write_rejects_prompts_that_would_not_read_back(tmp_path):
    for bad, position in ((["ok", "two\nlines"], 1), (["   "], 0), (["a", "b", "c\rd"], 2), (["a", 3], 1)):
        with pytest.raises(ValueError, match=f"prompt {position}"):
            write_prompt_file(tmp_path / "p.txt", bad)
    with pytest.raises(ValueError, match="no prompts"):
        write_prompt_file(tmp_path / "p.txt", [])
    assert not (tmp_path / "p.txt").exists()
