"""The entry layer: the `miadpo` command line, the demo and the process launchers.

It sits above everything else (app, workers, trainer, core) and is the only package that starts processes
or wires the services together; `core/` imports nothing of the project above it.
"""
