"""One thin module per command: parse options, load config, call the library, report."""
