"""The ``pilot-langgraph demo`` command: a real distributed run on loopback."""
