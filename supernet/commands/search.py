"""`supernet search` (placeholder until its issue lands)."""


def add_arguments(parser):
    pass


def run(args) -> int:
    raise ValueError("'supernet search' is not implemented yet")
