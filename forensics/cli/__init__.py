"""The ``fp`` command line: parse options, call one step, print (``app`` holds the Typer app)."""
