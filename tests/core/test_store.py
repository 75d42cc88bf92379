import os
from pathlib import Path

import pytest

from core.errors import UserError
from core.store import ArtifactStore, atomic_writer, safe_join, safe_relpath


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "C:/win", "a\x00b", "", "..", "a/..\\..\\b"])
def test_safe_relpath_refuses_escapes(bad):
    with pytest.raises(UserError) as err:
        safe_relpath(bad)
    assert err.value.code == "invalid_path"


def test_safe_relpath_normalises():
    assert str(safe_relpath("./a//b/./c.jpg")) == "a/b/c.jpg"
    assert str(safe_relpath("a\\b.jpg")) == "a/b.jpg"


def test_safe_join_refuses_symlink_escape(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(UserError):
        safe_join(root, "link/secret")
    assert safe_join(root, "sub/x.jpg") == (root / "sub" / "x.jpg").resolve()


def test_atomic_writer_leaves_old_file_on_failure(tmp_path):
    dest = tmp_path / "f.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_writer(dest, "w") as fh:
        fh.write("half")
        raise RuntimeError("boom")
    assert dest.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]  # no temp file left behind


def test_images_are_content_addressed_and_stored_once(tmp_path):
    store = ArtifactStore(tmp_path)
    ref = store.put_image_bytes(b"\x89PNG fake")
    assert ref == store.put_image_bytes(b"\x89PNG fake")
    path = store.image_path(ref)
    assert path.read_bytes() == b"\x89PNG fake"
    assert path.is_relative_to(Path(tmp_path).resolve())
    assert len([p for p in (tmp_path / "images").rglob("*") if p.is_file()]) == 1
    with pytest.raises(UserError):
        store.image_path("../../etc/passwd")


def test_settings_read_from_environment(monkeypatch, tmp_path):
    from core.settings import Settings

    monkeypatch.setenv("MIADPO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("REDIS_URL", "redis://example:1/2")
    monkeypatch.setenv("MIADPO_MAX_ANSWER_CHARS", "100")
    s = Settings()
    assert s.data_dir == tmp_path and s.redis_url == "redis://example:1/2" and s.max_answer_chars == 100
    monkeypatch.setenv("MIADPO_MAX_ANSWER_CHARS", "-1")
    with pytest.raises(ValueError):
        Settings()
