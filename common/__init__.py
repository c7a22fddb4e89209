"""What every other package leans on, and nothing of this project's own: typed YAML configs with dotted
overrides (config), the command-line frame (cli), atomic file writes (files), checkpoint files, pointers and the
run lock (checkpoints), the one metrics logger (metrics), quiet third-party output (quiet). Imports nothing from
the rest of the project (README.md)."""
