"""One `local[2]` SparkSession for every Spark test (skipped, saying why, without PySpark or Java)."""

from __future__ import annotations

import shutil

import pytest

from pantherseq.data.schema import SparkConfig
from store.conftest import redis_url  # noqa: F401 (a throwaway redis-server for embed's executor writes)


@pytest.fixture(scope="session")
def spark():
    pytest.importorskip("pyspark", reason="PySpark is not installed: pip install -e '.[spark]'")
    if shutil.which("java") is None:
        pytest.skip("no Java runtime: apt-get install openjdk-17-jre-headless (make setup does, where apt exists)")
    from pantherseq.spark.session import build_session

    session = build_session(SparkConfig(master="local[2]", conf={"spark.sql.shuffle.partitions": "4"}))
    yield session
    session.stop()
