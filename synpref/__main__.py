"""`python -m synpref` = the `synpref` command."""

from synpref.cli import main

main()
