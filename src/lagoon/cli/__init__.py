"""Thin typer commands. Each file parses arguments, merges config, builds through registries and
calls one function. Heavy imports (torch, SDKs) happen inside the commands, so `lagoon --help`
stays fast. Nothing imports this package."""
