"""The one place where pinned versions of outside components are declared.

``setup.py``, the dev stack (Prism, Flink job server, Kafka broker jars), the Flex
Template Dockerfile and the tests all read these values; change them here only.
"""

ONCEFLOW_VERSION = "0.1.0"

# Apache Beam, for the Python SDK and every Beam artifact built from the same
# release (the Prism runner is built from the Go module at this tag).
BEAM_VERSION = "2.77.0"

# Apache Kafka broker jars (org.apache.kafka:kafka_2.13) for the local KRaft broker.
KAFKA_VERSION = "4.1.1"
