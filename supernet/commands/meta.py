"""`supernet meta` (placeholder until its issue lands)."""


def add_arguments(parser):
    pass


def run(args) -> int:
    raise ValueError("'supernet meta' is not implemented yet")
