"""The code's shape rules: small functions, no pickle in the package."""

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "traitmon"
MAX_LINES = 60


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_in_src_is_over_60_lines():
    long = [f"{p.relative_to(SRC.parent)}:{line} {name} ({n} lines)"
            for p in sorted(SRC.rglob("*.py")) for name, line, n in _functions(p) if n > MAX_LINES]
    assert not long, "functions over 60 lines: " + "; ".join(long)


def test_no_pickle_in_src():
    # unpickling runs code; user-facing artefacts are JSON / safetensors / Zarr (the Trainer's own resume states
    # are read with torch.load(weights_only=True), which refuses code)
    word = re.compile(r"\bc?pickle\b", re.IGNORECASE)
    hits = [f"{p.relative_to(SRC.parent)}:{n}: {line.strip()}" for p in sorted(SRC.rglob("*.py"))
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1) if word.search(line)]
    assert not hits, "pickle-like loading in src: " + "; ".join(hits)


def test_the_checker_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    path = tmp_path / "long.py"
    path.write_text(f"def too_long():\n{body}\n")
    assert [n for _, _, n in _functions(path)] == [MAX_LINES + 1]


def test_commands_register_their_options_beside_them_and_share_the_common_ones():
    from traitmon.cli import COMMANDS, build_parser

    parser = build_parser()
    args = parser.parse_args(["capture", "--model-dir", "m", "--model-key", "k",
                              "--settings", "{}", "--out", "o.zarr", "--threads", "3"])
    assert (args.func.__name__, args.threads, args.model_dir, args.step) == ("cmd_capture", 3, "m", 0)
    args = parser.parse_args(["perturbation", "--key", "p", "--spec", "{}", "--train", "a", "--heldout", "b",
                              "--meta", "c"])
    assert args.model_dir is None  # optional here: only self-generated perturbations load the model
    assert len(COMMANDS) >= 18 and all(func.__name__.startswith("cmd_") for _, func, _, _ in COMMANDS.values())


def test_every_public_name_resolves_and_the_package_is_typed():
    import traitmon

    missing = [name for name in traitmon.__all__ if getattr(traitmon, name, None) is None]
    assert not missing
    assert (SRC / "py.typed").is_file()
    assert '"py.typed"' in (SRC.parents[1] / "pyproject.toml").read_text()
    assert set(traitmon.__all__) == {"LAYER_CONVENTION", "__version__", *traitmon._LAZY}
