import pytest

from rlhf_fast.trainers.phases import phase, recording


class _Log:
    def __init__(self):
        self.events = []

    def begin(self, name):
        self.events.append(("begin", name))

    def end(self, name):
        self.events.append(("end", name))


def test_phases_reach_the_installed_recorder_nested_and_on_error():
    log = _Log()
    with recording(log):
        with phase("score"):
            with phase("score/policy"):
                pass
        with pytest.raises(ValueError), phase("update"):
            raise ValueError
    with phase("unheard"):
        pass
    assert log.events == [("begin", "score"), ("begin", "score/policy"), ("end", "score/policy"),
                          ("end", "score"), ("begin", "update"), ("end", "update")]


def test_one_recorder_at_a_time():
    with recording(_Log()), pytest.raises(RuntimeError, match="already installed"), recording(_Log()):
        pass
