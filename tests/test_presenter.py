"""brain_diffuser_core.presenter: who presents, and the server-wide stage students follow."""
from __future__ import annotations

import threading

from brain_diffuser_core.presenter import Stage, is_presenter


def test_is_presenter_rules():
    assert is_presenter("s3cret-token", loopback=False, token="s3cret-token")
    assert not is_presenter("s3cret", loopback=False, token="s3cret-token")
    assert not is_presenter("", loopback=True, token="s3cret-token")  # a token is needed even on loopback
    assert is_presenter("", loopback=True, token="")  # loopback, no token: only the presenter's machine
    assert not is_presenter("anything", loopback=False, token="")  # beyond loopback, no token: nobody


def test_is_presenter_reads_the_environment(monkeypatch):
    monkeypatch.setenv("BRAIN_DIFFUSER_PRESENTER_TOKEN", " tok ")
    assert is_presenter("tok", loopback=False) and not is_presenter("", loopback=True)


def test_stage_versions_values_and_results():
    st = Stage()
    assert st.version("walk") == 0 and st.scene("walk").values == {} and st.result("walk", 1) is None
    assert st.publish("walk", {"i": 1}) == 1
    assert st.publish("walk", {"i": 1}) == 1  # unchanged values: same version (followers do not rerun)
    assert st.publish("walk", {"i": 2}) == 2
    assert st.publish_result("walk", ("k", 2), "rec") == 3
    assert st.result("walk", ("k", 2)) == "rec" and st.result("walk", ("k", 1)) is None
    assert st.scene("walk").values == {"i": 2}
    st.publish_result("walk", ("k", 3), "rec3")  # one result per scene: the last replaces it
    assert st.result("walk", ("k", 2)) is None and st.version("other") == 0


def test_stage_is_safe_across_threads():
    st = Stage()
    threads = [threading.Thread(target=lambda n=n: [st.publish("s", {"n": n, "i": i}) for i in range(200)])
               for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert st.version("s") == 800  # every change counted once
