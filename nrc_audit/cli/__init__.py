"""The command line: the Typer app, shared option declarations, one module per subcommand."""
