"""One exception type for input a user can fix: the message names the file, key or value at fault."""


class TraitmonError(Exception):
    """Bad input (config, data file, model source). Printed without a traceback by the CLI."""
