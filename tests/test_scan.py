"""The folder scan: recursive, filtered by extension, streaming."""

import tracemalloc

from encoder.scan import scan_images


def test_scan_is_recursive_and_filters_by_extension(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("x.jpg", "a/y.PNG", "a/b/z.webp", "a/readme.txt", "a/b/data.csv"):
        (tmp_path / name).write_bytes(b"1")
    assert sorted(e.id for e in scan_images(tmp_path)) == ["a/b/z.webp", "a/y.PNG", "x.jpg"]


def test_directory_named_like_an_image_is_listed_and_descended(tmp_path):
    (tmp_path / "album.jpg").mkdir()
    (tmp_path / "album.jpg" / "inner.jpg").write_bytes(b"1")
    assert sorted(e.id for e in scan_images(tmp_path)) == ["album.jpg", "album.jpg/inner.jpg"]


def test_symlinked_directories_are_not_descended(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "p.jpg").write_bytes(b"1")
    (tmp_path / "loop").symlink_to(tmp_path)
    assert [e.id for e in scan_images(tmp_path)] == ["real/p.jpg"]


def test_scan_streams_without_holding_the_listing(tmp_path):
    for i in range(20000):
        (tmp_path / f"{i:06d}.jpg").touch()
    tracemalloc.start()
    entries = scan_images(tmp_path)
    count = 0
    for _ in entries:
        count += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 20000
    assert peak < 2_000_000, f"scan held {peak} bytes for 20,000 files"
