"""One module per phase; each builds the units it would run, the executor runs or prints them."""
