"""Start-up cost: what the workflow imports at planning time must not pull in torch or transformers."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_workflow_planning_imports_no_torch():
    text = (REPO / "workflow" / "rules" / "common.smk").read_text()
    imports = [line for line in text.splitlines() if re.match(r"(from traitmon\S* import|import traitmon)", line)]
    assert imports, "common.smk imports traitmon"
    probe = "print(sorted(m for m in ('torch', 'transformers', 'peft', 'zarr') if m in sys.modules))"
    code = "\n".join([*imports, "import sys", probe])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
