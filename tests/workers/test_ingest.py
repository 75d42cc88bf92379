"""Ingestion: every input format, every image mode, and every bad input we promise to survive.

Every fixture is built here, in tmp_path, with PIL / zipfile / tarfile / datasets.
"""

from __future__ import annotations

import io
import json
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import workers.ingest as ingest_module
from core.dataset import Sample, dataset_dir, read_manifest, read_samples
from core.errors import UserError
from core.settings import Settings
from core.store import ArtifactStore
from workers.ingest import IngestLimits, ingest

LIMITS = IngestLimits(
    max_archive_bytes=10 * 1024**2,
    max_archive_members=1000,
    max_compression_ratio=200.0,
    max_image_pixels=1_000_000,
    max_answer_chars=512,
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


def encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()


def jpeg(color=(200, 30, 30), size=(16, 12)) -> bytes:
    return encode(Image.new("RGB", size, color), "JPEG", quality=95)


def png(color=(30, 200, 30), size=(10, 8)) -> bytes:
    return encode(Image.new("RGB", size, color), "PNG")


def llava_row(row_id, image, question="What is shown?", answer="A thing.") -> dict:
    return {
        "id": row_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
            {"from": "human", "value": "A second question that must be ignored"},
            {"from": "gpt", "value": "A second answer that must be ignored"},
        ],
    }


def simple_row(row_id, image, question="What is shown?", answer="A thing.") -> dict:
    return {"id": row_id, "image": image, "question": question, "answer": answer}


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_folder(folder: Path, rows: list[dict], images: dict[str, bytes], name: str = "data.json") -> Path:
    """A dataset folder: the dataset file plus image files at the given relative paths."""
    folder.mkdir(parents=True, exist_ok=True)
    for rel, data in images.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    if name.endswith(".jsonl"):
        write_jsonl(folder / name, rows)
    else:
        (folder / name).write_text(json.dumps(rows), encoding="utf-8")
    return folder / name


def stored_image(store: ArtifactStore, sample: Sample) -> Image.Image:
    with Image.open(store.image_path(sample.image)) as im:
        im.load()
        return im


def stored_files(store: ArtifactStore) -> list[Path]:
    return [p for p in store.path("images").rglob("*") if p.is_file()]


def ingest_one_image(store: ArtifactStore, tmp_path: Path, name: str, data: bytes) -> Sample:
    """Ingest a one-row simple JSONL dataset around one image file; return its sample."""
    data_file = make_folder(tmp_path / "src", [simple_row("x", name)], {name: data}, name="data.jsonl")
    manifest = ingest(data_file, store, "ds", limits=LIMITS)
    assert manifest.problems == []
    [sample] = read_samples(store, "ds")
    return sample


def assert_close(actual, expected, tol=6) -> None:
    assert all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True)), (actual, expected)


# ---------------------------------------------------------------------------------------------------
# Formats


def test_llava_json_list(store, tmp_path):
    data_file = make_folder(
        tmp_path / "src",
        [llava_row("a", "images/a.jpg", "Which colour?", "Red."), llava_row(7, "b.png", answer="  Green. ")],
        {"images/a.jpg": jpeg(), "b.png": png()},
    )
    manifest = ingest(data_file, store, "ds", limits=LIMITS)
    assert (manifest.source_format, manifest.num_rows, manifest.num_samples, manifest.num_images) == (
        "llava",
        2,
        2,
        2,
    )
    assert manifest.problems == []
    a, b = read_samples(store, "ds")
    # First turn only, `<image>` token and its newline gone.
    assert (a.id, a.question, a.answer, a.width, a.height) == ("a", "Which colour?", "Red.", 16, 12)
    assert (b.id, b.answer, b.width, b.height) == ("7", "Green.", 10, 8)
    # The source subset is the first folder of the image path (coco/..., gqa/...), none without a folder.
    assert (a.source, b.source) == ("images", None)
    assert read_manifest(store, "ds") == manifest


def test_llava_jsonl_token_after_question(store, tmp_path):
    row = llava_row("a", "a.jpg")
    row["conversations"][0]["value"] = "Describe it.\n<image>"
    data_file = make_folder(tmp_path / "src", [row], {"a.jpg": jpeg()}, name="data.jsonl")
    manifest = ingest(data_file, store, "ds", limits=LIMITS)
    assert (manifest.source_format, manifest.num_samples) == ("llava", 1)
    assert read_samples(store, "ds")[0].question == "Describe it."


