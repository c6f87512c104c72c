"""What a person reads: the command line's help, the report's numbers and the plots."""

from __future__ import annotations

import argparse

import pytest

from torchslim.cli import build_parser


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_command_help_has_option_texts_defaults_examples_and_exit_codes(name):
    p = _subcommands()[name]
    for action in p._actions:
        assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
    text = p.format_help()
    assert text.count(f"torchslim {name}") >= 3  # usage line and two examples
    assert "exit codes: 0 done; 2 bad input" in text and "3 the result misses" in text
    for action in p._actions:
        if action.default not in (None, False, argparse.SUPPRESS) and action.dest != "help":
            assert str(action.default) in text, f"{name} --help does not show the default of {action.dest}"
        if action.choices and action.dest != "command":
            assert "{" + ",".join(action.choices) + "}" in text
