"""examples/quickstart.ipynb runs top to bottom in a Jupyter kernel (its seconds-long version,
SELFSUP_QUICKSTART_FAST=1) and is committed without outputs."""

import json
import re
import sys
from pathlib import Path

import pytest

from selfsup.registry import DATASETS

NOTEBOOK = Path(__file__).parents[1] / "examples" / "quickstart.ipynb"


def fashion_mnist_missing() -> bool:
    try:
        DATASETS.build({"name": "fashion_mnist"}, split="test")
    except FileNotFoundError:
        return True
    return False


def test_the_committed_notebook_has_no_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell["outputs"] == [], f"clear the outputs of cell {cell['id']} before committing"
        assert cell["execution_count"] is None, f"cell {cell['id']} has an execution count"


@pytest.mark.skipif(
    fashion_mnist_missing(),
    reason="Fashion-MNIST is missing (apt-get install dataset-fashion-mnist)",
)
def test_the_quickstart_notebook_trains_evaluates_and_shows_neighbours(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason='pip install -e ".[notebook]"')
    nbformat = pytest.importorskip("nbformat", reason='pip install -e ".[notebook]"')
    pytest.importorskip("ipykernel", reason='pip install -e ".[notebook]"')
    monkeypatch.setenv("SELFSUP_QUICKSTART_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own inline backend draws
    # a kernel of this very interpreter: a "python3" kernel spec in ~/.local/share/jupyter could
    # name another one (JUPYTER_PATH is searched first)
    spec = tmp_path / "jupyter" / "kernels" / "selfsup-test"
    spec.mkdir(parents=True)
    command = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": command, "display_name": "selfsup test", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="selfsup-test",
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},  # the runs/ folder goes there
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if a cell fails

    cells = [cell for cell in notebook.cells if cell.cell_type == "code"]

    def outputs(marker: str) -> list:
        matching = [cell for cell in cells if marker in cell.source]
        assert len(matching) == 1, f"no single cell calls {marker}"
        return matching[0].outputs

    def text(outputs: list) -> str:
        return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)

    # training: the progress bar is one display output, replaced in place, at its last step
    trained = outputs("selfsup.train(")
    bars = [o for o in trained if "img/s" in o.get("data", {}).get("text/plain", "")]
    assert len(bars) == 1, f"the progress bar should be one output, got {trained}"
    assert bars[0].output_type == "display_data"
    assert bars[0].data["text/plain"].startswith("[" + "#" * 24 + "] 5/5 loss ")
    assert "img/s" not in text([o for o in trained if o is not bars[0]])
    run_path = tmp_path / text([o for o in trained if o.get("name") == "stdout"]).strip()
    assert run_path.parent == tmp_path / "runs" and (run_path / "metrics.jsonl").is_file()

    printed = text(outputs("selfsup.evaluate("))
    for name in ("knn_top1", "linear_top1"):
        assert re.search(rf"{name}\s+\d+(\.\d+)?\n", printed), printed

    assert re.search(r"\(10000, \d+\) float32", text(outputs("selfsup.embed(")))

    shown = outputs("plt.show()")
    assert any("image/png" in o.get("data", {}) for o in shown), "no figure of the neighbours"
    assert re.search(r"\d+% of the neighbours are of the query's class", text(shown))
