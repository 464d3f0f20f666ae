"""The run file: its schema, writer, reader, merge and descriptions."""