def test_simple_jsonl(store, tmp_path):
    data_file = make_folder(
        tmp_path / "src",
        [simple_row("q1", "a.jpg", "How many?", "Two."), simple_row("q2", "b.png", "Colour?", "Green.")],
        {"a.jpg": jpeg(), "b.png": png()},
        name="data.jsonl",
    )
    manifest = ingest(data_file, store, "ds", limits=LIMITS)
    assert (manifest.source_format, manifest.num_rows, manifest.num_samples) == ("jsonl", 2, 2)
    samples = read_samples(store, "ds")
    assert [(s.id, s.question, s.answer) for s in samples] == [
        ("q1", "How many?", "Two."),
        ("q2", "Colour?", "Green."),
    ]


def test_source_column_wins_and_is_checked(store, tmp_path):
    rows = [
        {**simple_row("q1", "coco/a.jpg", "How many?", "Two."), "source": "gqa"},
        simple_row("q2", "coco/b.png", "Colour?", "Green."),
        {**simple_row("q3", "c.png", "Colour?", "Blue."), "source": 7},
    ]
    data_file = make_folder(tmp_path / "src", rows, {"coco/a.jpg": jpeg(), "coco/b.png": png(), "c.png": png()}, name="data.jsonl")
    manifest = ingest(data_file, store, "ds", limits=LIMITS)
    assert [s.source for s in read_samples(store, "ds")] == ["gqa", "coco"]
    assert [(p.id, p.code) for p in manifest.problems] == [("q3", "invalid_row")]


def test_parquet_written_by_datasets(store, tmp_path):
    import datasets  # a hard dependency (the export writes with it): never skipped
    red = png((255, 0, 0), (6, 4))
    table = {
        "image": [
            {"bytes": red, "path": None},
            {"bytes": png((0, 0, 255), (3, 5)), "path": None},
            {"bytes": red, "path": None},  # same bytes as row 0: stored once
            {"bytes": b"not an image", "path": None},
        ],
        "question": ["q0", "q1", "q2", "q3"],
        "answer": ["a0", "a1", "a2", "a3"],
    }
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict(table).cast_column("image", datasets.Image()).to_parquet(str(path))

    manifest = ingest(path, store, "ds", limits=LIMITS)
    assert (manifest.source_format, manifest.num_rows, manifest.num_samples, manifest.num_images) == (
        "parquet",
        4,
        3,
        2,
    )
    samples = read_samples(store, "ds")
    # No id column: the row index is the id.
    assert [(s.id, s.question, s.answer, s.width, s.height) for s in samples] == [
        ("0", "q0", "a0", 6, 4),
        ("1", "q1", "a1", 3, 5),
        ("2", "q2", "a2", 6, 4),
    ]
    assert samples[0].image == samples[2].image
    [problem] = manifest.problems
    assert (problem.row, problem.id, problem.code) == (3, "3", "unreadable_image")


