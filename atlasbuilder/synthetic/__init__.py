"""The demo cohort generator: phantom brains, histological sections, annotations and truth."""

__all__: list[str] = []
