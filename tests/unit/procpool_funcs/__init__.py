"""Job functions for the process-pool tests, importable by name in worker processes."""
