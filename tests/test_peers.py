"""A peer measured beside slm runs in a process of its own: its answer comes back, its crash is one line."""

import math
import os

import pytest

from slm.errors import SlmError
from slm.peers import isolated


def test_an_isolated_call_returns_the_childs_answer():
    assert isolated(math.sqrt, 16.0) == 4.0


def test_a_peer_that_crashes_is_an_error_naming_the_signal_and_this_process_goes_on():
    with pytest.raises(SlmError, match="^its process ended by SIGABRT$"):
        isolated(os.abort)
    assert isolated(math.sqrt, 9.0) == 3.0
