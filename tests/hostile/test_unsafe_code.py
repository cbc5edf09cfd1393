"""Nothing from the network (or disk) is unpickled or executed: an ast scanner over the product code."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# --- nothing from the network (or disk) is unpickled or executed -----------------------------------

_UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """Lines that could turn bytes into code: eval/exec, any pickle-family module, torch.load without
    ``weights_only=True``, numpy loads with pickles allowed, yaml.load."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where} imports {n}" for n in names if n.split(".")[0] in _UNPICKLERS]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and name in ("eval", "exec", "__import__"):
            found.append(f"{where} calls {name}()")
        elif owner in _UNPICKLERS and name in ("load", "loads", "Unpickler", "open"):
            found.append(f"{where} calls {owner}.{name}()")
        elif owner == "torch" and name == "load":
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{where} calls torch.load() without weights_only=True")
        elif owner in ("np", "numpy") and name == "load":
            allow = keywords.get("allow_pickle")
            if not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{where} calls {owner}.load() without allow_pickle=False")
        elif owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
            found.append(f"{where} calls yaml.{name}()")
    return found


def test_the_scanner_finds_each_unsafe_pattern():
    source = "\n".join([
        "import pickle", "from dill import loads", "x = eval('1')", "exec('pass')",
        "torch.load(path)", "torch.load(path, weights_only=False)", "np.load(f)", "yaml.load(s)",
        "pickle.loads(b)", "model.eval()", "torch.load(path, map_location='cpu', weights_only=True)",
        "np.load(f, allow_pickle=False)", "re.compile('x')",
    ])
    lines = sorted(int(f.split(":")[1].split()[0]) for f in unsafe_calls(source))
    assert lines == [1, 2, 3, 4, 5, 6, 7, 8, 9], unsafe_calls(source)


def test_product_code_never_unpickles_or_executes_data():
    files = sorted(p for d in ("volunteer", "coordinator_seeds") for p in (REPO / d).rglob("*.py"))
    assert len(files) > 10
    found = [hit for path in files for hit in unsafe_calls(path.read_text(), str(path.relative_to(REPO)))]
    assert not found, "\n".join(found)


# what serves or reads the p2p network: not even torch's restricted unpickler (weights_only) runs there
NETWORK_MODULES = ("volunteer/core/audit_check.py", "volunteer/serving/versions.py", "volunteer/serving/handler.py",
                   "coordinator_seeds/audit.py", "coordinator_seeds/replicas.py", "coordinator_seeds/dispatch.py")


def test_code_that_reads_the_network_never_calls_torch_load():
    for name in NETWORK_MODULES:
        calls = [node for node in ast.walk(ast.parse((REPO / name).read_text()))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                 and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"]
        assert not calls, f"{name}:{calls[0].lineno} calls torch.load"
