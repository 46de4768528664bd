"""PySpark engine for `prepare` and `embed` (docs/SPARK.md). Imports pyspark only inside its modules:
`session.py` (the SparkSession from the config's [spark] table), `prepare.py`, `embed.py`."""
