"""URL lists as they come: a LAION-style Parquet list whose extra columns (uid, similarity, NSFW, width) travel
through img2dataset into the shards and the CapFilt rows with their types, and whose repeated URLs each keep their
own row; CC3M's headerless, unquoted TSV read byte for byte."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from integration_helpers import ingest, read_shards
from PIL import Image

from pipelines import storage
from pipelines.capfilt.commit import Unit, write_unit
from pipelines.capfilt.decode import ShardDecoder
from pipelines.capfilt.rows import build_rows, check_extra_columns, ingest_extra_fields, output_schema
from pipelines.config import IngestConfig
from pipelines.ingest import IngestError, prepare_url_list
from pipelines.shards import list_shards
from pipelines.world import serve_directory
from tests.unit.capfilt_settings import make_settings

pytestmark = pytest.mark.integration

EXTRA = ["uid", "similarity", "NSFW", "WIDTH"]


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_a_laion_list_carries_its_extra_columns_into_the_shards_and_the_capfilt_rows_and_repeats_keep_their_rows(
    tmp_path,
):
    site = tmp_path / "site"
    site.mkdir()
    for i in range(3):
        (site / f"{i}.jpg").write_bytes(_jpeg((60 * i, 100, 200)))
    with serve_directory(str(site)) as base:
        urls = [f"{base}/0.jpg", f"{base}/1.jpg", f"{base}/0.jpg", f"{base}/2.jpg", f"{base}/missing.jpg"]
        listed = pa.table(
            {
                "URL": urls,
                "TEXT": ["a red one", "007", "the same picture, another caption", "a blue one", "gone"],
                "uid": ["u0", "u1", "u2", "u3", "u4"],
                "similarity": pa.array([0.31, 0.29, None, 0.4, 0.35], pa.float64()),
                "NSFW": pa.array(["UNLIKELY", "UNSURE", "UNLIKELY", "NSFW", "UNLIKELY"]).dictionary_encode(),
                "WIDTH": pa.array([40, 40, 40, 40, 640], pa.int32()),
                "unused": [1, 2, 3, 4, 5],
            }
        )
        (tmp_path / "list").mkdir()
        pq.write_table(listed, tmp_path / "list" / "part-0.parquet")
        root = str(tmp_path / "run")
        proc, seconds = ingest(
            root,
            f"ingest.url_list={tmp_path / 'list'}",
            "ingest.url_col=URL",
            "ingest.caption_col=TEXT",
            f"ingest.extra_columns=[{', '.join(EXTRA)}]",
            "ingest.shard_size=10",
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = storage.RunRoot(root).ingest("web")
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    assert manifest["input"]["extra_columns"] == {
        "uid": "string",
        "similarity": "double",
        "NSFW": "string",  # dictionary-encoded in the list: its values
        "WIDTH": "int32",
    }
    assert manifest["input"]["repeated_urls_within_files"] == 1
    assert manifest["total"] == 5 and manifest["successes"] == 4

    # The repeated URL: two rows, two keys, two downloads, each with its own caption and extra values.
    want = {r["uid"]: r for r in listed.to_pylist()}
    samples, rows = read_shards(out)
    assert len(samples) == 4 and len(rows) == 5
    by_uid = {r["uid"]: r for r in rows}
    assert by_uid.keys() == want.keys()
    for uid, r in by_uid.items():
        assert (r["url"], r["caption"], r["similarity"], r["NSFW"], r["WIDTH"]) == (
            want[uid]["URL"],
            want[uid]["TEXT"],
            want[uid]["similarity"],
            want[uid]["NSFW"],
            want[uid]["WIDTH"],
        )
        assert r["status"] == ("failed_to_download" if uid == "u4" else "success")
    assert by_uid["u0"]["key"] != by_uid["u2"]["key"] and by_uid["u0"]["url"] == by_uid["u2"]["url"]
    shard_schema = pq.read_schema(Path(out) / "00000.parquet")
    assert [str(shard_schema.field(c).type) for c in EXTRA] == ["string", "double", "string", "int32"]
    for files in samples.values():
        meta = json.loads(files["json"])
        assert {c: meta[c] for c in EXTRA} == {c: want[meta["uid"]][c] for c in EXTRA}
        assert files["txt"].decode() == want[meta["uid"]]["TEXT"]

    # CapFilt: the rows of every image carry its values, typed as the shards' Parquet; the fingerprint names them.
    fields = ingest_extra_fields(out)
    assert [(f.name, f.type) for f in fields] == [
        ("uid", pa.string()),
        ("similarity", pa.float64()),
        ("NSFW", pa.string()),
        ("WIDTH", pa.int32()),
    ]
    settings = make_settings(num_samples=1, extra_columns=fields)
    assert settings.fingerprint()["extra_columns"] == [[f.name, str(f.type)] for f in fields]
    assert check_extra_columns(settings) is None
    (shard,) = list_shards(out)
    tables = []
    for block in ShardDecoder(settings)(shard, 0):
        n = len(block["key"])
        block["syn_0"] = np.array(["a synthetic caption"] * n, dtype=object)
        for j in range(2):
            block[f"itm_score__{j}"] = np.full(n, 0.9, dtype=np.float32)
        tables.append(build_rows(block, settings))
    capfilt_dir = str(tmp_path / "capfilt")
    write_unit(capfilt_dir, Unit(0, "part-00000", [shard]), pa.concat_tables(tables), settings, 100, [])
    written = pq.read_table(Path(capfilt_dir) / "part-00000.parquet")
    assert written.schema.remove_metadata() == output_schema(settings)
    assert written.schema.names[-4:] == EXTRA
    rows = written.to_pylist()
    assert len(rows) == 8 and {r["source"] for r in rows} == {"web", "synthetic"}
    for r in rows:
        uid = r["uid"]
        assert {c: r[c] for c in EXTRA} == {c: want[uid][c] for c in EXTRA}
        assert r["url"] == want[uid]["URL"]
        if r["source"] == "web":
            assert r["text"] == want[uid]["TEXT"]
    print(f"\nLAION-style ingest of 5 URLs with 4 extra columns: {seconds:.1f}s (CLI)")


def test_extra_columns_that_clash_with_capfilt_columns_are_refused():
    settings = make_settings(extra_columns=[pa.field("Shard", pa.string()), pa.field("uid", pa.string())])
    assert check_extra_columns(settings) == "the ingest's extra columns ['Shard'] clash with CapFilt's columns"


def test_cc3m_headerless_unquoted_tsv_and_the_extra_columns_of_text_lists(tmp_path):
    # CC3M's file as it ships: caption<TAB>url, no header, no quoting (a caption may start with a quote).
    captions = ['"the great" poster of a film', "a, b and c", "actor attends the premiere", 'say "cheese"', "007"]
    urls = ["http://h/1.jpg", "http://h/2.jpg", "http://h/1.jpg", "http://h/3.jpg", "http://h/4.jpg"]
    (tmp_path / "cc3m.tsv").write_text("".join(f"{c}\t{u}\n" for c, u in zip(captions, urls)), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    ic = IngestConfig(
        url_list=str(tmp_path / "cc3m.tsv"), input_format="tsv", column_names=["caption", "url"], quoting=False
    )
    prepared = prepare_url_list(ic, str(out))
    table = pq.read_table(out / "00000.parquet")
    assert table.column_names == ["url", "caption"]
    assert table["caption"].to_pylist() == captions and table["url"].to_pylist() == urls
    assert prepared.rows == 5 and prepared.repeated_urls == 1 and prepared.extra_columns == {}

    # Text lists carry no types: a CSV's extra columns stay exact strings; JSON lines keep JSON's.
    (tmp_path / "l.csv").write_text("url,caption,uid,similarity\nhttp://h/1.jpg,x,007,0.5\n", encoding="utf-8")
    ic = IngestConfig(url_list=str(tmp_path / "l.csv"), input_format="csv", extra_columns=["uid", "similarity"])
    prepared = prepare_url_list(ic, str(out))
    assert pq.read_table(out / "00000.parquet").to_pylist() == [
        {"url": "http://h/1.jpg", "caption": "x", "uid": "007", "similarity": "0.5"}
    ]
    (tmp_path / "l.jsonl").write_text(json.dumps({"url": "http://h/1.jpg", "caption": "x", "sim": 0.5}) + "\n")
    ic = IngestConfig(url_list=str(tmp_path / "l.jsonl"), input_format="jsonl", extra_columns=["sim"])
    assert prepare_url_list(ic, str(out)).extra_columns == {"sim": "double"}

    # A missing extra column, or one that JSON cannot carry, is an error that names it.
    ic = IngestConfig(url_list=str(tmp_path / "l.csv"), input_format="csv", extra_columns=["uid", "nsfw"])
    with pytest.raises(IngestError, match="'nsfw'.*ingest.extra_columns"):
        prepare_url_list(ic, str(out))
    pq.write_table(pa.table({"url": ["http://h/1.jpg"], "caption": ["x"], "blob": [b"\x00"]}), tmp_path / "b.parquet")
    with pytest.raises(IngestError, match="'blob' has type binary"):
        prepare_url_list(IngestConfig(url_list=str(tmp_path / "b.parquet"), extra_columns=["blob"]), str(out))
