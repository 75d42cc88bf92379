"""The HTTP front end: routes validate, call core, and return a schema."""
