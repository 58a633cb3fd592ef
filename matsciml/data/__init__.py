"""Everything about structures, nothing about learning: records, batches, formats, DataModules."""
