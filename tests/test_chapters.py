"""Every chapter executes at the smoke profile (papermill), sharing one fresh checkpoint cache."""
import os
import time

import papermill
import pytest

from notebook_lint import CHAPTERS


@pytest.fixture(scope="module")
def smoke_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("chapters")
    saved = {k: os.environ.get(k) for k in ("D2R_CACHE_DIR", "D2R_RESULTS_DIR")}
    os.environ.update(D2R_CACHE_DIR=str(root / "cache"), D2R_RESULTS_DIR=str(root / "results"))
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_runs_at_smoke_profile(path, smoke_env):
    started = time.perf_counter()
    nb = papermill.execute_notebook(str(path), str(smoke_env / path.name), cwd=str(path.parent),
                                    parameters={"profile": "smoke"}, progress_bar=False, kernel_name="python3")
    print(f"{path.stem}: {time.perf_counter() - started:.1f} s")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the chapter draws no figure"
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "profile=smoke" in printed, "the resolve cell must print the profile (cfg.describe())"
