"""Every option of every ``vlp`` command has help text, and every option that takes a value names its default."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from vlp.cli.main import build_parser, main


def _commands(parser: argparse.ArgumentParser, path: str = "vlp") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{path} {name}")


def _problems(parser: argparse.ArgumentParser, path: str) -> list[str]:
    problems = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        text = (action.help or "").strip()
        if not text or text == argparse.SUPPRESS:
            problems.append(f"{path} {name}: no help text")
            continue
        takes_value = action.option_strings and action.nargs != 0 and not action.required
        if takes_value and "default" not in text:
            problems.append(f"{path} {name}: help does not say the default")
    return problems


def test_every_option_of_every_command_has_help_and_a_default() -> None:
    commands = dict(_commands(build_parser()))
    # the walk reaches every command the issue lists
    for command in ("vlp pretrain", "vlp finetune", "vlp eval retrieval", "vlp eval vqa", "vlp eval zeroshot",
                    "vlp data synth", "vlp report", "vlp explain", "vlp convert"):
        assert command in commands
    problems = [p for path, parser in commands.items() for p in _problems(parser, path)]
    assert problems == []


def test_the_walk_finds_an_option_without_help() -> None:
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--bare", type=int, default=3)
    parser.add_argument("--silent-default", type=int, default=3, help="a number")
    parser.add_argument("--flag", action="store_true", help="a switch")
    assert _problems(parser, "x") == ["x --bare: no help text", "x --silent-default: help does not say the default"]


@pytest.mark.parametrize("argv", [["eval", "retrieval", "--help"], ["data", "synth", "--help"],
                                  ["finetune", "--help"]])
def test_help_output_shows_the_defaults(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "(default:" in text
    if argv[1] == "retrieval":
        assert "(default: 16)" in text and "--csv-img-key" in text  # --k-test
    if argv[1] == "synth":
        assert "(default: 20000)" in text and "(default: 64)" in text
