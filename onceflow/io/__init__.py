"""Sources and sinks: files, SQLite, the dead-letter queue (and later Kafka,
PostgreSQL, BigQuery). All I/O of onceflow lives in this package."""
