"""Names are matched as whole strings: ``$`` would also match before a final newline."""
from __future__ import annotations

import pytest
from margin.common.errors import InvalidArgument
from margin.common.names import validate_alias, validate_labels, validate_name, validate_text

CONTROL = ["x\n", "x\r", "x\t", "\nx", "x\x00y", "x\x1b[31m", "x\x7f", "x\u0085"]


@pytest.mark.parametrize("value", CONTROL)
def test_a_name_with_a_control_character_is_refused_for_every_kind(value):
    for check in (lambda v: validate_name(v, "tenant name"), validate_alias, lambda v: validate_labels({v: "x"})):
        with pytest.raises(InvalidArgument, match="control character"):
            check(value)
    with pytest.raises(InvalidArgument, match="control character"):
        validate_text(f"triton/{value}", "pool")


@pytest.mark.parametrize("value", ["x", "digits-v2", "a.b_c-1", "A" * 100])
def test_a_safe_name_passes_whole(value):
    assert validate_name(value) == value
    assert validate_text(value, "pool") == value
