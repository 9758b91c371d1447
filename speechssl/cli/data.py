"""`speechssl data ...` verbs (placeholder until the room lands)."""


def register(subparsers, help_):
    p = subparsers.add_parser("data", help=help_)
    p.add_subparsers(dest="verb", metavar="VERB")
