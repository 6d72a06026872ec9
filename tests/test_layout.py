"""Size as a tested property (STYLE.md §12): a module past its budget is a sign it holds two concepts."""

from pathlib import Path

import slm

MODULE_BUDGET = 500  # lines


def test_every_module_stays_within_its_line_budget():
    sizes = {path.name: len(path.read_text(encoding="utf-8").splitlines())
             for path in Path(slm.__file__).parent.glob("*.py")}
    assert len(sizes) > 20
    over = {name: lines for name, lines in sizes.items() if lines > MODULE_BUDGET}
    assert not over, f"over {MODULE_BUDGET} lines, split by concept: {over}"
