"""No import cycle among minicai modules, and the loading stack's layer order (issue #15).

The graph is static: every Import / ImportFrom anywhere in a file, function-level (lazy) imports included.
Bottom-up: model -> tokenizer -> checkpoint -> gguf_import -> pretrained; a module imports only those below it.
`python tests/test_layers.py` prints the graph of the loading stack and the cycles.
"""
import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minicai")
STACK = ["minicai.model", "minicai.tokenizer", "minicai.checkpoint", "minicai.gguf_import", "minicai.pretrained"]


def import_graph(pkg=PKG) -> dict:
    """minicai module -> the minicai modules it imports ("minicai" is the package's __init__)."""
    mods = {f[:-3] for f in os.listdir(pkg) if f.endswith(".py")}
    graph = {}
    for m in sorted(mods):
        with open(os.path.join(pkg, m + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ("minicai" + (f".{node.module}" if node.module else "")) if node.level else (node.module or "")
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                parts = t.split(".")
                if parts[0] == "minicai" and len(parts) > 1 and parts[1] in mods:
                    deps.add(f"minicai.{parts[1]}")
                elif t == "minicai":
                    deps.add("minicai")
        name = "minicai" if m == "__init__" else f"minicai.{m}"
        graph[name] = deps - {name}
    return graph


def cycles(graph) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_loading_stack_imports_only_downwards():
    graph = import_graph()
    for i, mod in enumerate(STACK):
        above = set(STACK[i + 1:])
        assert not graph[mod] & above, f"{mod} imports {sorted(graph[mod] & above)}, which sit above it"


def readme_levels(path=os.path.join(os.path.dirname(PKG), "README.md")) -> dict:
    """minicai module -> its level in README's layer diagram (lines "level N     a, b, c")."""
    levels = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("level "):
                n, names = line[len("level "):].split(None, 1)
                for name in names.split('"')[0].split(","):  # a quoted note may follow the names
                    if name.strip():
                        levels[f"minicai.{name.split()[0]}"] = int(n)
    return levels


def test_readme_layer_diagram_is_the_import_graph():
    """Every module is on the diagram, and each imports only modules on lower rows (the README's promise)."""
    graph, levels = import_graph(), readme_levels()
    modules = set(graph) - {"minicai"}  # the package's __init__ hands names on lazily
    assert modules == set(levels), f"on the diagram but not in minicai/: {sorted(set(levels) - modules)}; " \
                                   f"in minicai/ but not on the diagram: {sorted(modules - set(levels))}"
    for mod in modules:
        up = sorted(d for d in graph[mod] if d != "minicai" and levels[d] >= levels[mod])
        assert not up, f"{mod} (level {levels[mod]}) imports {up} on its own row or above"


if __name__ == "__main__":
    g = import_graph()
    for mod in STACK:
        print(f"{mod} -> {sorted(g[mod])}")
    print(f"{len(g)} modules, {sum(map(len, g.values()))} edges; cycles: {cycles(g) or 'none'}")
