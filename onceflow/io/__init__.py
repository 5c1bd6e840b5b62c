"""Sources and sinks: Kafka (read and write), files, the raw-record archive,
SQLite, PostgreSQL, BigQuery, Parquet/Avro files, the dead-letter queues, and
Flink's REST API (savepoints). All I/O of onceflow lives in this package."""
