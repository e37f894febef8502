"""Rewriting one module's forward: the edited fx graph of a piece (``graph.py``) becomes that module's ``forward``.

``convert`` rewrites a piece only when ``graph.Piece.rewritable`` holds (rule 3 of ``graph.py``); this module does
the edit -- fuse a BN call with the activation (and the residual add) that follows it, after inlining the child
that returned the BN output if needed -- and installs the generated code as an instance attribute, so that the
module keeps its class, methods and attributes.
"""
from __future__ import annotations

import types

from torch import fx

__all__ = ["RewrittenForward", "inline_call", "rewrite_piece"]


def inline_call(graph: fx.Graph, call: fx.Node, child: fx.Graph) -> dict:
    """Replace the ``call_module`` node ``call`` of ``graph`` by a copy of ``child`` (the called module's own graph,
    its module and attribute targets prefixed with the call's target); returns {child node: its copy}."""
    placeholders = [n for n in child.nodes if n.op == "placeholder"]
    env = dict(zip(placeholders, call.args))
    result = None
    with graph.inserting_before(call):
        for n in child.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                result = fx.map_arg(n.args[0], env.__getitem__)
                continue
            copy = graph.node_copy(n, env.__getitem__)
            if n.op in ("call_module", "get_attr"):
                copy.target = f"{call.target}.{n.target}"
            env[n] = copy
    call.replace_all_uses_with(result)
    graph.erase_node(call)
    return env


class RewrittenForward:
    """The forward of a rewritten piece (rule 3): code generated from its edited graph, bound to the module.

    Stored as the module's instance attribute ``forward``, so the module keeps its class, methods and attributes.
    Deep copies share the code; pickling keeps the generated source and recompiles it.
    """

    def __init__(self, module, graph: fx.Graph):
        self.module, self.graph = module, graph  # the graph: for converting the converted model again
        code = graph.python_code("self")
        self.source, self.globals = code.src, code.globals
        self._compile()

    def _compile(self):
        scope = dict(self.globals)
        exec(compile(self.source, f"<ckptnorm rewritten {type(self.module).__name__}.forward>", "exec"), scope)
        self.function = types.MethodType(scope["forward"], self.module)

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)

    def __deepcopy__(self, memo):
        import copy
        new = RewrittenForward.__new__(RewrittenForward)
        new.module = copy.deepcopy(self.module, memo)
        new.source, new.globals, new.graph = self.source, self.globals, self.graph
        new.function = types.MethodType(self.function.__func__, new.module)
        return new

    def __getstate__(self):
        # modules (torch, operator, ...) do not pickle: keep their names and import them again
        names = {k: ("module", v.__name__) for k, v in self.globals.items() if isinstance(v, types.ModuleType)}
        rest = {k: v for k, v in self.globals.items() if k not in names}
        return {"module": self.module, "source": self.source, "globals": rest, "modules": names}

    def __setstate__(self, state):
        import importlib
        modules = state.pop("modules", {})
        self.__dict__.update(state)
        self.graph = None  # not pickled: such a module is not rewritten again (its forward is not traced)
        self.globals = dict(self.globals, **{k: importlib.import_module(n) for k, (_, n) in modules.items()})
        self._compile()


def rewrite_piece(piece, sites, pieces):
    """Edit the owner's graph for its fused sites and install the generated forward (rule 3 of graph.py).  A site
    whose BN output is returned by a child module (``inline_node``) first gets that child's code copied in place
    of its call, so that the BN call and what follows it are in one graph."""
    graph = piece.graph
    nodes = {n.name: n for n in graph.nodes}
    bn_nodes = {}
    for site in sites:
        if site.inline_node is None:
            bn_nodes[site.name] = nodes[site.bn_node]
            continue
        call = nodes.pop(site.inline_node)
        child = pieces.piece(piece.submodule(call.target))
        copies = inline_call(graph, call, child.graph)
        bn_nodes[site.name] = next(new for old, new in copies.items() if old.name == site.bn_node)
    for site in sites:
        bn, act = bn_nodes[site.name], nodes[site.activation_node]
        passed = [nodes[name] for name in site.passed_nodes]  # Identity calls between the BN and what is fused
        head = passed[-1] if passed else bn
        if site.fused_residual:
            add = nodes[site.add_node]
            # r from the add's current arguments: r may be an earlier site's activation node, replaced since
            residual = add.args[1] if add.args[0] is head else add.args[0]
            with graph.inserting_before(add):
                fused = graph.call_module(bn.target, (bn.args[0], residual))
            fused.meta = dict(act.meta)
            act.replace_all_uses_with(fused)
            for node in [act, add, *reversed(passed), bn]:
                graph.erase_node(node)
        else:
            act.replace_all_uses_with(head)
            graph.erase_node(act)
    graph.lint()
    piece.module.forward = RewrittenForward(piece.module, graph)
