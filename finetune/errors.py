"""The one base class for problems the user can fix; the CLI prints these without a traceback."""


class FinetuneError(Exception):
    """Bad input or a failed check, with a message that names what and where."""
