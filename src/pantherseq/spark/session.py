"""The SparkSession: master and settings from the dataset config's `[spark]` table (schema.SparkConfig).

The Python workers run this interpreter (`spark.pyspark.python`), so executors import the same pantherseq;
times are UTC. A session that is already active is reused (tests start one `local[2]` for all).
"""

from __future__ import annotations

import logging
import os
import sys

from pantherseq.data.schema import SparkConfig
from pantherseq.errors import ConfigError

log = logging.getLogger(__name__)
LOCAL_DEFAULTS = {"spark.sql.shuffle.partitions": "8", "spark.default.parallelism": "8"}


def require_pyspark() -> None:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise ConfigError("--engine spark needs PySpark and a Java runtime: pip install -e '.[spark]' "
                          "(and a JRE 17, e.g. apt-get install openjdk-17-jre-headless)") from None


def build_session(cfg: SparkConfig, master: str | None = None):
    """The active SparkSession, or a new one on `master` (default `cfg.master`) with `cfg.conf`."""
    require_pyspark()
    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    master = master or cfg.master
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (SparkSession.builder.master(master).appName("pantherseq")
               .config("spark.pyspark.python", sys.executable)
               .config("spark.pyspark.driver.python", sys.executable)
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true"))
    settings = {**(LOCAL_DEFAULTS if master.startswith("local") else {}), **cfg.conf}
    for key, value in settings.items():
        builder = builder.config(key, str(value))
    try:
        spark = builder.getOrCreate()
    except (PySparkException, Py4JError, RuntimeError, OSError) as exc:  # no JRE, a bad master URL: one line, not a Java stack
        raise ConfigError(f"cannot start Spark on {master}: {str(exc).splitlines()[0][:200]}") from None
    spark.sparkContext.setLogLevel("ERROR")
    log.info("Spark %s on %s", spark.version, master)
    return spark
