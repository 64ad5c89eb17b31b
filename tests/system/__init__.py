"""System tests: a real systemd in a container (see container.py)."""
