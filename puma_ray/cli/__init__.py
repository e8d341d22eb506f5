"""The jobs' command lines (`main(argv)` → exit code; `console()` for the installed commands): jobs/<name>.py runs
them as scripts (what `ray job submit` takes), pyproject.toml installs them as `puma-migrate`, `puma-convert`,
`puma-import`, `puma-export`."""
