"""The app names the `download nsd` command when a folder bundle's NSD root lacks the files a page needs."""
from __future__ import annotations

import pytest

pytest.importorskip("streamlit")

from app_sources import app_errors  # noqa: E402


@pytest.mark.parametrize("page", ["pages/browse.py", "pages/roi_designer.py"])
def test_missing_subject_files_name_the_download_command(app, tmp_path, page):
    root = tmp_path / "nsd"
    (root / "nsddata").mkdir(parents=True)  # an NSD root in name only: no design, masks or betas yet
    app.session_state["nsd_root_folder"] = str(root)
    app.run()
    app.switch_page(page).run()
    errors = app_errors(app)
    assert not app.exception, errors
    assert any(f"download nsd --subject 1 --out {root}" in e and "no betas sessions" in e for e in errors), errors
