"""The arguments of the current `synpref` call (set by `synpref.cli.main`; `reproduce` records its config from them)."""

INVOCATION: list[str] = []
