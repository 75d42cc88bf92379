"""One module per resource; every route declares its response model."""
