"""``necroctl completion SHELL``: the completion script for bash, zsh or fish, made by shtab from
the same parser the commands use, so a new command or option completes as soon as it exists."""

from __future__ import annotations

import argparse

import shtab

from necrod.ctl import cli

#: Options that name a file on this machine: completed with the shell's own file completion.
FILE_OPTIONS = frozenset({"socket", "file", "ssh_key", "known_hosts"})


def _mark_files(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if action.dest in FILE_OPTIONS and action.option_strings:
            action.complete = shtab.FILE  # type: ignore[attr-defined]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _mark_files(sub)


def script(shell: str) -> str:
    parser = cli.parser()
    _mark_files(parser)
    return shtab.complete(parser, shell=shell)