def _pack(kind: str, folder: Path, dest: Path) -> Path:
    """Pack `folder` under a top-level `mydata/` folder, with macOS debris beside it."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if kind == "zip":
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in files:
                zf.write(p, f"mydata/{p.relative_to(folder).as_posix()}")
            zf.writestr("__MACOSX/mydata/._data.json", b"\x00\x05\x16\x07junk")
    else:
        with tarfile.open(dest, "w:gz" if kind == "tar.gz" else "w") as tf:
            for p in files:
                tf.add(p, f"mydata/{p.relative_to(folder).as_posix()}")
            info = tarfile.TarInfo("mydata/.hidden.json")
            info.size = 2
            tf.addfile(info, io.BytesIO(b"{}"))
    return dest


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "folder"])
def test_archives_and_folder(store, tmp_path, kind):
    folder = tmp_path / "src"
    make_folder(
        folder,
        [
            llava_row("a", "images/a.jpg"),
            llava_row("b", "images/sub/b.png"),
            llava_row("c", "images/none.jpg"),
        ],
        {"images/a.jpg": jpeg(), "images/sub/b.png": png()},
    )
    source = folder if kind == "folder" else _pack(kind, folder, tmp_path / f"upload.{kind}")
    manifest = ingest(source, store, "ds", limits=LIMITS)
    assert (manifest.num_rows, manifest.num_samples, manifest.num_images) == (3, 2, 2)
    assert [(p.id, p.code) for p in manifest.problems] == [("c", "image_not_found")]
    assert [s.id for s in read_samples(store, "ds")] == ["a", "b"]
    # The extraction folder is gone.
    assert not store.path("tmp").exists() or list(store.path("tmp").iterdir()) == []


def test_archive_detected_by_content_and_paths_fall_back_to_root(store, tmp_path):
    # The dataset file sits in meta/, its images at the archive root: the root is the fallback.
    upload = tmp_path / "upload.bin"
    with zipfile.ZipFile(upload, "w") as zf:
        zf.writestr("meta/data.jsonl", json.dumps(simple_row("a", "pics/a.jpg")) + "\n")
        zf.writestr("pics/a.jpg", jpeg())
    manifest = ingest(upload, store, "ds", limits=LIMITS)
    assert manifest.num_samples == 1


# ---------------------------------------------------------------------------------------------------
# Image modes and storage


def test_rgb_jpeg_is_stored_as_original_bytes(store, tmp_path):
    data = jpeg()
    sample = ingest_one_image(store, tmp_path, "a.jpg", data)
    assert store.image_path(sample.image).read_bytes() == data


def test_cmyk_jpeg(store, tmp_path):
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    im = stored_image(store, ingest_one_image(store, tmp_path, "cmyk.jpg", data))
    assert (im.format, im.mode) == ("PNG", "RGB")
    assert_close(im.getpixel((4, 4)), (255, 0, 0))


def test_palette_with_transparency_goes_on_white(store, tmp_path):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((1, 0), 1)
    data = encode(im, "PNG", transparency=0)
    out = stored_image(store, ingest_one_image(store, tmp_path, "p.png", data))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent black -> white, not black
    assert out.getpixel((1, 0)) == (255, 0, 0)


def test_rgba_composited_on_white(store, tmp_path):
    im = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.putpixel((2, 0), (0, 0, 0, 128))
    out = stored_image(store, ingest_one_image(store, tmp_path, "rgba.png", encode(im, "PNG")))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)
    assert_close(out.getpixel((2, 0)), (127, 127, 127), tol=1)


def test_sixteen_bit_png_is_scaled_not_clipped(store, tmp_path):
    values = np.array([[0, 1000], [32896, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    out = stored_image(store, ingest_one_image(store, tmp_path, "deep.png", data))
    assert out.mode == "RGB"
    # 1000/257 rounds to 4 (clipping would give 255); 32896 = 128 * 257.
    assert [out.getpixel(xy) for xy in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [
        (0, 0, 0),
        (4, 4, 4),
        (128, 128, 128),
        (255, 255, 255),
    ]


@pytest.mark.parametrize(
    ("mode", "value", "expected"), [("L", 100, (100, 100, 100)), ("1", 1, (255, 255, 255))]
)
def test_grey_and_bilevel(store, tmp_path, mode, value, expected):
    data = encode(Image.new(mode, (5, 5), value), "PNG")
    out = stored_image(store, ingest_one_image(store, tmp_path, "g.png", data))
    assert (out.mode, out.getpixel((2, 2))) == ("RGB", expected)


def test_exif_rotated_jpeg(store, tmp_path):
    im = Image.new("RGB", (20, 10), (255, 0, 0))
    im.paste((0, 0, 255), (10, 0, 20, 10))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    sample = ingest_one_image(store, tmp_path, "rot.jpg", encode(im, "JPEG", quality=95, exif=exif))
    assert (sample.width, sample.height) == (10, 20)
    out = stored_image(store, sample)
    assert (out.format, out.size) == ("PNG", (10, 20))
    assert_close(out.getpixel((5, 2)), (255, 0, 0))  # left became top
    assert_close(out.getpixel((5, 17)), (0, 0, 255))


def test_same_image_twice_is_decoded_and_stored_once(store, tmp_path, monkeypatch):
    calls = []
    real = ingest_module._normalise_image
    monkeypatch.setattr(ingest_module, "_normalise_image", lambda *a: calls.append(a) or real(*a))
    data_file = make_folder(
        tmp_path / "src",
        [simple_row("a", "a.png"), simple_row("b", "./a.png"), simple_row("c", "copy.png")],
        {"a.png": png(), "copy.png": png()},
        name="data.jsonl",
    )
    manifest = ingest(data_file, store, "ds", limits=LIMITS)
    assert (manifest.num_samples, manifest.num_images) == (3, 1)
    assert len({s.image for s in read_samples(store, "ds")}) == 1
    assert len(stored_files(store)) == 1
    assert len(calls) == 2  # a.png once (two rows), copy.png once: same bytes, same ref


# ---------------------------------------------------------------------------------------------------
# Bad archives: the whole upload is refused


def _zip_with(tmp_path: Path, name: str, data: bytes = b"x", attr: int | None = None) -> Path:
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data.jsonl", json.dumps(simple_row("a", "a.jpg")) + "\n")
        zf.writestr("a.jpg", jpeg())
        info = zipfile.ZipInfo(name)
        if attr is not None:
            info.create_system = 3
            info.external_attr = attr << 16
        zf.writestr(info, data)
    return path


def _refused(source: Path, store: ArtifactStore, limits: IngestLimits = LIMITS) -> UserError:
    with pytest.raises(UserError) as info:
        ingest(source, store, "ds", limits=limits)
    assert not dataset_dir(store, "ds").exists()
    assert not store.path("tmp").exists() or list(store.path("tmp").iterdir()) == []
    return info.value


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil.txt", "images/../../evil.txt"])
def test_zip_slip_refused(store, tmp_path, name):
    err = _refused(_zip_with(tmp_path, name), store)
    assert err.code == "unsafe_archive"
    assert "zip slip" in err.message
    assert not (tmp_path / "evil.txt").exists() and not (store.root / "evil.txt").exists()


def test_zip_symlink_refused(store, tmp_path):
    err = _refused(_zip_with(tmp_path, "link.jpg", b"/etc/passwd", attr=stat.S_IFLNK | 0o777), store)
    assert (err.code, "symlink" in err.message) == ("unsafe_archive", True)


@pytest.mark.parametrize("member_type", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE])
def test_tar_link_or_device_refused(store, tmp_path, member_type):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tf:
        body = (json.dumps(simple_row("a", "a.jpg")) + "\n").encode()
        info = tarfile.TarInfo("data.jsonl")
        info.size = len(body)
        tf.addfile(info, io.BytesIO(body))
        special = tarfile.TarInfo("a.jpg")
        special.type = member_type
        special.linkname = "/etc/passwd"
        tf.addfile(special)
    assert _refused(path, store).code == "unsafe_archive"


def test_tar_slip_refused(store, tmp_path):
    path = tmp_path / "bad.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("../evil.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"[]"))
    assert _refused(path, store).code == "unsafe_archive"


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archive_over_declared_size_refused(store, tmp_path, kind):
    folder = tmp_path / "src"
    make_folder(folder, [simple_row("a", "a.png")], {"a.png": png(size=(64, 64)), "pad.bin": bytes(5000)})
    source = _pack(kind, folder, tmp_path / f"upload.{kind}")
    small = IngestLimits(4000, 1000, 200.0, 1_000_000, 512)
    err = _refused(source, store, small)
    assert err.code == "archive_too_large"


def test_zip_with_lying_size_header_refused(store, tmp_path):
    # A valid dataset plus a 5000-byte stored member whose headers (local and central) declare 10 bytes:
    # the declared total passes the 1000-byte limit, the CRC is the real content's. Only the count of
    # the bytes really extracted can refuse it (without that cap the dataset would be ingested).
    path = tmp_path / "liar.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("data.jsonl", json.dumps(simple_row("a", "a.png")) + "\n")
        zf.writestr("a.png", png())
        zf.writestr("big.bin", b"\x01" * 5000)
    with zipfile.ZipFile(path) as zf:
        local = zf.getinfo("big.bin").header_offset
    raw = bytearray(path.read_bytes())
    central = raw.rindex(b"big.bin") - 46  # the name follows a 46-byte central directory header
    assert raw[local : local + 4] == b"PK\x03\x04" and raw[central : central + 4] == b"PK\x01\x02"
    raw[local + 22 : local + 26] = (10).to_bytes(4, "little")  # uncompressed size, local header
    raw[central + 24 : central + 28] = (10).to_bytes(4, "little")  # uncompressed size, central directory
    path.write_bytes(bytes(raw))
    limits = IngestLimits(1000, 1000, 200.0, 1_000_000, 512)
    with zipfile.ZipFile(path) as zf:
        assert sum(i.file_size for i in zf.infolist()) < limits.max_archive_bytes  # the header check passes
    err = _refused(path, store, limits)
    assert err.code == "archive_too_large" and "content exceeds" in err.message, err.message


def test_zip_bomb_ratio_refused(store, tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data.jsonl", json.dumps(simple_row("a", "a.jpg")) + "\n")
        zf.writestr("zeros.bin", bytes(4 * 1024**2))  # ~1000x
    err = _refused(path, store)
    assert (err.code, "zeros.bin" in err.message) == ("compression_ratio_too_high", True)


def test_too_many_members_refused(store, tmp_path):
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(6):
            zf.writestr(f"f{i}.txt", b"x")
    assert _refused(path, store, IngestLimits(10**6, 5, 200.0, 10**6, 512)).code == "too_many_members"


def test_corrupt_archive_refused(store, tmp_path):
    path = tmp_path / "broken.zip"
    path.write_bytes(b"PK\x03\x04 this is not really a zip")
    assert _refused(path, store).code == "invalid_archive"


def test_dataset_file_lookup(store, tmp_path):
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "images" / "a.jpg").write_bytes(jpeg())
    assert _refused(empty, store).code == "no_dataset_file"

    two = tmp_path / "two"
    make_folder(two, [simple_row("a", "a.jpg")], {"a.jpg": jpeg()}, name="one.jsonl")
    (two / "other.json").write_text("[]")
    err = _refused(two, store)
    assert err.code == "ambiguous_dataset_file"
    assert "one.jsonl" in err.message and "other.json" in err.message
    # Naming the format picks the one file that can hold it.
    (two / "x.parquet").write_bytes(b"")
    with pytest.raises(UserError) as info:
        ingest(two, store, "ds", limits=LIMITS, source_format="parquet")
    assert info.value.code == "invalid_parquet"


# ---------------------------------------------------------------------------------------------------
# Bad rows: reported one by one, good rows kept


def test_row_problems_are_reported_and_good_rows_kept(store, tmp_path):
    folder = tmp_path / "src"
    images = {
        "good.jpg": jpeg(),
        "big.png": png(size=(40, 40)),  # 1600 px > 1000 px limit below
        "truncated.jpg": jpeg(size=(64, 64))[:300],
        "text.jpg": b"hello, I am a text file",
    }
    for rel, data in images.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    ok = json.dumps(simple_row("ok", "good.jpg")).encode()
    lines = [
        ok,  # 0
        json.dumps({"id": "no-image", "question": "Q?", "answer": "A."}).encode(),  # 1
        json.dumps({"id": "no-answer", "image": "good.jpg", "question": "Q?"}).encode(),  # 2
        json.dumps(simple_row("blank-answer", "good.jpg", answer="   ")).encode(),  # 3
        ok,  # 4: duplicate id
        json.dumps(simple_row("missing", "nope.jpg")).encode(),  # 5
        json.dumps(simple_row("escape", "../../etc/passwd")).encode(),  # 6
        json.dumps(simple_row("big", "big.png")).encode(),  # 7
        json.dumps(simple_row("truncated", "truncated.jpg")).encode(),  # 8
        json.dumps(simple_row("text", "text.jpg")).encode(),  # 9
        b'{"id": "latin1", "image": "good.jpg", "question": "caf\xe9", "answer": "A."}',  # 10
        b'{"id": "broken", "image": ',  # 11
        json.dumps(simple_row("long", "good.jpg", answer="x" * 512)).encode(),  # 12
        json.dumps(simple_row("just-fits", "good.jpg", answer="y" * 511)).encode(),  # 13
        json.dumps(["not", "an", "object"]).encode(),  # 14
        json.dumps({"id": "no-question", "image": "good.jpg", "answer": "A."}).encode(),  # 15
        json.dumps(simple_row("ok2", "good.jpg")).encode(),  # 16
    ]
    (folder / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    limits = IngestLimits(10**7, 1000, 200.0, 1000, 512)

    manifest = ingest(folder / "data.jsonl", store, "ds", limits=limits)

    assert [s.id for s in read_samples(store, "ds")] == ["ok", "just-fits", "ok2"]
    assert (manifest.num_rows, manifest.num_samples, manifest.num_images) == (17, 3, 1)
    got = {p.row: (p.id, p.code) for p in manifest.problems}
    assert got == {
        1: ("no-image", "missing_image"),
        2: ("no-answer", "empty_answer"),
        3: ("blank-answer", "empty_answer"),
        4: ("ok", "duplicate_id"),
        5: ("missing", "image_not_found"),
        6: ("escape", "unsafe_path"),
        7: ("big", "image_too_large"),
        8: ("truncated", "unreadable_image"),
        9: ("text", "unreadable_image"),
        10: (None, "invalid_utf8"),
        11: (None, "invalid_json"),
        12: ("long", "answer_too_long"),
        14: (None, "invalid_row"),
        15: ("no-question", "missing_question"),
    }
    reasons = {p.row: p.reason for p in manifest.problems}
    assert reasons[12] == "skipped (512 chars >= 512)"
    assert reasons[4] == "id 'ok' already used by row 0"
    assert "1600 pixels > limit 1000" in reasons[7]
    assert "line 11" in reasons[10]
    # The manifest on disk says the same.
    assert read_manifest(store, "ds") == manifest


def test_json_not_a_list(store, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"rows": [simple_row("a", "a.jpg")]}))
    err = _refused(path, store)
    assert err.code == "not_a_list"


def test_json_file_not_utf8(store, tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b'[{"id": "a", "question": "caf\xe9"}]')
    assert _refused(path, store).code == "invalid_utf8"


def test_json_file_not_json(store, tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"id": "a",')
    assert _refused(path, store).code == "invalid_json"


def test_no_usable_samples_names_the_first_problems(store, tmp_path):
    data_file = make_folder(
        tmp_path / "src", [simple_row("a", "gone.jpg"), simple_row("b", None)], {}, name="data.jsonl"
    )
    err = _refused(data_file, store)
    assert err.code == "no_usable_samples"
    assert "image_not_found" in err.message and "missing_image" in err.message


def test_bad_arguments(store, tmp_path):
    data_file = make_folder(tmp_path / "src", [simple_row("a", "a.jpg")], {"a.jpg": jpeg()}, name="d.jsonl")
    with pytest.raises(UserError) as info:
        ingest(data_file, store, "ds", limits=LIMITS, source_format="csv")
    assert info.value.code == "invalid_source_format"
    with pytest.raises(UserError) as info:
        ingest(data_file, store, "../escape", limits=LIMITS)
    assert info.value.code == "invalid_dataset_id"
    with pytest.raises(UserError) as info:
        ingest(data_file, store, "ds", limits=LIMITS, source_format="parquet")
    assert info.value.code == "format_mismatch"


def test_limits_from_settings_and_validation():
    limits = IngestLimits.from_settings(Settings(max_answer_chars=100, max_image_pixels=5000))
    assert (limits.max_answer_chars, limits.max_image_pixels) == (100, 5000)
    with pytest.raises(ValueError, match="max_archive_members"):
        IngestLimits(1, 0, 200.0, 1, 1)


def test_extraction_counts_real_bytes(tmp_path):
    # What a lying header would let through: the bytes actually written are counted and capped.
    counter = ingest_module._ByteCounter(IngestLimits(4000, 10, 200.0, 10, 10))
    with pytest.raises(UserError) as info:
        counter.copy(io.BytesIO(bytes(5000)), tmp_path / "out.bin")
    assert info.value.code == "archive_too_large"


def test_json_lines_saved_as_json(store, tmp_path):
    rows = [simple_row("a", "a.jpg"), simple_row("b", "a.jpg")]
    data_file = make_folder(tmp_path / "src", rows, {"a.jpg": jpeg()}, name="data.jsonl")
    data_file = data_file.rename(data_file.with_suffix(".json"))
    assert ingest(data_file, store, "ds", limits=LIMITS).num_samples == 2
