"""Checks patchline's TensorRT code against real TensorRT Python bindings; run in a child process.

    python -m tests.trt_surface BINDINGS_DIR  →  one JSON report on stdout

BINDINGS_DIR holds an unpacked ``tensorrt*_bindings`` wheel; its shared libraries (libnvinfer,
libnvinfer_plugin, libnvonnxparser) are stubs on LD_LIBRARY_PATH whose factories return NULL, as a
real libnvinfer does when it cannot start (tests/test_trt_api_surface.py builds them). The bindings
are imported as the ``tensorrt`` module, as the pip package does.

What is checked, statically, in the files that use TensorRT: every ``trt.A.B`` chain resolves in
the real module; every attribute read, property write and method call on a TensorRT object exists
on its class and the call's arguments bind to one of its documented signatures (pybind11 writes
them into ``__doc__``); each method a Python subclass of a TensorRT class overrides exists on the
base with the same parameters. TensorRT objects are known by the names in SEED and followed through
assignments by the return types the bindings document. A use listed in GUARDED may be missing where
patchline's own guard (run here on the real module) keeps that code from running.
Then, at run time: builder and runtime construction failing becomes patchline's GpuUnavailable, and
INT8 calibration is refused with an EngineError where TensorRT has none.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ["runtime/engines/trt_build.py", "runtime/engines/tensorrt.py", "calibration/tensorrt_calibrator.py",
           "runtime/engines/engine_cache.py"]
# Names that hold TensorRT objects where no assignment in the same file says so (parameters, helpers' results).
SEED = {"builder": "Builder", "runtime": "Runtime", "config": "IBuilderConfig", "profile": "IOptimizationProfile",
        "self._engine": "ICudaEngine", "self.context": "IExecutionContext"}
# Uses that run only where a guard says so: the guard's name in guards() below.
GUARDED = {
    "trt.BuilderFlag.FP16": "weakly_typed",
    "trt.BuilderFlag.INT8": "weakly_typed",
    "trt.IInt8EntropyCalibrator2": "weakly_typed",
    "trt.IInt8EntropyCalibrator2.__init__": "weakly_typed",
    "IBuilderConfig.int8_calibrator": "weakly_typed",
    "IBuilderConfig.set_calibration_profile": "weakly_typed",
    "trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH": "explicit_batch",
}


def guards(trt) -> dict[str, bool]:  # noqa: ANN001
    from patchline.runtime.engines.trt_build import network_flags, weakly_typed

    return {"weakly_typed": weakly_typed(trt), "explicit_batch": network_flags(trt) != 0}


def split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets (pybind11 types read ``List[Tuple[int, int]]``)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[(<{"
        depth -= char in "])>}"
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [p for p in [*parts, current.strip()] if p]


def signatures(function: object, name: str) -> list[tuple[list[tuple[str, bool]], str]]:
    """Each overload's parameters ((name, has a default), self included) and return type."""
    try:
        sig = inspect.signature(function)
    except (TypeError, ValueError):  # a pybind11 builtin: its signatures are the docstring's first lines
        found = []
        for match in re.finditer(rf"^(?:\d+\. )?{re.escape(name)}\((.*)\) -> (.*)$", function.__doc__ or "", re.M):
            params = split_top(match.group(1))
            if not any(p.startswith("*") for p in params):
                found.append(([(p.split(":")[0].strip(), "=" in p) for p in params], match.group(2).strip()))
        return found
    params = [(p.name, p.default is not p.empty) for p in sig.parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [(params, "")]


def binds(params: list[tuple[str, bool]], call: ast.Call) -> bool:
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return True  # *args / **kwargs: only existence can be checked
    names = [p for p, _ in params]
    positional, keywords = len(call.args), {k.arg for k in call.keywords}
    filled = set(names[:positional])
    required = {p for p, has_default in params if not has_default}
    return positional <= len(names) and not keywords - set(names) and not keywords & filled \
        and required <= filled | keywords


def dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := dotted(node.value)):
        return f"{base}.{node.attr}"
    return None


