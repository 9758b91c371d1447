"""`speechssl kmeans ...` verbs (placeholder until the room lands)."""


def register(subparsers, help_):
    p = subparsers.add_parser("kmeans", help=help_)
    p.add_subparsers(dest="verb", metavar="VERB")
