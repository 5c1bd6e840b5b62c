"""onceflow's development tools, apart from what pipelines and workers import.

    onceflow_dev.devstack   `onceflow dev`: local Kafka, PostgreSQL, Prism, Flink
    onceflow_dev.torture    `onceflow torture`: faults injected into a live run, the sink
                            compared with the truth

Nothing in the ``onceflow`` package imports this one (a test checks it), and the
worker package that ``--setup_file ./setup.py`` builds leaves it out.
"""