class Checker:
    def __init__(self, trt, guard: dict[str, bool]) -> None:  # noqa: ANN001
        self.trt, self.guard = trt, guard
        self.problems: list[str] = []
        self.uses: set[str] = set()
        self.skipped: set[str] = set()
        self.parents: dict[ast.AST, ast.AST] = {}  # of the file being checked
        self.types: dict[ast.AST, dict[str, str]] = {}  # scope → name → TensorRT class, in that file

    def trt_class(self, name: str | None) -> type | None:
        value = getattr(self.trt, name, None) if name else None
        return value if isinstance(value, type) else None

    def returns(self, cls: type, method: str) -> str | None:
        for _, result in signatures(getattr(cls, method, None), method):
            found = re.match(r"([\w.]+)", result)
            name = found.group(1).rsplit(".", 1)[-1] if found else None
            if self.trt_class(name):
                return name
        return None

    def type_of(self, node: ast.AST, scope: ast.AST) -> str | None:
        name = dotted(node)
        while name is not None and scope is not None:  # the innermost function that assigns the name
            if name in self.types.get(scope, {}):
                return self.types[scope][name]
            scope = self.scope_of(scope)
        if name in SEED:
            return SEED[name]
        if isinstance(node, ast.Call):
            func = dotted(node.func)
            if func and func.startswith("trt.") and self.trt_class(func[4:]):
                return func[4:]
            if isinstance(node.func, ast.Attribute):
                owner = self.trt_class(self.type_of(node.func.value, scope))
                if owner is not None:
                    return self.returns(owner, node.func.attr)
        return None

    def scope_of(self, node: ast.AST) -> ast.AST | None:
        node = self.parents.get(node)
        while node is not None and not isinstance(node, (ast.FunctionDef, ast.Lambda, ast.Module)):
            node = self.parents.get(node)
        return node

    def missing(self, use: str, where: str, why: str) -> None:
        self.uses.add(use)
        if use in GUARDED and not self.guard[GUARDED[use]]:
            self.skipped.add(use)
        else:
            self.problems.append(f"{where} {use}: {why}")

    def check_call(self, use: str, where: str, function: object, name: str, call: ast.Call, bound: bool) -> None:
        overloads = signatures(function, name)
        if overloads and not any(binds(params[1:] if bound else params, call) for params, _ in overloads):
            shown = " | ".join(f"{name}({', '.join(p for p, _ in params)})" for params, _ in overloads)
            self.problems.append(f"{where} {use}: called as {ast.unparse(call)}, TensorRT has {shown}")

    def check_file(self, path: Path) -> None:
        tree = ast.parse(path.read_text())
        rel = path.relative_to(ROOT)
        self.parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        self.types = {}
        for _ in range(2):  # assignments in any order
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and (target := dotted(node.targets[0])):
                    scope = self.scope_of(node)
                    found = self.type_of(node.value, scope)
                    if found:
                        self.types.setdefault(scope, {})[target] = found
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            parent = self.parents.get(node)
            called = isinstance(parent, ast.Call) and parent.func is node
            if isinstance(node, ast.Attribute) and not (isinstance(parent, ast.Attribute) and parent.value is node):
                chain = dotted(node)
                if chain and chain.startswith("trt."):
                    self.check_chain(chain, where, parent if called else None)
                    continue
            if isinstance(node, ast.Attribute):
                owner_name = self.type_of(node.value, self.scope_of(node))
                owner = self.trt_class(owner_name)
                if owner is None:
                    continue
                use = f"{owner_name}.{node.attr}"
                if not hasattr(owner, node.attr):
                    self.missing(use, where, f"{owner_name} has no {node.attr!r}")
                    continue
                self.uses.add(use)
                attribute = inspect.getattr_static(owner, node.attr)
                if isinstance(node.ctx, ast.Store) and not (isinstance(attribute, property) and attribute.fset):
                    self.problems.append(f"{where} {use}: assigned, but it is not a settable property")
                if called:
                    self.check_call(use, where, getattr(owner, node.attr), node.attr, parent, bound=True)
            if isinstance(node, ast.ClassDef):
                self.check_subclass(node, where)

    def check_chain(self, chain: str, where: str, call: ast.Call | None) -> None:
        value: object = self.trt
        parts = chain.split(".")[1:]
        for i, part in enumerate(parts):
            if not hasattr(value, part):
                self.missing(chain, where, f"{'.'.join(['trt', *parts[:i]])} has no {part!r}")
                return
            value = getattr(value, part)
        self.uses.add(chain)
        if call is None:
            return
        if isinstance(value, type):
            self.check_call(chain, where, value.__init__, "__init__", call, bound=True)
        else:
            self.check_call(chain, where, value, parts[-1], call, bound=False)

    def check_subclass(self, node: ast.ClassDef, where: str) -> None:
        for base in node.bases:
            chain = dotted(base)
            cls = self.trt_class(chain[4:]) if chain and chain.startswith("trt.") else None
            if cls is None:
                continue  # a missing base is reported as a chain
            for method in (n for n in node.body if isinstance(n, ast.FunctionDef) and n.name != "__init__"):
                use = f"{chain[4:]}.{method.name}"
                if not hasattr(cls, method.name):
                    self.missing(use, where, f"overrides {method.name!r}, which {chain} does not have: never called")
                    continue
                self.uses.add(use)
                mine = len(method.args.args)
                theirs = {len(params) for params, _ in signatures(getattr(cls, method.name), method.name)}
                if theirs and mine not in theirs:
                    self.problems.append(f"{where} {use}: takes {mine} parameters, TensorRT calls it with "
                                         f"{' or '.join(map(str, sorted(theirs)))}")


def raised(call) -> dict[str, str] | None:  # noqa: ANN001
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the report says what was raised
        return {"type": type(exc).__name__, "message": str(exc)}
    return None


def main(bindings: str) -> None:
    sys.path.insert(0, bindings)
    sys.modules["tensorrt"] = trt = importlib.import_module("tensorrt_bindings")

    from patchline.calibration.tensorrt_calibrator import calibrate_engine
    from patchline.runtime.config import TensorRtConfig
    from patchline.runtime.engines.tensorrt import load_engine
    from patchline.runtime.engines.trt_build import construct

    guard = guards(trt)
    checker = Checker(trt, guard)
    for name in SCANNED:
        checker.check_file(ROOT / name)
    with tempfile.TemporaryDirectory() as folder:
        plan = Path(folder) / "some.engine"
        plan.write_bytes(b"\0" * 64)
        settings = TensorRtConfig(precision="int8", calibration_cache=str(Path(folder) / "calibration.cache"))
        report = {
            "version": trt.__version__,
            "guards": guard,
            "problems": checker.problems,
            "uses": sorted(checker.uses),
            "guarded_absent": sorted(checker.skipped),
            "builder": raised(lambda: construct(trt, trt.Builder)),
            "runtime": raised(lambda: load_engine(plan)),
            "int8_calibration": raised(lambda: calibrate_engine(Path(folder) / "no-artifact", folder, settings)),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
