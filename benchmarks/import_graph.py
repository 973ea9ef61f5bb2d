"""Print which benchbox module imports which (module- and function-level imports): python benchmarks/import_graph.py"""
import ast, pathlib, sys
root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "benchbox")
for f in sorted(root.glob("*.py")):
    got = set()
    for n in ast.walk(ast.parse(f.read_text())):
        if isinstance(n, ast.ImportFrom):
            if n.level == 1:
                if n.module: got.add(n.module.split(".")[0])
                else: got |= {a.name for a in n.names if (root / f"{a.name}.py").exists()}
            elif n.module and n.module.startswith("benchbox."): got.add(n.module.split(".")[1])
        elif isinstance(n, ast.Import):
            got |= {a.name.split(".")[1] for a in n.names if a.name.startswith("benchbox.")}
        elif isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "import_module":
            got.add("<import_module>")
    print(f"{f.stem:10} -> {', '.join(sorted(got - {f.stem})) or '-'}")
