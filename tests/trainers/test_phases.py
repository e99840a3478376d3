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


def test_phase_timer_sums_nested_phases_and_reports_the_top_level():
    import time

    from rlhf_fast.trainers.phases import PhaseTimer

    timer = PhaseTimer()
    with recording(timer):
        for _ in range(2):
            with phase("score"):
                with phase("score/policy"):
                    time.sleep(0.01)
            with phase("update"):
                pass
    assert timer.calls == {"score": 2, "score/policy": 2, "update": 2}
    assert timer.seconds["score"] >= timer.seconds["score/policy"] >= 0.02
    assert set(timer.top_level()) == {"score", "update"}
    with pytest.raises(RuntimeError, match="ended while"):
        timer.begin("a")
        timer.end("b")
