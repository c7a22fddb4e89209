"""What every other package leans on, and nothing of this project's own: typed YAML configs with dotted
overrides (config), the one metrics logger (metrics), atomic file writes and latest-pointers (files), the
command-line wrapper every entry point shares (cli). Imports nothing from the rest of the project."""
