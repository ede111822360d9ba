"""A Pilot Protocol network node in pure Python."""

__all__: list[str] = []
