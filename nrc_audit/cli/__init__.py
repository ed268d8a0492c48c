"""The command line: the Typer app, shared option declarations, one module per subcommand."""

from nrc_audit.engine.threads import quiet_idle_threads

quiet_idle_threads()  # before numpy/torch load: idle BLAS/OpenMP threads then sleep instead of spinning
