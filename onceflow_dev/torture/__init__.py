"""``onceflow torture``: a live run under injected faults, compared with the truth."""
