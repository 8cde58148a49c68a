"""Command-line flags generated from dataclass fields: the one generator of both command lines lives in
:mod:`markovsim.cli_flags` (re-exported here for ``llm``'s command line)."""

from markovsim.cli_flags import add_dataclass_flags, argparse_options, flag_name, given_values, optional_inner

__all__ = ["add_dataclass_flags", "argparse_options", "given_values", "flag_name", "optional_inner"]
