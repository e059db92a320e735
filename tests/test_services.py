"""synpref.pipeline.services with a real (cheap) server process: started for its stages, stopped after them, on errors, Ctrl-C and SIGTERM."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from synpref.core.errors import ConfigError
from synpref.pipeline.services import Service, ServiceError, for_stages, running
from tests.conftest import free_port

STAGES = ["sft", "sample", "dpo", "eval"]


def http_service(stages=("sample", "eval"), command=None) -> Service:
    port = free_port()
    return Service(
        name="web",
        command=command or [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        health_url=f"http://127.0.0.1:{port}/",
        stages=list(stages),
        startup_timeout=60,
    )


def alive(proc) -> bool:
    return proc.poll() is None


def test_runs_only_while_its_stages_run(tmp_path):
    with for_stages([http_service(stages=["sample", "eval", "table"])], [*STAGES, "table"], tmp_path) as servers:
        servers.need("sft")
        assert not servers.processes and not (tmp_path / "web.log").exists()  # not needed yet
        servers.need("sample")
        first = servers.processes["web"]
        servers.need("dpo")  # training in between: stopped (a GPU server would hold the memory)
        assert not alive(first) and not servers.processes
        servers.need("eval")
        second = servers.processes["web"]
        servers.need("table")  # consecutive stages share one server
        assert alive(second) and servers.processes == {"web": second}
    assert not alive(second)
    assert (tmp_path / "web.log").read_text().count("Serving HTTP") == 2


def test_stopped_when_a_stage_fails_or_on_ctrl_c(tmp_path):
    for error in (SystemExit("stage 'sample' failed"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with for_stages([http_service()], STAGES, tmp_path) as servers:
                servers.need("sample")
                proc = servers.processes["web"]
                raise error
        assert not alive(proc)


def test_sigterm_becomes_systemexit_and_stops_the_service(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        with for_stages([http_service()], STAGES, tmp_path) as servers:
            servers.need("sample")
            proc = servers.processes["web"]
            os.kill(os.getpid(), signal.SIGTERM)
    assert exit_.value.code == 128 + signal.SIGTERM and not alive(proc)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_service_that_dies_or_a_busy_port_is_a_named_error(tmp_path):
    dead = http_service(command=[sys.executable, "-c", "print('no model here'); raise SystemExit(3)"])
    with pytest.raises(ServiceError, match=r"(?s)'web' exited with code 3 before .*no model here") as error:
        with running(dead, tmp_path / "dead.log"):
            pass
    assert "raise SystemExit(3)" in str(error.value) and str(tmp_path / "dead.log") in str(error.value)
    svc = http_service()
    with running(svc, tmp_path / "one.log"):
        with pytest.raises(ServiceError, match="already answers before it was started") as error:
            with running(svc, tmp_path / "two.log"):
                pass
    assert "http.server" in str(error.value) and str(tmp_path / "two.log") in str(error.value)


def test_a_missing_command_is_a_named_error(tmp_path):
    svc = http_service(command=["no-such-server-binary", "--port", "1"])
    with pytest.raises(ServiceError, match=r"'web'.*no-such-server-binary --port 1.*not found") as error:
        with running(svc, tmp_path / "web.log"):
            pass
    assert str(tmp_path / "web.log") in str(error.value)


def test_a_startup_timeout_stops_the_process(tmp_path):
    svc = http_service(
        command=[sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(60)"]
    )
    svc.startup_timeout = 1
    with pytest.raises(ServiceError, match=r"'web'.*did not answer 200 within 1 s.*time.sleep\(60\)") as error:
        with running(svc, tmp_path / "web.log"):
            pass
    assert str(tmp_path / "web.log") in str(error.value)
    with pytest.raises(ProcessLookupError):  # stopped and reaped, not left running
        os.kill(int((tmp_path / "web.log").read_text().split()[0]), 0)


def test_a_failing_second_service_stops_the_first(tmp_path):
    good, bad = http_service(), http_service(command=["no-such-server-binary"])
    bad.name = "broken"
    with pytest.raises(ServiceError, match="'broken'"):
        with for_stages([good, bad], STAGES, tmp_path) as servers:
            try:
                servers.need("sample")
            finally:
                first = servers.processes["web"]
    assert not alive(first)


def test_unknown_stage_names_are_a_config_error(tmp_path):
    services = [http_service(), http_service(stages=["sample", "evaluate"])]
    with pytest.raises(ConfigError, match=r"'services\[1\]\.stages'.*\['evaluate'\].*'eval'"):
        with for_stages(services, STAGES, tmp_path):
            pass
