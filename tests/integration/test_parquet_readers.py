"""The CapFilt Parquet as data engineers read it: pandas, pyarrow, Polars, DuckDB and Spark, pointed at one round's
``round=K/capfilt/`` directory and at every round's, with the side files (``_plan.json``, ``_done/``,
``_COMMITTED``) and the other stages' outputs beside it. The reads are the README's ("Reading the Parquet").

The directory ``round=K`` is a hive partition, so the round is not a column of the files (schema version 2): a
reader that parses hive paths gives it back from the path (pandas and pyarrow over a list of files, Polars with
``hive_partitioning=True``, DuckDB always, Spark with ``basePath``). Version 1 also stored it as an int32 column,
and pandas / pyarrow then failed on any list of files ("Unable to merge: Field round has incompatible types: int32
vs dictionary<values=int32 ...>") while DuckDB and Spark silently took the path's value over the file's."""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.capfilt.commit import load_or_create_plan, write_unit
from pipelines.capfilt.rows import output_schema
from tests.unit.capfilt_settings import make_settings

pytestmark = pytest.mark.integration

ROWS = {1: 6, 2: 4}  # rows per unit of each round (two units a round)


def _rows(shard: str, n: int) -> list[dict]:
    return [
        {
            "key": f"{shard}{i:04d}",
            "shard": shard,
            "url": f"http://x/{shard}/{i}.jpg",
            "text": f"text {i}",
            "source": "web",
            "keep": i % 2 == 0,
            "status": "ok",
            "text_length": 6,
            "captioner_id": "c",
            "filter_id": "f",
            "itm_score": 0.5,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run root as the stages leave it: two committed CapFilt rounds written by the stage's own writer, each
    with its assembled dataset beside it, and an ingest directory of tars and Parquet files."""
    root = tmp_path_factory.mktemp("readers") / "run"
    ingest = root / "ingest" / "web"
    ingest.mkdir(parents=True)
    shards = [str(ingest / f"{i:05d}.tar") for i in range(2)]
    for s in shards:
        Path(s).write_bytes(b"\0" * 1024)
        pq.write_table(pa.table({"url": ["u"], "status": ["success"]}), s[:-4] + ".parquet")
    storage.write_json(str(ingest / "manifest.json"), {"input": {}})
    for k, n in ROWS.items():
        out = str(root / f"round={k}" / "capfilt")
        settings = make_settings(round=k)
        plan = load_or_create_plan(out, shards, settings, 1)
        for unit in plan.units:
            name = Path(unit.shards[0]).stem
            write_unit(out, unit, pa.Table.from_pylist(_rows(name, n), schema=output_schema(settings)), settings, 4, [])
        storage.commit(out, {"rows": 2 * n})
        kept = root / f"round={k}" / "dataset" / "kept"
        kept.mkdir(parents=True)
        pq.write_table(pa.table({"shard": ["00000"], "key": ["00000000"]}), kept / "part-00000.parquet")
        (kept.parent / "manifest.json").write_text(json.dumps({"round": k}))
    assert sorted(p.name for p in (root / "round=1" / "capfilt").iterdir()) == [
        "_COMMITTED",
        "_done",
        "_plan.json",
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    return root


def test_the_capfilt_parquet_reads_in_pandas_pyarrow_polars_and_duckdb_with_the_round_from_the_path(run_root):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    one = str(run_root / "round=1" / "capfilt")
    every = str(run_root / "round=*" / "capfilt" / "*.parquet")
    want = {1: 2 * ROWS[1], 2: 2 * ROWS[2]}

    def per_round(rounds) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in rounds:
            out[int(r)] = out.get(int(r), 0) + 1
        return out

    # One round's directory: the side files are skipped; the round is the directory's, not a column.
    df = pd.read_parquet(one)
    assert len(df) == want[1] and "round" not in df.columns and df["keep"].sum() == 6
    assert ds.dataset(one, format="parquet").to_table().num_rows == want[1]
    assert pl.read_parquet(one + "/*.parquet").height == want[1]
    con = duckdb.connect()
    assert con.execute(f"SELECT count(*) FROM read_parquet('{one}/*.parquet')").fetchall() == [(want[1],)]

    # Every round, the round from the hive path.
    files = sorted(glob.glob(every))
    df = pd.read_parquet(files)
    assert df["round"].dtype == "category" and per_round(df["round"]) == want
    table = ds.dataset(files, format="parquet", partitioning="hive").to_table()
    assert per_round(table["round"].to_pylist()) == want
    assert per_round(pq.read_table(files)["round"].to_pylist()) == want
    df = pl.read_parquet(every, hive_partitioning=True)
    assert per_round(df["round"].to_list()) == want
    got = con.execute(f"SELECT round, count(*) FROM read_parquet('{every}') GROUP BY round ORDER BY round").fetchall()
    assert dict(got) == want
    # ... and the README's DuckDB query of one round (hive partitioning is auto-detected there too)
    got = con.execute(f"SELECT DISTINCT round FROM read_parquet('{one}/*.parquet')").fetchall()
    assert got == [(1,)]


def test_the_capfilt_parquet_reads_in_spark_with_the_round_from_the_path(run_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    t0 = time.time()
    spark = (
        SparkSession.builder.master("local[1]")
        .appName("capfilt-readers")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.sql.shuffle.partitions", "1")
        .config("spark.sql.warehouse.dir", str(tmp_path / "warehouse"))
        .getOrCreate()
    )
    try:
        spark.sparkContext.setLogLevel("ERROR")
        one = spark.read.parquet(str(run_root / "round=1" / "capfilt"))
        assert one.count() == 2 * ROWS[1] and "round" not in one.columns
        every = spark.read.option("basePath", str(run_root)).parquet(str(run_root / "round=*" / "capfilt"))
        got = {r["round"]: r["count"] for r in every.groupBy("round").count().collect()}
        assert got == {1: 2 * ROWS[1], 2: 2 * ROWS[2]}
    finally:
        spark.stop()
    print(f"\nSpark: session and reads in {time.time() - t0:.1f}s")
