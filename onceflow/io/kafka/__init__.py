"""Kafka I/O: every way onceflow reads, writes or asks a Kafka cluster.

- :mod:`~onceflow.io.kafka.config`: what a read or write is pointed at (URLs,
  positions, client settings and the ones refused); parsing only.
- :mod:`~onceflow.io.kafka.errors`: the exceptions (:class:`BrokerUnreachable`,
  :class:`BrokerRefused`, :class:`UnknownGroupOrTopic`) and why a client was
  refused, in one line.
- :mod:`~onceflow.io.kafka.admin`: topics, partition offsets and where a read
  starts and stops, committed offsets and consumer-group lag, a topic read to
  its end; used by the pipelines, ``onceflow lag``, ``onceflow dlq``, the torture
  and the tests.
- :mod:`~onceflow.io.kafka.read`: ``ReadBatchesFromKafka`` / ``ReadFromKafka``,
  the splittable-DoFn readers (Python, every runner).
- :mod:`~onceflow.io.kafka.write`: rows to a topic, and the producer a dead-letter
  topic (:mod:`onceflow.io.dlq.kafka`) uses too.
- :mod:`~onceflow.io.kafka.java`: ``ReadFromKafkaWithJava``, Beam's Java KafkaIO
  through cross-language expansion.

Importing this package imports none of them (nor Beam, nor confluent-kafka, the
``kafka`` extra): import the module you need.
"""
