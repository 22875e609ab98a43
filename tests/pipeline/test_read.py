import os
import subprocess
import sys

import pytest

from pipeline.config import ConfigError
from pipeline.config_sections import InputConfig
from pipeline.shards import list_shards

LIST = "import sys; from pipeline.config_sections import InputConfig; from pipeline.shards import list_shards; " \
       "print([s.name for s in list_shards(InputConfig(paths=sys.argv[1:]))])"


def test_same_file_names_in_two_folders_get_distinct_names_stable_across_runs(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "shard-0.tar").write_bytes(b"")
    paths = [str(tmp_path / "a" / "*.tar"), str(tmp_path / "b" / "*.tar")]
    names = [s.name for s in list_shards(InputConfig(paths=paths))]
    assert len(set(names)) == 2 and all(n.startswith("shard-0-") for n in names)
    runs = {subprocess.run([sys.executable, "-c", LIST, *paths], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert runs == {f"{names}\n"}  # a rerun must find the same part files to skip


def test_missing_input_and_unknown_format_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="^input.paths"):
        list_shards(InputConfig(paths=[str(tmp_path / "none-*.tar")]))
    with pytest.raises(ConfigError, match="^input.format"):
        list_shards(InputConfig(paths=[str(tmp_path / "x.zip")]))


def test_a_source_row_holds_only_the_columns_the_job_needs():
    from pipeline.read import _webdataset_row, table_row
    from actors.row_schemas import SOURCE

    cfg = InputConfig(id_column="id")
    row = table_row({"id": 7, "image": b"png", "question": b"q?", "answer": b"\xff", "big": "x" * 10, "text": "t"},
                    cfg, "s", columns={"question", "answer", "missing"})
    assert list(row) == SOURCE.names and row["key"] == "7"
    assert row["fields"] == {"question": "q?", "answer": None}  # not UTF-8: null; a missing column stays absent
    sample = {"__key__": "k", "__url__": "/d/s.tar", "png": b"png", "txt": b"a caption", "cls": b"3",
              "json": b'{"question": "q?", "meta": {"lang": "en", "n": [1, 2]}}'}
    row = _webdataset_row(sample, InputConfig(), {"/d/s.tar": "s"}, columns=["question", "meta", "txt"])
    assert list(row) == SOURCE.names and row["error"] is None
    assert row["fields"] == {"question": "q?", "meta": {"lang": "en", "n": [1, 2]}, "txt": "a caption"}


def test_a_shards_row_count_is_known_before_it_is_read_as_ray_reads_it(tmp_path, ray_address):
    """inspect_shard counts a tar's samples as Ray's WebDataset reader groups members (runs of one key, names
    without an extension skipped) and a parquet file's rows; the any-order commit relies on both."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipeline.shards import Shard, inspect_shard

    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.png", "a.json", "dir/b.png", "dir/b.json", "README", "c.d.png", "c.d.json", "e.png"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        folder = tarfile.TarInfo("dir2")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    assert inspect_shard(Shard("odd", str(path)), "webdataset") == (None, 4)
    assert ray.data.read_webdataset(str(path), decoder=None).count() == 4
    pq.write_table(pa.table({"x": list(range(7))}), tmp_path / "p.parquet")
    assert inspect_shard(Shard("p", str(tmp_path / "p.parquet")), "parquet") == (None, 7)
    (tmp_path / "bad.parquet").write_bytes(b"nope")
    why, rows = inspect_shard(Shard("bad", str(tmp_path / "bad.parquet")), "parquet")
    assert why.startswith("unreadable shard") and rows is None
