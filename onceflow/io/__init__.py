"""Sources and sinks: Kafka (read and write), files, the raw-record archive,
SQLite, PostgreSQL, BigQuery, Parquet/Avro files, and the dead-letter queues.
All I/O of onceflow lives in this package."""
