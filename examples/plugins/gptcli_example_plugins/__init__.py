"""Example gptcli plugins, one of each registered kind (docs/extending.md)."""
