"""The commands' one error tail (`maskrcnn.cli.run`): a user's mistake is one logged line and its status, in
the order the table gives; anything else keeps its traceback."""

from __future__ import annotations

import logging

import pytest

from maskrcnn import cli


class Late(ValueError):
    pass


def test_an_expected_error_is_one_line_and_its_status(caplog):
    log = logging.getLogger("test-cli")

    def fails(exc: BaseException):
        def body() -> int:
            raise exc
        return body

    table = {Late: 3, (ValueError, OSError): 2, RuntimeError: 1}
    with caplog.at_level(logging.ERROR, "test-cli"):
        assert cli.run(lambda: 0, table, log) == 0
        assert cli.run(fails(Late("late: expected a date")), table, log) == 3  # the first match wins
        assert cli.run(fails(FileNotFoundError("data/a.json: no such file")), table, log, "convert: ") == 2
        assert cli.run(fails(RuntimeError("the cluster left")), table, log) == 1
    assert [r.getMessage() for r in caplog.records] == ["late: expected a date", "convert: data/a.json: no such file",
                                                        "the cluster left"]
    with pytest.raises(KeyError):  # a bug is not a user's mistake: its traceback stays
        cli.run(fails(KeyError("x")), table, log)
