"""`supernet sample` (placeholder until its issue lands)."""


def add_arguments(parser):
    pass


def run(args) -> int:
    raise ValueError("'supernet sample' is not implemented yet")
