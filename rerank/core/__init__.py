"""The floor every front end stands on (the command line, the batch engines, the service): exit codes
and usage errors, building a pipeline from a config and an index, reading request lines and writing
durable result files. Front ends import from here, never from each other's modules."""
