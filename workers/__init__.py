"""The data pipeline, one module per stage: augment -> generate -> attention -> select -> postselect -> export."""
